//! The embedded SQLite store: WAL, `synchronous = FULL` (a write that returned survives power
//! loss), and group commit — one writer thread takes every write waiting in its queue, applies
//! them in one transaction (each in its own savepoint only if one of them fails), and commits
//! them with one fsync, so concurrent operations share the disk's flush instead of queueing
//! behind one another.
//! Readers use their own connections (WAL lets them read while the writer writes).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::oneshot;

use payhost_core::domain::*;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage, EventType};
use payhost_core::store::{Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};

/// The schema, one migration per entry, applied in order and recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_schema.sql")),
    (2, include_str!("../migrations/0002_webhook_events.sql")),
    (3, include_str!("../migrations/0003_key_attempts.sql")),
    (4, include_str!("../migrations/0004_call_deadlines.sql")),
    (5, include_str!("../migrations/0005_requested_by.sql")),
    (6, include_str!("../migrations/0006_resends.sql")),
    (7, include_str!("../migrations/0007_key_claims.sql")),
    (8, include_str!("../migrations/0008_outbox.sql")),
    (9, include_str!("../migrations/0009_or_chains.sql")),
    (10, include_str!("../migrations/0010_redelivered_by.sql")),
];

/// How many waiting writes one commit takes at most.
const MAX_BATCH: usize = 128;
/// Reader connections kept open.
const READERS: usize = 4;
/// Frames in the WAL past which it is copied back into the database (SQLite's own default).
const CHECKPOINT_FRAMES: i32 = 1000;
/// How long the writer's finishing RESTART checkpoint waits for readers before it gives up
/// (the checkpoint thread is then asked for another pass).
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(2);
/// The writer's busy timeout otherwise.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

thread_local! {
    /// Frames in the WAL after this thread's last commit: set by the WAL hook, which SQLite
    /// calls on the committing thread (each store has its own writer thread).
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Copies the WAL back into the database on its own thread and connection, so that the
/// writer never does it between commits (SQLite's automatic checkpoint runs on the committing
/// connection, and its copying and syncing then delay every write waiting behind it). A
/// checkpoint is PASSIVE: it never blocks the writer or a reader, and with `synchronous =
/// FULL` it syncs the WAL before and the database after copying, as the automatic one does.
///
/// A PASSIVE checkpoint never lets the WAL start again from its beginning: only a write that
/// begins when every frame is in the database does, and under load commits keep coming while a
/// pass copies. So the work is split: this thread copies the bulk, then the writer, between two
/// batches, finishes with a RESTART checkpoint of the few frames committed meanwhile (waiting at
/// most [`RESTART_WAIT`] for readers), after which its next commit starts the WAL again.
struct Checkpointer {
    /// `(wanted, stop)`.
    state: Mutex<(bool, bool)>,
    wake: std::sync::Condvar,
    /// Set when a pass asked for has ended: the writer may finish the checkpoint.
    copied: std::sync::atomic::AtomicBool,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Arc<Checkpointer>, StoreError> {
        let conn = connect(path)?;
        let me = Arc::new(Checkpointer {
            state: Mutex::new((false, false)),
            wake: std::sync::Condvar::new(),
            copied: std::sync::atomic::AtomicBool::new(false),
        });
        let this = me.clone();
        std::thread::Builder::new()
            .name("payhost-sqlite-checkpoint".into())
            .spawn(move || this.run(conn))
            .map_err(unavailable)?;
        Ok(me)
    }

    fn run(&self, conn: Connection) {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                while !state.0 && !state.1 {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                if state.1 {
                    return;
                }
                state.0 = false;
            }
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "SQLite checkpoint failed; the next one retries");
            }
            self.copied
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Asks for a checkpoint pass (one already asked for is not asked again).
    fn ask(&self) {
        self.copied
            .store(false, std::sync::atomic::Ordering::Release);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.wake.notify_one();
    }

    /// Whether the pass last asked for has ended (once: it reads `false` after).
    fn take_copied(&self) -> bool {
        self.copied.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.wake.notify_one();
    }
}

type Job = (Vec<WriteOp>, oneshot::Sender<Result<(), StoreError>>);

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    /// `None` when opened read-only beside the host that owns the file.
    writer: Option<std::sync::mpsc::Sender<Job>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Held while the store is open: one host per file.
    _lock: Option<std::fs::File>,
    /// Opened beside the host that has the file: only outbox administration is written.
    beside: bool,
    appended: Arc<tokio::sync::Notify>,
}

/// The lock file beside a database: `<file>.lock`, holding its owner's pid.
fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the database's lock, or says which process holds it. A second host on one file would
/// take the first one's live calls for abandoned ones and settle them.
/// Makes the database file (and, if present, its WAL, shared memory and lock files) readable
/// and writable by this user only. SQLite gives the WAL and shared-memory files it creates the
/// database file's mode, so creating the database 0600 keeps them 0600 too.
fn private_files(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !db.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(db)
            .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", db.display())))?;
    }
    let suffixed = |suffix: &str| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    for file in [
        db.to_owned(),
        suffixed("-wal"),
        suffixed("-shm"),
        lock_path(db),
    ] {
        if let Ok(meta) = std::fs::metadata(&file)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| {
                    StoreError::Unavailable(format!(
                        "cannot make {} private (0600): {e}",
                        file.display()
                    ))
                },
            )?;
            tracing::info!(file = %file.display(), "made the database file private (0600)");
        }
    }
    Ok(())
}

