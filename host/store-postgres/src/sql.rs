//! What every statement uses: errors classified into [`StoreError`]s, JSON as text, and rows
//! handed to the shared decoders.

use payhost_core::store::StoreError;
use payhost_store_rows::{Record, RowError};
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// How a server that is no longer the primary refuses a write (SQLSTATE 25006).
pub(crate) const READ_ONLY: &str = "read-only transaction";

/// A failure to even start a transaction: the connection or the server.
pub(crate) fn connection_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION => {
            StoreError::Unavailable(format!("{READ_ONLY}: {}", db.message()))
        }
        _ => unavailable(e),
    }
}

/// A JSON value as the text a column keeps.
pub(crate) fn json(v: &Value) -> String {
    v.to_string()
}

/// What a failed statement means: a trigger's `invariant:`, the open-attempt or key
/// uniqueness, another constraint, a server that is not the primary, a lost race, or an
/// unavailable database.
pub(crate) fn classify(e: tokio_postgres::Error, what: &str) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let message = db.message();
        if let Some(rest) = message.strip_prefix("invariant: ") {
            return StoreError::Invariant(rest.to_owned());
        }
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            return match db.constraint() {
                Some("attempts_one_open") => StoreError::AttemptOpen(what.to_owned()),
                Some("idempotency_keys_pkey") | Some("webhook_events_pkey") => {
                    StoreError::KeyExists(what.to_owned())
                }
                _ => StoreError::Invariant(format!("{what}: {message}")),
            };
        }
        if db.code().code().starts_with("23") {
            return StoreError::Invariant(format!("{what}: {message}"));
        }
        if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION {
            return StoreError::Unavailable(format!(
                "{READ_ONLY}: the server is not the primary ({})",
                db.message()
            ));
        }
        if *db.code() == SqlState::T_R_SERIALIZATION_FAILURE
            || *db.code() == SqlState::T_R_DEADLOCK_DETECTED
        {
            return StoreError::VersionConflict(what.to_owned());
        }
    }
    unavailable(e)
}

/// A PostgreSQL row as the shared decoders read it.
pub(crate) struct Columns<'a>(pub(crate) &'a Row);

impl Record for Columns<'_> {
    fn text(&self, i: usize) -> Result<String, String> {
        self.0.try_get(i).map_err(|e| e.to_string())
    }

    fn opt_text(&self, i: usize) -> Result<Option<String>, String> {
        self.0.try_get(i).map_err(|e| e.to_string())
    }

    fn int(&self, i: usize) -> Result<i64, String> {
        self.0.try_get(i).map_err(|e| e.to_string())
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, String> {
        self.0.try_get(i).map_err(|e| e.to_string())
    }

    fn flag(&self, i: usize) -> Result<bool, String> {
        self.0.try_get(i).map_err(|e| e.to_string())
    }
}

/// Decodes a row with one of the shared decoders.
pub(crate) fn decode<'a, T>(
    r: &'a Row,
    at: usize,
    decoder: fn(&Columns<'a>, usize) -> Result<T, RowError>,
) -> Result<T, StoreError> {
    decoder(&Columns(r), at).map_err(StoreError::from)
}

/// A column read by index: a type or NULL the column cannot hold is an unavailable store
/// (never a panic).
pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    r.try_get(i).map_err(|e| {
        let column = r.columns().get(i).map_or("?", |c| c.name());
        StoreError::Unavailable(format!("unreadable column {column}: {e}"))
    })
}
