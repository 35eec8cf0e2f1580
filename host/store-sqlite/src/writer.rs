//! The one writer: a thread that takes every write waiting in its queue, applies them in one
//! transaction and commits them with one fsync (group commit), so concurrent operations share
//! the disk's flush instead of queueing behind one another. Each write is applied op by op by
//! the entity modules ([`apply`] is the table of which op goes where).

use std::path::Path;
use std::sync::Arc;

use payhost_core::store::{StoreError, WriteOp};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::checkpoint::{CHECKPOINT_FRAMES, Checkpointer, finish_checkpoint, note_wal_frames};
use crate::sql::unavailable;
use crate::{attempts, holders, keys, outbox, payments, sessions, webhooks};

/// A write and where its result goes.
pub(crate) type Job = (Vec<WriteOp>, oneshot::Sender<Result<(), StoreError>>);

/// How many waiting writes one commit takes at most.
const MAX_BATCH: usize = 128;

/// Starts the writer thread on `conn`, with its checkpoint thread beside it; writes go through
/// the returned sender, and both threads end when it is dropped.
pub(crate) fn start_writer(
    conn: Connection,
    path: &Path,
) -> Result<std::sync::mpsc::Sender<Job>, StoreError> {
    let checkpointer = Checkpointer::start(path)?;
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let theirs = checkpointer.clone();
    std::thread::Builder::new()
        .name("payhost-sqlite-writer".into())
        .spawn(move || writer_loop(conn, rx, theirs))
        .map_err(|e| {
            checkpointer.stop();
            unavailable(e)
        })?;
    Ok(tx)
}

fn writer_loop(
    conn: Connection,
    rx: std::sync::mpsc::Receiver<Job>,
    checkpointer: Arc<Checkpointer>,
) {
    conn.wal_hook(Some(note_wal_frames));
    // Whether the connection is at `synchronous = NORMAL` (it opens at FULL).
    let mut lazy_now = false;
    // Whether a checkpoint pass was asked for since the WAL last started from its beginning.
    let mut asked = false;
    let mut last_frames = 0;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Only delivery bookkeeping in this commit: no need to wait for the disk (the next
        // durable commit syncs it too; a crash before that re-sends some events).
        let lazy = jobs
            .iter()
            .all(|(ops, _)| ops.iter().all(WriteOp::is_bookkeeping));
        if lazy != lazy_now {
            let pragma = if lazy {
                "PRAGMA synchronous = NORMAL"
            } else {
                "PRAGMA synchronous = FULL"
            };
            if let Err(e) = conn.execute_batch(pragma) {
                // Never commit a durable write without FULL.
                for (_, reply) in jobs {
                    let _ = reply.send(Err(unavailable(&e)));
                }
                continue;
            }
            lazy_now = lazy;
        }
        let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(jobs.len());
        // BEGIN, the jobs, COMMIT — every statement from the cache. Jobs rarely fail, so the
        // batch is first applied as it is; only if a job fails is it all rolled back and applied
        // again with each job in its savepoint, so that the others still commit (savepoints
        // cost a copy of every page a job touches).
        let outcome = (|| -> rusqlite::Result<()> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let alone = jobs.len() == 1;
            let jobs_done = (|| -> rusqlite::Result<()> {
                let mut failed = None;
                for (ops, _) in &jobs {
                    if let Err(e) = apply(&conn, ops) {
                        failed = Some(e);
                        break;
                    }
                }
                let Some(e) = failed else {
                    results.extend(jobs.iter().map(|_| Ok(())));
                    return conn.prepare_cached("COMMIT")?.execute([]).map(drop);
                };
                conn.prepare_cached("ROLLBACK")?.execute([])?;
                if alone {
                    results.push(Err(e));
                    return Ok(());
                }
                conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
                for (ops, _) in &jobs {
                    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
                    match apply(&conn, ops) {
                        Ok(()) => {
                            conn.prepare_cached("RELEASE job")?.execute([])?;
                            results.push(Ok(()));
                        }
                        Err(e) => {
                            conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
                            conn.prepare_cached("RELEASE job")?.execute([])?;
                            results.push(Err(e));
                        }
                    }
                }
                conn.prepare_cached("COMMIT")?.execute([]).map(drop)
            })();
            if jobs_done.is_err() && !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            jobs_done
        })();
        match outcome {
            Ok(()) => {
                for ((_, reply), result) in jobs.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for (_, reply) in jobs {
                    let _ = reply.send(Err(unavailable(&e)));
                }
            }
        }
        let frames = crate::checkpoint::wal_frames();
        if frames < last_frames {
            // The WAL started again from its beginning.
            asked = false;
        }
        last_frames = frames;
        if frames >= CHECKPOINT_FRAMES {
            if !asked {
                checkpointer.ask();
                asked = true;
            } else if checkpointer.take_copied() {
                // If a reader kept it from finishing (or the next commit does not start the WAL
                // again), the next commit asks for another pass.
                finish_checkpoint(&conn);
                asked = false;
            }
        }
    }
    checkpointer.stop();
}