fn take_lock(db: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(db);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = std::process::id().to_string();
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = file.write_all(pid.as_bytes());
            let _ = file.sync_data();
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            Err(StoreError::Locked(format!(
                "the SQLite database {} is in use by another payhost process{}: one host per SQLite file. Stop it first, or use PostgreSQL for several hosts",
                db.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(BUSY_WAIT).map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(unavailable)?;
    // Every statement payhost runs stays prepared (rusqlite keeps 16 by default).
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating) the database at `path`, takes it for this process (else
    /// [`StoreError::Locked`], naming the process that has it) and applies pending migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_owned();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            // Folders it makes are this user's alone; an existing one is the operator's choice.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
        }
        private_files(&path)?;
        let lock = take_lock(&path)?;
        let mut conn = connect(&path)?;
        migrate(&mut conn)?;
        let writer = start_writer(conn, &path)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(connect(&path)?);
        }
        Ok(SqliteStore {
            path,
            writer: Some(writer),
            readers: Arc::new(Mutex::new(readers)),
            _lock: Some(lock),
            beside: false,
            appended: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Opens an existing database to read it beside the host that has it (`payhost attempts`
    /// while `payhost serve` runs). Every write is refused.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_owned();
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let readers = vec![connect(&path)?];
        Ok(SqliteStore {
            path,
            writer: None,
            readers: Arc::new(Mutex::new(readers)),
            _lock: None,
            beside: false,
            appended: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Opens an existing database beside the host that has it, for the operator's changes to the
    /// outbox only ([`WriteOp::is_outbox_admin`]: `payhost events redeliver` while `payhost
    /// serve` runs). They touch no money and no attempt, and SQLite's own locking orders them
    /// with the host's writes; every other write is refused.
    pub fn open_beside(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let mut store = SqliteStore::open_read_only(path)?;
        let conn = connect(&store.path)?;
        store.writer = Some(start_writer(conn, &store.path)?);
        store.beside = true;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => connect(&path)?,
            };
            let result = f(&conn).map_err(unavailable);
            let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(unavailable)?
    }
}

/// Applies the pending migrations in one transaction. Foreign keys are off while it runs (a
/// migration that rebuilds a table drops the one other tables refer to) and checked before it
/// commits.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(unavailable)?;
    let migrated = migrate_keys_off(conn);
    conn.execute_batch("PRAGMA foreign_keys = ON")
        .map_err(unavailable)?;
    migrated
}

fn migrate_keys_off(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(unavailable)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > newest {
        return Err(StoreError::Unavailable(format!(
            "the database schema is version {current}, newer than this payhost ({newest}); upgrade payhost"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Unavailable(format!("migration {version} failed: {e}")))?;
        exec(
            &tx,
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![
                version,
                payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock)
            ],
        )
        .map_err(unavailable)?;
    }
    let broken: Option<(String, Option<i64>)> = tx
        .query_row("PRAGMA foreign_key_check", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(unavailable)?;
    if let Some((table, row)) = broken {
        let row = row.map_or_else(|| "a row".to_owned(), |r| format!("row {r}"));
        return Err(StoreError::Unavailable(format!(
            "after migrating, {row} of {table} refers to a row that does not exist; nothing was changed"
        )));
    }
    tx.commit().map_err(unavailable)
}

/// Starts the writer thread on `conn`, with its checkpoint thread beside it; writes go through
/// the returned sender, and both threads end when it is dropped.
fn start_writer(conn: Connection, path: &Path) -> Result<std::sync::mpsc::Sender<Job>, StoreError> {
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
    // The hook replaces SQLite's automatic checkpoint on this connection.
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
        let frames = WAL_FRAMES.get();
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

/// Copies what the checkpoint thread's pass left (the frames committed while it ran) with a
/// RESTART checkpoint, so that the writer's next commit starts the WAL from its beginning. It
/// gives up after [`RESTART_WAIT`] if a reader is still on the WAL.
fn finish_checkpoint(conn: &Connection) {
    let finished = conn.busy_timeout(RESTART_WAIT).and_then(|()| {
        conn.prepare_cached("PRAGMA wal_checkpoint(RESTART)")?
            .query_row([], |_| Ok(()))
    });
    if let Err(e) = finished {
        tracing::warn!(error = %e, "SQLite checkpoint failed; the next one retries");
    }
    if let Err(e) = conn.busy_timeout(BUSY_WAIT) {
        tracing::error!(error = %e, "SQLite writer: its busy timeout could not be restored");
    }
}

/// Runs one statement through the connection's statement cache: a write's statements are
/// parsed once per connection, not once per write.
fn exec(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn json(v: &Value) -> String {
    v.to_string()
}

fn classify(e: rusqlite::Error, what: &str) -> StoreError {
    let text = e.to_string();
    if text.contains("invariant:") {
        return StoreError::Invariant(
            text.split("invariant:")
                .nth(1)
                .unwrap_or(&text)
                .trim()
                .to_owned(),
        );
    }
    if text.contains("UNIQUE constraint failed: attempts.entity_id") {
        return StoreError::AttemptOpen(what.to_owned());
    }
    if text.contains("UNIQUE constraint failed: idempotency_keys.key")
        || text.contains("UNIQUE constraint failed: webhook_events.provider_id")
    {
        return StoreError::KeyExists(what.to_owned());
    }
    if text.contains("constraint failed") {
        return StoreError::Invariant(format!("{what}: {text}"));
    }
    unavailable(text)
}

fn now_ms() -> Timestamp {
    payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock)
}

/// Appends an event (`INSERT … SELECT … WHERE NOT EXISTS` on the same table would build a
/// temporary B-tree on every event: the write looks for the id first).
const INSERT_EVENT: &str = "INSERT INTO events (id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)";

fn apply(tx: &Connection, ops: &[WriteOp]) -> Result<(), StoreError> {
    // Events last (their numbers follow everything else the write did).
    let (events, rest): (Vec<&WriteOp>, Vec<&WriteOp>) = ops
        .iter()
        .partition(|op| matches!(op, WriteOp::AppendEvent { .. }));
    for op in rest.into_iter().chain(events) {
        match op {
            WriteOp::AppendEvent {
                event: e,
                deliver_to,
            } => {
                // A write applied twice appends its events once.
                let known = tx
                    .prepare_cached("SELECT 1 FROM events WHERE id = ?1")
                    .and_then(|mut st| st.exists([&e.id]))
                    .map_err(|err| classify(err, &e.id))?;
                if !known {
                    tx.prepare_cached(INSERT_EVENT)
                        .and_then(|mut st| {
                            st.execute(params![
                                e.id,
                                e.kind.as_str(),
                                e.payment_collection_id,
                                e.payment_session_id,
                                e.payment_id,
                                e.attempt_id,
                                e.amount,
                                e.currency_code,
                                e.created_at,
                                json(&e.data)
                            ])
                        })
                        .map_err(|err| classify(err, &e.id))?;
                    let seq = tx.last_insert_rowid();
                    let key = e.order_key();
                    for endpoint in deliver_to {
                        tx.prepare_cached(
                            "INSERT INTO event_deliveries (id, endpoint_id, event_seq, order_key, state, next_at, created_at) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5)",
                        )
                        .and_then(|mut st| {
                            st.execute(params![format!("{}:{endpoint}", e.id), endpoint, seq, key, e.created_at])
                        })
                        .map_err(|err| classify(err, &e.id))?;
                    }
                }
            }
            WriteOp::DeliveryOutcomes {
                delivered, failed, ..
            } => {
                // One host per file: what it claimed is its own.
                let now = now_ms();
                for id in delivered {
                    tx.prepare_cached(
                        "UPDATE event_deliveries SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, ?2), last_error = NULL WHERE id = ?1 AND state = 'pending'",
                    )
                    .and_then(|mut st| st.execute(params![id, now]))
                    .map_err(|e| classify(e, id))?;
                }
                for (id, retry_in_ms, error) in failed {
                    exec(
                    tx,
                        "UPDATE event_deliveries SET attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, ?2), next_at = ?2 + ?3, state = CASE WHEN ?4 THEN 'parked' ELSE 'pending' END, last_error = ?5 WHERE id = ?1 AND state = 'pending'",
                        params![id, now, retry_in_ms.unwrap_or(0), retry_in_ms.is_none(), error],
                    )
                    .map_err(|e| classify(e, id))?;
                }
            }
            WriteOp::Redeliver { id, endpoints, by } => {
                exec(
                    tx,
                    "UPDATE event_deliveries SET state = 'pending', attempts = 0, first_tried_at = NULL, next_at = ?2, claimed_by = NULL, claimed_until = NULL, redelivered_by = ?4, redelivered_at = ?2 WHERE state = 'parked' AND (?1 IS NULL OR id = ?1) AND endpoint_id IN (SELECT value FROM json_each(?3))",
                    params![id, now_ms(), serde_json::to_string(endpoints).unwrap_or_default(), by],
                )
                .map_err(|e| classify(e, id.as_deref().unwrap_or("deliveries")))?;
            }
            WriteOp::ParkUnconfigured { configured } => {
                let configured = serde_json::to_string(configured).unwrap_or_default();
                exec(
                    tx,
                    "UPDATE event_deliveries SET state = 'parked', last_error = 'the endpoint `' || endpoint_id || '` is no longer configured' WHERE state = 'pending' AND endpoint_id NOT IN (SELECT value FROM json_each(?1))",
                    params![configured],
                )
                .map_err(|e| classify(e, "event deliveries"))?;
            }
            WriteOp::PruneEvents { before } => {
                // The first event that must stay: young, or not yet delivered everywhere.
                let keep: Option<i64> = tx
                    .query_row(
                        "SELECT MIN(seq) FROM events e WHERE e.created_at >= ?1 OR EXISTS (SELECT 1 FROM event_deliveries d WHERE d.event_seq = e.seq AND d.state <> 'delivered')",
                        params![before],
                        |r| r.get(0),
                    )
                    .map_err(|e| classify(e, "events"))?;
                let through: Option<i64> = match keep {
                    Some(k) => Some(k - 1),
                    None => tx
                        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
                        .map_err(|e| classify(e, "events"))?,
                };
                if let Some(through) = through {
                    exec(
                        tx,
                        "DELETE FROM event_deliveries WHERE event_seq <= ?1",
                        params![through],
                    )
                    .and_then(|_| exec(tx, "DELETE FROM events WHERE seq <= ?1", params![through]))
                    .and_then(|_| {
                        exec(
                            tx,
                            "UPDATE event_meta SET v = MAX(v, ?1) WHERE k = 'pruned_through'",
                            params![through],
                        )
                    })
                    .map_err(|e| classify(e, "events"))?;
                }
            }
            WriteOp::InsertCollection(c) => {
                exec(
                    tx,
                    "INSERT INTO payment_collections (id, amount, currency_code, metadata, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6)",
                    params![c.id.0, c.amount, c.currency_code.code(), json(&c.metadata), c.created_at, c.updated_at],
                )
                .map_err(|e| classify(e, c.id.as_str()))?;
            }
            WriteOp::InsertSession(s) => {
                exec(
                    tx,
                    "INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18)",
                    params![s.id.0, s.payment_collection_id.0, s.cart_id, json(&s.cart), json(&s.context), s.provider_id, s.is_selected, s.is_initiated, s.status.as_str(), json(&s.data), s.idempotency_key, s.amount, s.currency_code.code(), s.payment_authorized_at, json(&s.metadata), s.created_at, s.updated_at, s.version],
                )
                .map_err(|e| classify(e, s.id.as_str()))?;
            }
            WriteOp::UpdateSession {
                session: s,
                expected_version,
            } => {
                let n = exec(
                    tx,
                        "UPDATE payment_sessions SET cart_id=?2, cart=?3, context=?4, is_selected=?5, is_initiated=?6, status=?7, data=?8, amount=?9, payment_authorized_at=?10, metadata=?11, updated_at=?12, version=?13 WHERE id=?1 AND version=?14",
                        params![s.id.0, s.cart_id, json(&s.cart), json(&s.context), s.is_selected, s.is_initiated, s.status.as_str(), json(&s.data), s.amount, s.payment_authorized_at, json(&s.metadata), s.updated_at, s.version, expected_version],
                    )
                    .map_err(|e| classify(e, s.id.as_str()))?;
                if n == 0 {
                    return Err(StoreError::VersionConflict(s.id.0.clone()));
                }
            }
            WriteOp::SelectSession(id) => {
                exec(
                    tx,
                    "UPDATE payment_sessions SET is_selected = (id = ?1), version = version + 1 WHERE id = ?1 OR (is_selected = 1 AND (payment_collection_id = (SELECT payment_collection_id FROM payment_sessions WHERE id = ?1) OR (cart_id IS NOT NULL AND cart_id = (SELECT cart_id FROM payment_sessions WHERE id = ?1))))",
                    params![id.0],
                )
                .map_err(|e| classify(e, id.as_str()))?;
            }
            WriteOp::InsertAttempt(a) => {
                exec(
                    tx,
                    "INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
                    params![a.id.0, a.entity(), a.session_id.0, a.payment_id.as_ref().map(|p| &p.0), a.provider_id, a.operation.as_str(), a.amount, a.currency_code.code(), a.idempotency_key, a.state.as_str(), a.outcome.as_ref().map(json), a.error.as_ref().map(json), a.reason, a.checks, a.next_check_at, a.resolution.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()), a.created_at, a.updated_at, a.call_deadline_at, a.requested_by],
                )
                .map_err(|e| classify(e, &a.entity()))?;
            }
            WriteOp::UpdateAttempt(a) => {
                exec(
                    tx,
                    "UPDATE attempts SET state=?2, outcome=?3, error=?4, checks=?5, next_check_at=?6, resolution=?7, updated_at=?8 WHERE id=?1",
                    params![a.id.0, a.state.as_str(), a.outcome.as_ref().map(json), a.error.as_ref().map(json), a.checks, a.next_check_at, a.resolution.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()), a.updated_at],
                )
                .map_err(|e| classify(e, a.id.as_str()))?;
            }
            WriteOp::ExtendDeadline { id, call_ms, now } => {
                exec(
                    tx,
                    "UPDATE attempts SET call_deadline_at = ?2, resends = resends + 1 WHERE id = ?1",
                    params![id.0, now + call_ms],
                )
                .map_err(|e| classify(e, id.as_str()))?;
            }
            WriteOp::InsertPayment(p) => {
                exec(
                    tx,
                    "INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
                    params![p.id.0, p.payment_session_id.0, p.payment_collection_id.0, p.provider_id, p.amount, p.currency_code.code(), json(&p.data), p.captured_at, p.canceled_at, p.created_at, p.updated_at, p.version],
                )
                .map_err(|e| classify(e, p.id.as_str()))?;
            }
            WriteOp::UpdatePayment {
                payment: p,
                expected_version,
            } => {
                let n = exec(
                    tx,
                        "UPDATE payments SET data=?2, captured_at=?3, canceled_at=?4, updated_at=?5, version=?6 WHERE id=?1 AND version=?7",
                        params![p.id.0, json(&p.data), p.captured_at, p.canceled_at, p.updated_at, p.version, expected_version],
                    )
                    .map_err(|e| classify(e, p.id.as_str()))?;
                if n == 0 {
                    return Err(StoreError::VersionConflict(p.id.0.clone()));
                }
            }
            WriteOp::InsertCapture(payment, c) => {
                exec(
                    tx,
                    "INSERT INTO captures (id, payment_id, amount, attempt_id, created_at) VALUES (?1,?2,?3,?4,?5)",
                    params![c.id.0, payment.0, c.amount, c.attempt_id.0, c.created_at],
                )
                .map_err(|e| classify(e, payment.as_str()))?;
            }
            WriteOp::InsertRefund(payment, r) => {
                exec(
                    tx,
                    "INSERT INTO refunds (id, payment_id, amount, reason, attempt_id, created_at) VALUES (?1,?2,?3,?4,?5,?6)",
                    params![r.id.0, payment.0, r.amount, r.reason, r.attempt_id.0, r.created_at],
                )
                .map_err(|e| classify(e, payment.as_str()))?;
            }
            WriteOp::ClaimKey {
                key,
                operation,
                request_hash,
                at,
                claim_id,
            } => {
                exec(
                    tx,
                    "INSERT INTO idempotency_keys (key, operation, request_hash, response, created_at, claim_id) VALUES (?1,?2,?3,NULL,?4,?5)",
                    params![key, operation, request_hash, at, claim_id],
                )
                .map_err(|e| classify(e, key))?;
            }
            WriteOp::CompleteKey { key, response } => {
                exec(
                    tx,
                    "UPDATE idempotency_keys SET response = ?2 WHERE key = ?1",
                    params![key, json(response)],
                )
                .map_err(|e| classify(e, key))?;
            }
            WriteOp::ReleaseKey { key, claim_id } => {
                exec(
                    tx,
                    "DELETE FROM idempotency_keys WHERE key = ?1 AND response IS NULL AND attempt_id IS NULL AND claim_id IS ?2",
                    params![key, claim_id],
                )
                .map_err(|e| classify(e, key))?;
            }
            WriteOp::InsertWebhookEvent(e) => {
                exec(
                    tx,
                    "INSERT INTO webhook_events (provider_id, event_id, body, session_id, action, received_at, applied_at) VALUES (?1,?2,?3,?4,?5,?6,NULL)",
                    params![e.provider_id, e.event_id, e.body, e.session_id, e.action, e.received_at],
                )
                .map_err(|err| classify(err, &format!("{}/{}", e.provider_id, e.event_id)))?;
            }
            WriteOp::MarkWebhookApplied {
                provider_id,
                event_id,
                at,
            } => {
                exec(
                    tx,
                    "UPDATE webhook_events SET applied_at = ?3 WHERE provider_id = ?1 AND event_id = ?2",
                    params![provider_id, event_id, at],
                )
                .map_err(|e| classify(e, event_id))?;
            }
            WriteOp::ForgetKey { key, attempt_id } => {
                let n = exec(
                    tx,
                    "DELETE FROM idempotency_keys WHERE key = ?1 AND attempt_id = ?2",
                    params![key, attempt_id],
                )
                .map_err(|e| classify(e, key))?;
                if n == 0 {
                    return Err(StoreError::KeyExists(key.clone()));
                }
            }
            WriteOp::LinkKey { key, attempt_id } => {
                exec(
                    tx,
                    "UPDATE idempotency_keys SET attempt_id = ?2 WHERE key = ?1",
                    params![key, attempt_id],
                )
                .map_err(|e| classify(e, key))?;
            }
            WriteOp::ReleasePendingKeys { older_than } => {
                exec(
                    tx,
                    "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND created_at < ?1",
                    params![older_than],
                )
                .map_err(|e| classify(e, "idempotency keys"))?;
            }
            WriteOp::ClaimAttempt {
                id,
                until,
                now,
                stale_before,
            } => {
                let n = exec(
                    tx,
                        "UPDATE attempts SET next_check_at = ?2, state = 'unknown' WHERE id = ?1 AND ((state = 'unknown' AND COALESCE(next_check_at, 0) <= ?3) OR (state = 'in_flight' AND updated_at < ?4))",
                        params![id.0, until, now, stale_before],
                    )
                    .map_err(|e| classify(e, id.as_str()))?;
                if n == 0 {
                    return Err(StoreError::VersionConflict(id.0.clone()));
                }
            }
        }
    }
    Ok(())
}

const EVENT_COLUMNS: &str = "seq, id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data";
const EVENT_COLUMNS_E: &str = "e.seq, e.id, e.type, e.collection_id, e.session_id, e.payment_id, e.attempt_id, e.amount, e.currency_code, e.created_at, e.data";
const DELIVERY_COLUMNS: &str = "d.id, d.endpoint_id, d.event_seq, d.state, d.attempts, d.next_at, d.first_tried_at, d.last_error, d.delivered_at, d.redelivered_by, d.redelivered_at";

fn event_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    event_row_at(r, 0)
}

fn event_row_at(r: &Row<'_>, i: usize) -> rusqlite::Result<Event> {
    let kind: String = r.get(i + 2)?;
    Ok(Event {
        seq: r.get(i)?,
        id: r.get(i + 1)?,
        kind: EventType::parse(&kind).ok_or_else(|| bad("event type", &kind))?,
        payment_collection_id: r.get(i + 3)?,
        payment_session_id: r.get(i + 4)?,
        payment_id: r.get(i + 5)?,
        attempt_id: r.get(i + 6)?,
        amount: r.get(i + 7)?,
        currency_code: r.get(i + 8)?,
        created_at: r.get(i + 9)?,
        data: parse_json(r.get(i + 10)?),
    })
}

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    let state: String = r.get(3)?;
    Ok(Delivery {
        id: r.get(0)?,
        endpoint_id: r.get(1)?,
        event_seq: r.get(2)?,
        state: DeliveryState::parse(&state).ok_or_else(|| bad("delivery state", &state))?,
        attempts: r.get(4)?,
        next_at: r.get(5)?,
        first_tried_at: r.get(6)?,
        last_error: r.get(7)?,
        delivered_at: r.get(8)?,
        redelivered_by: r.get(9)?,
        redelivered_at: r.get(10)?,
    })
}

fn parse_json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn currency(code: String) -> rusqlite::Result<Currency> {
    Currency::parse(&code).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown currency `{code}` in the database").into(),
        )
    })
}

