//! Idempotency keys: each write's statement and its `payhost_write` encoding. A key is claimed
//! by a host; one claimed by a host whose lease lapsed, and linked to nothing (it moved no
//! money), is taken over at once.

use deadpool_postgres::Transaction;
use payhost_core::domain::Timestamp;
use payhost_core::store::{StoreError, StoredKey};
use payhost_store_rows::{self as rows, KEY_COLUMNS};
use serde_json::Value;

use crate::PostgresStore;
use crate::sql::{classify, decode, json};
use crate::write::{JsonObject, Owner};

pub(crate) async fn claim(
    tx: &Transaction<'_>,
    key: &str,
    operation: &str,
    request_hash: &str,
    at: Timestamp,
    claim_id: &str,
    me: &Owner,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "INSERT INTO idempotency_keys AS k (key, operation, request_hash, response, created_at, owner_host, owner_epoch, claim_id) VALUES ($1,$2,$3,NULL,$4,$5,$6,$7) ON CONFLICT (key) DO UPDATE SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at, owner_host = EXCLUDED.owner_host, owner_epoch = EXCLUDED.owner_epoch, claim_id = EXCLUDED.claim_id WHERE k.response IS NULL AND k.attempt_id IS NULL AND NOT payhost_host_live(k.owner_host, k.owner_epoch)",
            &[&key, &operation, &request_hash, &at, &me.host, &me.epoch, &claim_id],
        )
        .await
        .map_err(|e| classify(e, key))?;
    if n == 0 {
        return Err(StoreError::KeyExists(key.to_owned()));
    }
    Ok(())
}

pub(crate) fn encode_claim(
    key: &str,
    operation: &str,
    request_hash: &str,
    at: Timestamp,
    claim_id: &str,
    out: &mut Vec<u8>,
) {
    JsonObject::new(out, "claim_key")
        .str("key", key)
        .str("operation", operation)
        .str("request_hash", request_hash)
        .int("at", at)
        .str("claim_id", claim_id)
        .end();
}

pub(crate) async fn complete(
    tx: &Transaction<'_>,
    key: &str,
    response: &Value,
    me: &Owner,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE idempotency_keys SET response = $2 WHERE key = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
        &[&key, &json(response), &me.host, &me.epoch],
    )
    .await
    .map_err(|e| classify(e, key))?;
    Ok(())
}

pub(crate) fn encode_complete(key: &str, response: &Value, out: &mut Vec<u8>) {
    JsonObject::new(out, "complete_key")
        .str("key", key)
        .json_text("response", response)
        .end();
}

/// Removes this claim of the key, if it has no answer and no attempt.
pub(crate) async fn release(
    tx: &Transaction<'_>,
    key: &str,
    claim_id: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM idempotency_keys WHERE key = $1 AND response IS NULL AND attempt_id IS NULL AND claim_id IS NOT DISTINCT FROM $2",
        &[&key, &claim_id],
    )
    .await
    .map_err(|e| classify(e, key))?;
    Ok(())
}

pub(crate) fn encode_release(key: &str, claim_id: &str, out: &mut Vec<u8>) {
    JsonObject::new(out, "release_key")
        .str("key", key)
        .str("claim_id", claim_id)
        .end();
}

/// Removes the key of an attempt that was resolved as never made; another holder of the key
/// makes it a `KeyExists`.
pub(crate) async fn forget(
    tx: &Transaction<'_>,
    key: &str,
    attempt_id: &str,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "DELETE FROM idempotency_keys WHERE key = $1 AND attempt_id = $2",
            &[&key, &attempt_id],
        )
        .await
        .map_err(|e| classify(e, key))?;
    if n == 0 {
        return Err(StoreError::KeyExists(key.to_owned()));
    }
    Ok(())
}

pub(crate) fn encode_forget(key: &str, attempt_id: &str, out: &mut Vec<u8>) {
    JsonObject::new(out, "forget_key")
        .str("key", key)
        .str("attempt_id", attempt_id)
        .end();
}

pub(crate) async fn link(
    tx: &Transaction<'_>,
    key: &str,
    attempt_id: &str,
    me: &Owner,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE idempotency_keys SET attempt_id = $2 WHERE key = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
            &[&key, &attempt_id, &me.host, &me.epoch],
        )
        .await
        .map_err(|e| classify(e, key))?;
    if n == 0 {
        return Err(me.fenced(&format!("linking key {key}")));
    }
    Ok(())
}

pub(crate) fn encode_link(key: &str, attempt_id: &str, out: &mut Vec<u8>) {
    JsonObject::new(out, "link_key")
        .str("key", key)
        .str("attempt_id", attempt_id)
        .end();
}

/// Removes the claims with neither an answer nor an attempt whose host's lease lapsed (nothing
/// moved under them); on a store without leases yet, those older than `older_than`.
pub(crate) async fn release_pending(
    tx: &Transaction<'_>,
    older_than: Timestamp,
    me: &Owner,
) -> Result<(), StoreError> {
    let released = if me.leased() {
        tx.execute(
            "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND NOT payhost_host_live(owner_host, owner_epoch)",
            &[],
        )
        .await
    } else {
        tx.execute(
            "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND created_at < $1",
            &[&older_than],
        )
        .await
    };
    released.map_err(|e| classify(e, "idempotency keys"))?;
    Ok(())
}

impl PostgresStore {
    pub(crate) async fn read_key(&self, key: &str) -> Result<Option<StoredKey>, StoreError> {
        self.query_opt(
            &format!("SELECT {KEY_COLUMNS} FROM idempotency_keys k WHERE k.key = $1"),
            &[&key],
        )
        .await?
        .map(|r| decode(&r, 0, rows::key))
        .transpose()
    }
}
