//! Copying the WAL back into the database without delaying writes. SQLite's automatic
//! checkpoint runs on the committing connection, so its copying and syncing would delay every
//! write waiting behind it; here a thread of its own does the bulk, and the writer finishes.
//!
//! A PASSIVE checkpoint never blocks the writer or a reader, and with `synchronous = FULL` it
//! syncs the WAL before and the database after copying, as the automatic one does. But it never
//! lets the WAL start again from its beginning: only a write that begins when every frame is in
//! the database does, and under load commits keep coming while a pass copies. So the work is
//! split: the [`Checkpointer`] thread copies the bulk, then the writer, between two batches,
//! finishes with a RESTART checkpoint of the few frames committed meanwhile
//! ([`finish_checkpoint`], waiting at most [`RESTART_WAIT`] for readers), after which its next
//! commit starts the WAL again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use payhost_core::store::StoreError;
use rusqlite::Connection;

use crate::sql::{BUSY_WAIT, connect, unavailable};

/// Frames in the WAL past which it is copied back into the database (SQLite's own default).
pub(crate) const CHECKPOINT_FRAMES: i32 = 1000;
/// How long the writer's finishing RESTART checkpoint waits for readers before it gives up
/// (the checkpoint thread is then asked for another pass).
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

thread_local! {
    /// Frames in the WAL after this thread's last commit: set by the WAL hook, which SQLite
    /// calls on the committing thread (each store has its own writer thread).
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The WAL hook: it replaces SQLite's automatic checkpoint on the writer's connection.
pub(crate) fn note_wal_frames(
    _: &rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Frames in the WAL after the calling thread's last commit.
pub(crate) fn wal_frames() -> i32 {
    WAL_FRAMES.get()
}

/// The checkpoint thread, on its own connection.
pub(crate) struct Checkpointer {
    /// `(wanted, stop)`.
    state: Mutex<(bool, bool)>,
    wake: Condvar,
    /// Set when a pass asked for has ended: the writer may finish the checkpoint.
    copied: AtomicBool,
}

impl Checkpointer {
    /// Starts the thread on a connection of its own to `path`.
    pub(crate) fn start(path: &Path) -> Result<Arc<Checkpointer>, StoreError> {
        let conn = connect(path)?;
        let me = Arc::new(Checkpointer {
            state: Mutex::new((false, false)),
            wake: Condvar::new(),
            copied: AtomicBool::new(false),
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
            self.copied.store(true, Ordering::Release);
        }
    }

    /// Asks for a checkpoint pass (one already asked for is not asked again).
    pub(crate) fn ask(&self) {
        self.copied.store(false, Ordering::Release);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.wake.notify_one();
    }

    /// Whether the pass last asked for has ended (once: it reads `false` after).
    pub(crate) fn take_copied(&self) -> bool {
        self.copied.swap(false, Ordering::AcqRel)
    }

    /// Ends the thread.
    pub(crate) fn stop(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.wake.notify_one();
    }
}

/// Copies what the checkpoint thread's pass left (the frames committed while it ran) with a
/// RESTART checkpoint, so that the writer's next commit starts the WAL from its beginning. It
/// gives up after [`RESTART_WAIT`] if a reader is still on the WAL.
pub(crate) fn finish_checkpoint(conn: &Connection) {
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