fn bad(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unknown {what} `{value}` in the database").into(),
    )
}

const SESSION_COLUMNS: &str = "id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version";

fn session_row(r: &Row<'_>) -> rusqlite::Result<PaymentSession> {
    let status: String = r.get(8)?;
    Ok(PaymentSession {
        id: SessionId(r.get(0)?),
        payment_collection_id: CollectionId(r.get(1)?),
        cart_id: r.get(2)?,
        cart: parse_json(r.get(3)?),
        context: parse_json(r.get(4)?),
        provider_id: r.get(5)?,
        is_selected: r.get(6)?,
        is_initiated: r.get(7)?,
        status: SessionStatus::parse(&status).ok_or_else(|| bad("session status", &status))?,
        data: parse_json(r.get(9)?),
        idempotency_key: r.get(10)?,
        amount: r.get(11)?,
        currency_code: currency(r.get(12)?)?,
        payment_authorized_at: r.get(13)?,
        metadata: parse_json(r.get(14)?),
        created_at: r.get(15)?,
        updated_at: r.get(16)?,
        version: r.get(17)?,
    })
}

const PAYMENT_COLUMNS: &str = "id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version";

fn payment_row(r: &Row<'_>) -> rusqlite::Result<Payment> {
    Ok(Payment {
        id: PaymentId(r.get(0)?),
        payment_session_id: SessionId(r.get(1)?),
        payment_collection_id: CollectionId(r.get(2)?),
        provider_id: r.get(3)?,
        amount: r.get(4)?,
        currency_code: currency(r.get(5)?)?,
        data: parse_json(r.get(6)?),
        captures: Vec::new(),
        refunds: Vec::new(),
        captured_at: r.get(7)?,
        canceled_at: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        version: r.get(11)?,
    })
}

