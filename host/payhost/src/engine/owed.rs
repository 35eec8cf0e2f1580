//! Writes the host owes the store after it failed: releasing a claimed key, completing one,
//! marking an attempt unknown or failed. They are kept in memory (bounded) and written, in
//! order, as soon as the store answers again — at every reconciler pass — so a store that blinked
//! leaves no key claimed and no attempt in flight for ever. Known provider outcomes go through the
//! late-answer queue instead, which settles them the same way. If the process dies first, the
//! write-ahead records and the reconciler (and, on a shared store, the leases) cover it.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::store::{Store, StoreError, WriteOp};

/// At most this many owed writes are kept; past it the oldest goes (its key or attempt is then
/// left to start-up recovery and the reconciler, which are correct, only slower).
const MAX_OWED: usize = 100_000;

/// The writes owed to the store.
#[derive(Debug, Default)]
pub(super) struct OwedWrites(Mutex<VecDeque<(&'static str, Vec<WriteOp>)>>);

/// Whether a store error means "try again later" (rather than "this write is wrong").
pub(super) fn is_transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_))
}

impl OwedWrites {
    /// Keeps `ops` to write once the store answers.
    pub(super) fn push(&self, what: &'static str, ops: Vec<WriteOp>) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_OWED {
            let (dropped, _) = q.pop_front().unwrap_or(("?", Vec::new()));
            tracing::error!(
                kept = MAX_OWED,
                "too many writes owed to an unreachable store; dropping the oldest ({dropped}); recovery will redo it"
            );
        }
        tracing::warn!(what, "the store failed; this write is kept and retried");
        q.push_back((what, ops));
        crate::metrics::global().owed_writes.set(q.len() as i64);
    }

    /// Writes what is owed, in order, until the store fails again. Returns how many were
    /// written.
    pub(super) async fn flush(&self, store: &dyn Store) -> usize {
        let mut written = 0;
        loop {
            let next = {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                q.pop_front()
            };
            let Some((what, ops)) = next else { break };
            match store.write(ops.clone()).await {
                Ok(()) => written += 1,
                Err(e) if is_transient(&e) => {
                    self.0
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_front((what, ops));
                    break;
                }
                // Overtaken: the attempt settled meanwhile, the key is gone or another host's.
                Err(e) => {
                    tracing::info!(what, code = e.code(), "an owed write is moot now: {e}");
                }
            }
        }
        let left = self.0.lock().unwrap_or_else(|e| e.into_inner()).len();
        crate::metrics::global().owed_writes.set(left as i64);
        if written > 0 {
            tracing::info!(written, left, "owed writes written");
        }
        written
    }
}
