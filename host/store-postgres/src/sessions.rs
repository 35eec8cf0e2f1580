//! Payment collections and sessions: each write's statement and its `payhost_write` encoding,
//! and the reads.

use deadpool_postgres::Transaction;
use payhost_core::domain::{PaymentCollection, PaymentSession, SessionId};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, COLLECTION_COLUMNS, SESSION_COLUMNS};

use crate::PostgresStore;
use crate::sql::{classify, decode, json};
use crate::write::JsonObject;

pub(crate) async fn insert_collection(
    tx: &Transaction<'_>,
    c: &PaymentCollection,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO payment_collections (id, amount, currency_code, metadata, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6)",
        &[&c.id.0, &c.amount, &c.currency_code.code(), &json(&c.metadata), &c.created_at, &c.updated_at],
    )
    .await
    .map_err(|e| classify(e, c.id.as_str()))?;
    Ok(())
}

pub(crate) fn encode_insert_collection(c: &PaymentCollection, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_collection")
        .str("id", &c.id.0)
        .int("amount", c.amount)
        .str("currency_code", c.currency_code.code())
        .json_text("metadata", &c.metadata)
        .int("created_at", c.created_at)
        .int("updated_at", c.updated_at)
        .end();
}

pub(crate) async fn insert_session(
    tx: &Transaction<'_>,
    s: &PaymentSession,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version, reference, account_holder_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20)",
        &[&s.id.0, &s.payment_collection_id.0, &s.cart_id, &json(&s.cart), &json(&s.context), &s.provider_id, &s.is_selected, &s.is_initiated, &s.status.as_str(), &json(&s.data), &s.idempotency_key, &s.amount, &s.currency_code.code(), &s.payment_authorized_at, &json(&s.metadata), &s.created_at, &s.updated_at, &s.version, &s.reference, &s.account_holder_id.as_ref().map(|h| h.0.as_str())],
    )
    .await
    .map_err(|e| classify(e, s.id.as_str()))?;
    Ok(())
}

pub(crate) fn encode_insert_session(s: &PaymentSession, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_session")
        .str("id", &s.id.0)
        .str("payment_collection_id", &s.payment_collection_id.0)
        .opt_str("cart_id", s.cart_id.as_deref())
        .json_text("cart", &s.cart)
        .json_text("context", &s.context)
        .str("provider_id", &s.provider_id)
        .bool("is_selected", s.is_selected)
        .bool("is_initiated", s.is_initiated)
        .str("status", s.status.as_str())
        .json_text("data", &s.data)
        .str("idempotency_key", &s.idempotency_key)
        .int("amount", s.amount)
        .str("currency_code", s.currency_code.code())
        .opt_int("payment_authorized_at", s.payment_authorized_at)
        .json_text("metadata", &s.metadata)
        .int("created_at", s.created_at)
        .int("updated_at", s.updated_at)
        .int("version", s.version)
        .opt_str("reference", s.reference.as_deref())
        .opt_str(
            "account_holder_id",
            s.account_holder_id.as_ref().map(|h| h.0.as_str()),
        )
        .end();
}

/// Writes the session if it is still at `expected_version` (else a version conflict).
pub(crate) async fn update_session(
    tx: &Transaction<'_>,
    s: &PaymentSession,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE payment_sessions SET cart_id=$2, cart=$3, context=$4, is_selected=$5, is_initiated=$6, status=$7, data=$8, amount=$9, payment_authorized_at=$10, metadata=$11, updated_at=$12, version=$13 WHERE id=$1 AND version=$14",
            &[&s.id.0, &s.cart_id, &json(&s.cart), &json(&s.context), &s.is_selected, &s.is_initiated, &s.status.as_str(), &json(&s.data), &s.amount, &s.payment_authorized_at, &json(&s.metadata), &s.updated_at, &s.version, &expected_version],
        )
        .await
        .map_err(|e| classify(e, s.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(s.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn encode_update_session(s: &PaymentSession, expected_version: i64, out: &mut Vec<u8>) {
    JsonObject::new(out, "update_session")
        .str("id", &s.id.0)
        .opt_str("cart_id", s.cart_id.as_deref())
        .json_text("cart", &s.cart)
        .json_text("context", &s.context)
        .bool("is_selected", s.is_selected)
        .bool("is_initiated", s.is_initiated)
        .str("status", s.status.as_str())
        .json_text("data", &s.data)
        .int("amount", s.amount)
        .opt_int("payment_authorized_at", s.payment_authorized_at)
        .json_text("metadata", &s.metadata)
        .int("updated_at", s.updated_at)
        .int("version", s.version)
        .int("expected_version", expected_version)
        .end();
}

/// Selects the session, deselecting the others of its collection and of its cart.
pub(crate) async fn select_session(tx: &Transaction<'_>, id: &SessionId) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE payment_sessions SET is_selected = (id = $1), version = version + 1 WHERE id = $1 OR (is_selected AND (payment_collection_id = (SELECT payment_collection_id FROM payment_sessions WHERE id = $1) OR (cart_id IS NOT NULL AND cart_id = (SELECT cart_id FROM payment_sessions WHERE id = $1))))",
        &[&id.0],
    )
    .await
    .map_err(|e| classify(e, id.as_str()))?;
    Ok(())
}

impl PostgresStore {
    pub(crate) async fn read_collection(
        &self,
        id: &str,
    ) -> Result<Option<PaymentCollection>, StoreError> {
        self.query_opt(
            &format!("SELECT {COLLECTION_COLUMNS} FROM payment_collections c WHERE c.id = $1"),
            &[&id],
        )
        .await?
        .map(|r| decode(&r, 0, rows::collection))
        .transpose()
    }

    /// The sessions whose `column` is `value`, oldest first.
    pub(crate) async fn sessions_where(
        &self,
        column: &str,
        value: &str,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.query(
            &format!("SELECT {SESSION_COLUMNS} FROM payment_sessions s WHERE s.{column} = $1 ORDER BY s.created_at, s.id"),
            &[&value],
        )
        .await?
        .iter()
        .map(|r| decode(r, 0, rows::session))
        .collect()
    }
}