/// Applies one write's ops, its events last (their numbers follow everything else it did).
pub(crate) fn apply(tx: &Connection, ops: &[WriteOp]) -> Result<(), StoreError> {
    let (events, rest): (Vec<&WriteOp>, Vec<&WriteOp>) = ops
        .iter()
        .partition(|op| matches!(op, WriteOp::AppendEvent { .. }));
    for op in rest.into_iter().chain(events) {
        match op {
            WriteOp::InsertCollection(c) => sessions::insert_collection(tx, c)?,
            WriteOp::InsertSession(s) => sessions::insert_session(tx, s)?,
            WriteOp::UpdateSession {
                session,
                expected_version,
            } => sessions::update_session(tx, session, *expected_version)?,
            WriteOp::SelectSession(id) => sessions::select_session(tx, id)?,
            WriteOp::InsertAttempt(a) => attempts::insert(tx, a)?,
            WriteOp::UpdateAttempt(a) => attempts::update(tx, a)?,
            WriteOp::ExtendDeadline { id, call_ms, now } => {
                attempts::extend_deadline(tx, id, now + call_ms)?
            }
            WriteOp::ClaimAttempt {
                id,
                until,
                now,
                stale_before,
            } => attempts::claim(tx, id, *until, *now, *stale_before)?,
            WriteOp::InsertPayment(p) => payments::insert(tx, p)?,
            WriteOp::UpdatePayment {
                payment,
                expected_version,
            } => payments::update(tx, payment, *expected_version)?,
            WriteOp::InsertCapture(payment, c) => payments::insert_capture(tx, payment, c)?,
            WriteOp::InsertRefund(payment, r) => payments::insert_refund(tx, payment, r)?,
            WriteOp::ClaimKey {
                key,
                operation,
                request_hash,
                at,
                claim_id,
            } => keys::claim(tx, key, operation, request_hash, *at, claim_id)?,
            WriteOp::CompleteKey { key, response } => keys::complete(tx, key, response)?,
            WriteOp::ReleaseKey { key, claim_id } => keys::release(tx, key, claim_id)?,
            WriteOp::ForgetKey { key, attempt_id } => keys::forget(tx, key, attempt_id)?,
            WriteOp::LinkKey { key, attempt_id } => keys::link(tx, key, attempt_id)?,
            WriteOp::ReleasePendingKeys { older_than } => keys::release_pending(tx, *older_than)?,
            WriteOp::InsertWebhookEvent(e) => webhooks::insert(tx, e)?,
            WriteOp::InsertAccountHolder(h) => holders::insert_holder(tx, h)?,
            WriteOp::UpdateAccountHolder {
                holder,
                expected_version,
            } => holders::update_holder(tx, holder, *expected_version)?,
            WriteOp::InsertPaymentMethod(m) => holders::insert_method(tx, m)?,
            WriteOp::UpdatePaymentMethod {
                method,
                expected_version,
            } => holders::update_method(tx, method, *expected_version)?,
            WriteOp::InsertHolderAttempt(t) => holders::insert_attempt(tx, t)?,
            WriteOp::UpdateHolderAttempt {
                attempt,
                expected_version,
            } => holders::update_attempt(tx, attempt, *expected_version)?,
            WriteOp::MarkWebhookApplied {
                provider_id,
                event_id,
                at,
            } => webhooks::mark_applied(tx, provider_id, event_id, *at)?,
            WriteOp::AppendEvent { event, deliver_to } => outbox::append(tx, event, deliver_to)?,
            WriteOp::DeliveryOutcomes {
                delivered, failed, ..
            } => outbox::delivery_outcomes(tx, delivered, failed)?,
            WriteOp::Redeliver { id, endpoints, by } => {
                outbox::redeliver(tx, id.as_deref(), endpoints, by)?
            }
            WriteOp::ParkUnconfigured { configured } => outbox::park_unconfigured(tx, configured)?,
            WriteOp::PruneEvents { before } => outbox::prune(tx, *before)?,
        }
    }
    Ok(())
}