fn with_movements(conn: &Connection, mut p: Payment) -> rusqlite::Result<Payment> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, amount, attempt_id, created_at FROM captures WHERE payment_id = ?1 ORDER BY created_at, id",
    )?;
    p.captures = stmt
        .query_map([&p.id.0], |r| {
            Ok(Capture {
                id: CaptureId(r.get(0)?),
                amount: r.get(1)?,
                attempt_id: AttemptId(r.get(2)?),
                created_at: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, amount, reason, attempt_id, created_at FROM refunds WHERE payment_id = ?1 ORDER BY created_at, id",
    )?;
    p.refunds = stmt
        .query_map([&p.id.0], |r| {
            Ok(Refund {
                id: RefundId(r.get(0)?),
                amount: r.get(1)?,
                reason: r.get(2)?,
                attempt_id: AttemptId(r.get(3)?),
                created_at: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(p)
}

const ATTEMPT_COLUMNS: &str = "id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, resends";

fn attempt_row(r: &Row<'_>) -> rusqlite::Result<Attempt> {
    let operation: String = r.get(4)?;
    let state: String = r.get(8)?;
    let resolution: Option<String> = r.get(14)?;
    Ok(Attempt {
        id: AttemptId(r.get(0)?),
        session_id: SessionId(r.get(1)?),
        payment_id: r.get::<_, Option<String>>(2)?.map(PaymentId),
        provider_id: r.get(3)?,
        operation: Operation::from_wire(&operation).ok_or_else(|| bad("operation", &operation))?,
        amount: r.get(5)?,
        currency_code: currency(r.get(6)?)?,
        idempotency_key: r.get(7)?,
        state: AttemptState::parse(&state).ok_or_else(|| bad("attempt state", &state))?,
        outcome: r.get::<_, Option<String>>(9)?.map(parse_json),
        error: r.get::<_, Option<String>>(10)?.map(parse_json),
        reason: r.get(11)?,
        checks: r.get(12)?,
        next_check_at: r.get(13)?,
        resolution: resolution.and_then(|t| serde_json::from_str(&t).ok()),
        created_at: r.get(15)?,
        updated_at: r.get(16)?,
        call_deadline_at: r.get(17)?,
        requested_by: r.get(18)?,
        owner_host: None,
        owner_epoch: None,
        resends: r.get(19)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let writer = match &self.writer {
            Some(w) if !self.beside || ops.iter().all(WriteOp::is_outbox_admin) => w,
            _ => {
                return Err(StoreError::Locked(format!(
                    "{} is open beside the payhost process that has it; make changes through that host",
                    self.path.display()
                )));
            }
        };
        let appends = ops
            .iter()
            .any(|op| matches!(op, WriteOp::AppendEvent { .. }));
        let (tx, rx) = oneshot::channel();
        writer
            .send((ops, tx))
            .map_err(|_| StoreError::Unavailable("the SQLite writer thread stopped".into()))?;
        let result = rx
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite writer thread stopped".into()))?;
        if appends && result.is_ok() {
            self.appended.notify_waiters();
        }
        result
    }

    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            c.query_row(
                "SELECT id, amount, currency_code, metadata, created_at, updated_at FROM payment_collections WHERE id = ?1",
                [id],
                |r| {
                    Ok(PaymentCollection {
                        id: CollectionId(r.get(0)?),
                        amount: r.get(1)?,
                        currency_code: currency(r.get(2)?)?,
                        metadata: parse_json(r.get(3)?),
                        created_at: r.get(4)?,
                        updated_at: r.get(5)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM payment_sessions WHERE id = ?1"
            ))?
            .query_row([id], session_row)
            .optional()
        })
        .await
    }

    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError> {
        let cart_id = cart_id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM payment_sessions WHERE cart_id = ?1 ORDER BY created_at, id"
            ))?
            .query_map([cart_id], session_row)?
            .collect()
        })
        .await
    }

    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM payment_sessions WHERE payment_collection_id = ?1 ORDER BY created_at, id"
            ))?
            .query_map([id], session_row)?
            .collect()
        })
        .await
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            let p = c
                .prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"
                ))?
                .query_row([id], payment_row)
                .optional()?;
            p.map(|p| with_movements(c, p)).transpose()
        })
        .await
    }

    async fn payment_and_session(
        &self,
        id: &PaymentId,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            let Some(p) = c
                .prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = ?1"
                ))?
                .query_row([id], payment_row)
                .optional()?
            else {
                return Ok(None);
            };
            let p = with_movements(c, p)?;
            let s = c
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM payment_sessions WHERE id = ?1"
                ))?
                .query_row([&p.payment_session_id.0], session_row)?;
            Ok(Some((p, s)))
        })
        .await
    }

    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            let p = c
                .prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE payment_session_id = ?1"
                ))?
                .query_row([id], payment_row)
                .optional()?;
            p.map(|p| with_movements(c, p)).transpose()
        })
        .await
    }

    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            let payments: Vec<Payment> = c
                .prepare_cached(&format!(
                    "SELECT {PAYMENT_COLUMNS} FROM payments WHERE payment_collection_id = ?1 ORDER BY created_at, id"
                ))?
                .query_map([id], payment_row)?
                .collect::<rusqlite::Result<_>>()?;
            payments.into_iter().map(|p| with_movements(c, p)).collect()
        })
        .await
    }

    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE id = ?1"
            ))?
            .query_row([id], attempt_row)
            .optional()
        })
        .await
    }

    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError> {
        let entity = entity.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE entity_id = ?1 ORDER BY created_at, id"
            ))?
            .query_map([entity], attempt_row)?
            .collect()
        })
        .await
    }

    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE state IN ('in_flight','unknown','needs_operator') ORDER BY created_at, id"
            ))?
            .query_map([], attempt_row)?
            .collect()
        })
        .await
    }

    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        let (provider_id, event_id) = (provider_id.to_owned(), event_id.to_owned());
        self.read(move |c| {
            c.query_row(
                "SELECT provider_id, event_id, body, session_id, action, received_at, applied_at FROM webhook_events WHERE provider_id = ?1 AND event_id = ?2",
                [provider_id, event_id],
                |r| {
                    Ok(WebhookEventRecord {
                        provider_id: r.get(0)?,
                        event_id: r.get(1)?,
                        body: r.get(2)?,
                        session_id: r.get(3)?,
                        action: r.get(4)?,
                        received_at: r.get(5)?,
                        applied_at: r.get(6)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let types = types.map(|t| serde_json::to_string(&t).unwrap_or_default());
        self.read(move |c| {
            let pruned_through: i64 = c.query_row(
                "SELECT v FROM event_meta WHERE k = 'pruned_through'",
                [],
                |r| r.get(0),
            )?;
            let events = c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 AND (?2 IS NULL OR type IN (SELECT value FROM json_each(?2))) ORDER BY seq LIMIT ?3"
                ))?
                .query_map(params![after, types, limit as i64], event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(EventPage {
                events,
                pruned_through,
            })
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        _claimer: &str,
        _claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        // One host per file and one deliverer per endpoint: what is due is this host's, and
        // nothing needs claiming. A session's run: its due deliveries from the first
        // undelivered one on, up to the first that is not due (see the PostgreSQL driver).
        let endpoint_id = endpoint_id.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "WITH open AS ( \
                   SELECT d.id, d.event_seq, d.state, d.next_at, \
                          row_number() OVER (PARTITION BY d.order_key ORDER BY d.event_seq) AS k, \
                          row_number() OVER (PARTITION BY d.order_key, (d.state = 'pending' AND d.next_at <= ?1) ORDER BY d.event_seq) AS r \
                   FROM event_deliveries d WHERE d.endpoint_id = ?3 AND d.state <> 'delivered'), \
                 wanted AS (SELECT id FROM open WHERE state = 'pending' AND next_at <= ?1 AND r = k ORDER BY event_seq LIMIT ?2) \
                 SELECT {DELIVERY_COLUMNS}, {EVENT_COLUMNS_E} FROM event_deliveries d JOIN events e ON e.seq = d.event_seq \
                 WHERE d.id IN (SELECT id FROM wanted) ORDER BY d.event_seq"
            ))?;
            st.query_map(params![now_ms(), limit as i64, endpoint_id], |r| {
                Ok((delivery_row(r)?, event_row_at(r, 11)?))
            })?
            .collect()
        })
        .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM event_deliveries d WHERE d.state = ?1 ORDER BY d.event_seq LIMIT ?2"
            ))?
            .query_map(params![state.as_str(), limit as i64], delivery_row)?
            .collect()
        })
        .await
    }

    fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    async fn key(&self, key: &str) -> Result<Option<StoredKey>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT operation, request_hash, response, attempt_id FROM idempotency_keys WHERE key = ?1",
                [key],
                |r| {
                    Ok(StoredKey {
                        operation: r.get(0)?,
                        request_hash: r.get(1)?,
                        response: r.get::<_, Option<String>>(2)?.map(parse_json),
                        attempt_id: r.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database, its WAL, its shared memory, its lock and the folder made for it are this
    /// user's alone; a database left readable by an older version is made private at open.
    #[test]
    fn the_database_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data/payhost.db");
        let store = SqliteStore::open(&db).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        for file in ["payhost.db", "payhost.db-wal", "payhost.db-shm"] {
            let path = dir.path().join("data").join(file);
            assert!(path.exists(), "{file}");
            assert_eq!(mode(&path), 0o600, "{file}");
        }
        assert_eq!(mode(&lock_path(&db)), 0o600);
        drop(store);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&db).unwrap();
        assert_eq!(mode(&db), 0o600, "made private again");
    }

    fn fresh() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("t.db")).unwrap();
        (dir, conn)
    }

    /// The opcodes of `sql` and of every trigger program it runs.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        let mut st = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let unbound = vec![rusqlite::types::Null; st.parameter_count()];
        st.query_map(rusqlite::params_from_iter(unbound), |r| {
            r.get::<_, String>(1)
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// Every insert and update of every table, with every CHECK, partial index and trigger it
    /// runs, is evaluated without building a temporary B-tree (SQLite builds one for `x IN
    /// (three or more constants)`, on every statement).
    #[test]
    fn no_write_builds_a_temporary_table() {
        let (_dir, mut conn) = fresh();
        migrate(&mut conn).unwrap();
        let tables: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(tables.len() >= 10, "{tables:?}");
        let mut statements = vec![INSERT_EVENT.to_owned()];
        for table in &tables {
            let columns: Vec<(String, bool)> = conn
                .prepare(&format!(
                    "SELECT name, pk FROM pragma_table_info('{table}')"
                ))
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? > 0)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let names: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
            statements.push(format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                vec!["?"; names.len()].join(", ")
            ));
            let set: Vec<String> = columns
                .iter()
                .filter(|c| !c.1)
                .map(|c| format!("{} = ?", c.0))
                .collect();
            let key: Vec<String> = columns
                .iter()
                .filter(|c| c.1)
                .map(|c| format!("{} = ?", c.0))
                .collect();
            if !set.is_empty() && !key.is_empty() {
                statements.push(format!(
                    "UPDATE {table} SET {} WHERE {}",
                    set.join(", "),
                    key.join(" AND ")
                ));
            }
        }
        for sql in statements {
            let ops = opcodes(&conn, &sql);
            assert!(ops.len() > 3, "{sql}: {ops:?}");
            assert!(
                !ops.iter().any(|op| op == "OpenEphemeral"),
                "{sql} builds a temporary B-tree: {ops:?}"
            );
        }
    }

    /// A database written by the schema before migration 9 keeps every row, and every rule,
    /// through the rebuild of its tables.
    #[test]
    fn migration_9_keeps_every_row_and_every_rule() {
        let (_dir, mut conn) = fresh();
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )
        .unwrap();
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 8) {
            conn.execute_batch(sql).unwrap();
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                [version],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO payment_collections VALUES ('pc_1', 2500, 'eur', '{}', 1, 1);
             INSERT INTO payment_sessions VALUES ('ps_1', 'pc_1', 'cart_1', '{}', '{}', 'system', 1, 1, 'authorized', '{\"k\":1}', 'psk_1', 2500, 'eur', 5, '{}', 1, 5, 3);
             INSERT INTO payment_sessions VALUES ('ps_2', 'pc_1', NULL, '{}', '{}', 'system', 0, 0, 'pending', '{}', 'psk_2', 2500, 'eur', NULL, '{}', 2, 2, 1);
             INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, created_at, updated_at, version) VALUES ('pay_1', 'ps_1', 'pc_1', 'system', 2500, 'eur', '{}', 5, 5, 1);
             INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, checks, created_at, updated_at, call_deadline_at, requested_by, resends)
                 VALUES ('att_1', 'ps_1', 'ps_1', NULL, 'system', 'authorize', 2500, 'eur', 'psk_1:att_1', 'succeeded', '{\"o\":1}', 0, 3, 4, 9, 'key_1', 2);
             INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at)
                 VALUES ('att_2', 'pay_1', 'ps_1', 'pay_1', 'system', 'capture', 2500, 'eur', 'psk_1:att_2', 'unknown', 4, 6, 7);
             INSERT INTO events (id, type, created_at, data) VALUES ('evt_1', 'payment.authorized', 5, '{}');
             INSERT INTO event_deliveries (id, endpoint_id, event_seq, order_key, state, attempts, next_at, created_at, last_error) VALUES ('evt_1:erp', 'erp', 1, 'ps_1', 'parked', 7, 9, 5, 'HTTP 500');",
        )
        .unwrap();
        let columns = |conn: &Connection, table: &str| -> Vec<String> {
            conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        // Every column the tables had at version 8, value for value (later migrations may add
        // columns of their own).
        let dump = |conn: &Connection, table: &str, cols: &[String]| -> Vec<String> {
            conn.prepare(&format!(
                "SELECT json_array({}) FROM {table} ORDER BY 1",
                cols.join(", ")
            ))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        let tables = [
            "payment_sessions",
            "attempts",
            "event_deliveries",
            "payments",
        ];
        let cols: Vec<Vec<String>> = tables.iter().map(|t| columns(&conn, t)).collect();
        let before: Vec<Vec<String>> = tables
            .iter()
            .zip(&cols)
            .map(|(t, c)| dump(&conn, t, c))
            .collect();
        migrate(&mut conn).unwrap();
        let after: Vec<Vec<String>> = tables
            .iter()
            .zip(&cols)
            .map(|(t, c)| dump(&conn, t, c))
            .collect();
        assert_eq!(before, after);
        assert_eq!(before[1].len(), 2);
        let version: i64 = conn
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, MIGRATIONS.last().unwrap().0);

        let refused = |sql: &str, says: &str| {
            let e = conn.execute_batch(sql).unwrap_err().to_string();
            assert!(e.contains(says), "{sql}: {e}");
        };
        // The rules the rebuilt tables carry, each still enforced.
        refused(
            "UPDATE payment_sessions SET status = 'bogus' WHERE id = 'ps_2'",
            "CHECK constraint failed",
        );
        refused(
            "UPDATE payment_sessions SET status = 'pending' WHERE id = 'ps_1'",
            "invariant: a terminal session status cannot change",
        );
        refused(
            "INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_3', 'pay_1', 'ps_1', 'system', 'capture', 1, 'eur', 'k3', 'in_flight', 0, 8, 8)",
            "UNIQUE constraint failed: attempts.entity_id",
        );
        refused(
            "UPDATE attempts SET state = 'bogus' WHERE id = 'att_2'",
            "CHECK constraint failed",
        );
        refused(
            "UPDATE attempts SET state = 'in_flight' WHERE id = 'att_1'",
            "invariant: a settled attempt cannot change",
        );
        refused(
            "DELETE FROM attempts WHERE id = 'att_2'",
            "invariant: attempts are never deleted",
        );
        refused(
            "INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_4', 'ps_2', 'ps_2', 'system', 'authorize', 1, 'eur', 'psk_1:att_1', 'in_flight', 0, 8, 8)",
            "UNIQUE constraint failed: attempts.idempotency_key",
        );
        refused(
            "UPDATE event_deliveries SET state = 'bogus'",
            "CHECK constraint failed",
        );
        refused(
            "INSERT INTO payment_sessions VALUES ('ps_3', 'pc_missing', NULL, '{}', '{}', 'system', 0, 0, 'pending', '{}', 'psk_3', 1, 'eur', NULL, '{}', 1, 1, 1)",
            "FOREIGN KEY constraint failed",
        );
        refused(
            "UPDATE payments SET payment_session_id = 'ps_missing' WHERE id = 'pay_1'",
            "FOREIGN KEY constraint failed",
        );
        // The attempt left open still holds its entity: settling it frees the slot.
        conn.execute_batch(
            "UPDATE attempts SET state = 'succeeded' WHERE id = 'att_2';
             INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_3', 'pay_1', 'ps_1', 'system', 'capture', 1, 'eur', 'k3', 'in_flight', 0, 8, 8);",
        )
        .unwrap();
        let indexes: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND name IN ('payment_sessions_cart', 'payment_sessions_collection', 'attempts_one_open', 'attempts_entity', 'event_deliveries_open', 'event_deliveries_event')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 6);
        let leftovers: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%_new%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(leftovers, 0);
    }
}
