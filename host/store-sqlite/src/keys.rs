//! Idempotency keys: claimed before an operation runs, completed with its answer, linked to
//! the attempt that moved money, released when nothing happened.

use payhost_core::domain::Timestamp;
use payhost_core::store::{StoreError, StoredKey};
use payhost_store_rows::{self as rows, KEY_COLUMNS};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::sql::{classify, decode, exec, json};

pub(crate) fn claim(
    tx: &Connection,
    key: &str,
    operation: &str,
    request_hash: &str,
    at: Timestamp,
    claim_id: &str,
) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO idempotency_keys (key, operation, request_hash, response, created_at, claim_id) VALUES (?1,?2,?3,NULL,?4,?5)",
        params![key, operation, request_hash, at, claim_id],
    )
    .map_err(|e| classify(e, key))?;
    Ok(())
}

pub(crate) fn complete(tx: &Connection, key: &str, response: &Value) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE idempotency_keys SET response = ?2 WHERE key = ?1",
        params![key, json(response)],
    )
    .map_err(|e| classify(e, key))?;
    Ok(())
}

/// Removes this claim of the key, if it has no answer and no attempt.
pub(crate) fn release(tx: &Connection, key: &str, claim_id: &str) -> Result<(), StoreError> {
    exec(
        tx,
        "DELETE FROM idempotency_keys WHERE key = ?1 AND response IS NULL AND attempt_id IS NULL AND claim_id IS ?2",
        params![key, claim_id],
    )
    .map_err(|e| classify(e, key))?;
    Ok(())
}

/// Removes the key of an attempt that was resolved as never made; another holder of the key
/// makes it a `KeyExists`.
pub(crate) fn forget(tx: &Connection, key: &str, attempt_id: &str) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "DELETE FROM idempotency_keys WHERE key = ?1 AND attempt_id = ?2",
        params![key, attempt_id],
    )
    .map_err(|e| classify(e, key))?;
    if n == 0 {
        return Err(StoreError::KeyExists(key.to_owned()));
    }
    Ok(())
}

pub(crate) fn link(tx: &Connection, key: &str, attempt_id: &str) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE idempotency_keys SET attempt_id = ?2 WHERE key = ?1",
        params![key, attempt_id],
    )
    .map_err(|e| classify(e, key))?;
    Ok(())
}

/// Removes the claims older than `older_than` that have neither an answer nor an attempt.
pub(crate) fn release_pending(tx: &Connection, older_than: Timestamp) -> Result<(), StoreError> {
    exec(
        tx,
        "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND created_at < ?1",
        params![older_than],
    )
    .map_err(|e| classify(e, "idempotency keys"))?;
    Ok(())
}

pub(crate) fn key(c: &Connection, key: &str) -> rusqlite::Result<Option<StoredKey>> {
    c.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM idempotency_keys k WHERE k.key = ?1"
    ))?
    .query_row([key], |r| decode(r, 0, rows::key))
    .optional()
}
