//! The host's clock: Unix milliseconds, replaceable in tests. On a shared store, only the
//! database's clock decides ownership; this one stamps what a host writes on its own.

use std::time::{SystemTime, UNIX_EPOCH};

/// The host's clock, shared with providers through host services; tests can replace it.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix milliseconds.
    fn now_unix_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}
