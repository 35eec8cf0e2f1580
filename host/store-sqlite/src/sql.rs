//! What every statement uses: opening a connection, the statement cache, errors classified
//! into [`StoreError`]s, JSON as text, and rows handed to the shared decoders.

use std::path::Path;

use payhost_core::domain::Timestamp;
use payhost_core::store::StoreError;
use payhost_store_rows::{Record, RowError};
use rusqlite::{Connection, Row};
use serde_json::Value;

/// How long a connection waits for the database's lock before it fails.
pub(crate) const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A connection in WAL mode with `synchronous = FULL`, foreign keys on and every statement
/// payhost runs kept prepared.
pub(crate) fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(BUSY_WAIT).map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(unavailable)?;
    // rusqlite keeps 16 by default.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Runs one statement through the connection's statement cache: a write's statements are
/// parsed once per connection, not once per write.
pub(crate) fn exec(
    tx: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

/// A JSON value as the text a column keeps.
pub(crate) fn json(v: &Value) -> String {
    v.to_string()
}

/// What a failed statement means: a trigger's `invariant:`, the open-attempt or key
/// uniqueness, another constraint, or an unavailable database.
pub(crate) fn classify(e: rusqlite::Error, what: &str) -> StoreError {
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

/// This machine's clock (one host per file: its clock is the only one).
pub(crate) fn now_ms() -> Timestamp {
    payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock)
}

/// A SQLite row as the shared decoders read it.
pub(crate) struct Columns<'a, 'r>(pub(crate) &'a Row<'r>);

impl Record for Columns<'_, '_> {
    fn text(&self, i: usize) -> Result<String, String> {
        self.0.get(i).map_err(|e| e.to_string())
    }

    fn opt_text(&self, i: usize) -> Result<Option<String>, String> {
        self.0.get(i).map_err(|e| e.to_string())
    }

    fn int(&self, i: usize) -> Result<i64, String> {
        self.0.get(i).map_err(|e| e.to_string())
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, String> {
        self.0.get(i).map_err(|e| e.to_string())
    }

    fn flag(&self, i: usize) -> Result<bool, String> {
        self.0.get(i).map_err(|e| e.to_string())
    }
}

/// Decodes a row with one of the shared decoders, its error carried as the statement's. It
/// travels as `ToSqlConversionFailure`, the one variant without the `functions` feature whose
/// text is the inner error's alone.
pub(crate) fn decode<'a, 'r, T>(
    r: &'a Row<'r>,
    at: usize,
    decoder: fn(&Columns<'a, 'r>, usize) -> Result<T, RowError>,
) -> rusqlite::Result<T> {
    decoder(&Columns(r), at).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}
