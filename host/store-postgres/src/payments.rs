//! Payments with their captures and refunds: each write's statement and its `payhost_write`
//! encoding, and how a payment is read with its movements in one statement.

use deadpool_postgres::Transaction;
use payhost_core::domain::{
    AttemptId, Capture, CaptureId, Payment, PaymentId, PaymentSession, Refund, RefundId,
};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, PAYMENT_COLUMNS, RowError, SESSION_COLUMNS};
use tokio_postgres::Row;

use crate::PostgresStore;
use crate::sql::{classify, decode, get, json};
use crate::write::JsonObject;

pub(crate) async fn insert(tx: &Transaction<'_>, p: &Payment) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
        &[&p.id.0, &p.payment_session_id.0, &p.payment_collection_id.0, &p.provider_id, &p.amount, &p.currency_code.code(), &json(&p.data), &p.captured_at, &p.canceled_at, &p.created_at, &p.updated_at, &p.version],
    )
    .await
    .map_err(|e| classify(e, p.id.as_str()))?;
    Ok(())
}

pub(crate) fn encode_insert(p: &Payment, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_payment")
        .str("id", &p.id.0)
        .str("payment_session_id", &p.payment_session_id.0)
        .str("payment_collection_id", &p.payment_collection_id.0)
        .str("provider_id", &p.provider_id)
        .int("amount", p.amount)
        .str("currency_code", p.currency_code.code())
        .json_text("data", &p.data)
        .opt_int("captured_at", p.captured_at)
        .opt_int("canceled_at", p.canceled_at)
        .int("created_at", p.created_at)
        .int("updated_at", p.updated_at)
        .int("version", p.version)
        .end();
}

/// Writes the payment if it is still at `expected_version` (else a version conflict).
pub(crate) async fn update(
    tx: &Transaction<'_>,
    p: &Payment,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE payments SET data=$2, captured_at=$3, canceled_at=$4, updated_at=$5, version=$6 WHERE id=$1 AND version=$7",
            &[&p.id.0, &json(&p.data), &p.captured_at, &p.canceled_at, &p.updated_at, &p.version, &expected_version],
        )
        .await
        .map_err(|e| classify(e, p.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(p.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn encode_update(p: &Payment, expected_version: i64, out: &mut Vec<u8>) {
    JsonObject::new(out, "update_payment")
        .str("id", &p.id.0)
        .json_text("data", &p.data)
        .opt_int("captured_at", p.captured_at)
        .opt_int("canceled_at", p.canceled_at)
        .int("updated_at", p.updated_at)
        .int("version", p.version)
        .int("expected_version", expected_version)
        .end();
}

pub(crate) async fn insert_capture(
    tx: &Transaction<'_>,
    payment: &PaymentId,
    c: &Capture,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO captures (id, payment_id, amount, attempt_id, created_at) VALUES ($1,$2,$3,$4,$5)",
        &[&c.id.0, &payment.0, &c.amount, &c.attempt_id.0, &c.created_at],
    )
    .await
    .map_err(|e| classify(e, payment.as_str()))?;
    Ok(())
}

pub(crate) fn encode_insert_capture(payment: &PaymentId, c: &Capture, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_capture")
        .str("id", &c.id.0)
        .str("payment_id", &payment.0)
        .int("amount", c.amount)
        .str("attempt_id", &c.attempt_id.0)
        .int("created_at", c.created_at)
        .end();
}

pub(crate) async fn insert_refund(
    tx: &Transaction<'_>,
    payment: &PaymentId,
    r: &Refund,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO refunds (id, payment_id, amount, reason, attempt_id, created_at) VALUES ($1,$2,$3,$4,$5,$6)",
        &[&r.id.0, &payment.0, &r.amount, &r.reason, &r.attempt_id.0, &r.created_at],
    )
    .await
    .map_err(|e| classify(e, payment.as_str()))?;
    Ok(())
}

pub(crate) fn encode_insert_refund(payment: &PaymentId, r: &Refund, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_refund")
        .str("id", &r.id.0)
        .str("payment_id", &payment.0)
        .int("amount", r.amount)
        .opt_str("reason", r.reason.as_deref())
        .str("attempt_id", &r.attempt_id.0)
        .int("created_at", r.created_at)
        .end();
}

/// A payment's captures and refunds as two JSON arrays, read after [`PAYMENT_COLUMNS`] (one
/// statement for a payment and its movements).
const MOVEMENTS: &str = "(SELECT COALESCE(json_agg(json_build_array(c.id, c.amount, c.attempt_id, c.created_at) ORDER BY c.created_at, c.id), '[]')::TEXT FROM captures c WHERE c.payment_id = p.id), \
     (SELECT COALESCE(json_agg(json_build_array(r.id, r.amount, r.reason, r.attempt_id, r.created_at) ORDER BY r.created_at, r.id), '[]')::TEXT FROM refunds r WHERE r.payment_id = p.id)";

/// A payment read with [`PAYMENT_COLUMNS`] and [`MOVEMENTS`] from column `at` on.
fn with_movements(r: &Row, at: usize) -> Result<Payment, StoreError> {
    let mut p = decode(r, at, rows::payment)?;
    let unreadable = |table: &'static str, e: serde_json::Error| {
        StoreError::from(RowError {
            table,
            column: format!("(of payment {})", p.id),
            detail: e.to_string(),
        })
    };
    let captures: Vec<(String, i64, String, i64)> =
        serde_json::from_str(&get::<String>(r, at + 12)?).map_err(|e| unreadable("captures", e))?;
    let refunds: Vec<(String, i64, Option<String>, String, i64)> =
        serde_json::from_str(&get::<String>(r, at + 13)?).map_err(|e| unreadable("refunds", e))?;
    p.captures = captures
        .into_iter()
        .map(|(id, amount, attempt_id, created_at)| Capture {
            id: CaptureId(id),
            amount,
            attempt_id: AttemptId(attempt_id),
            created_at,
        })
        .collect();
    p.refunds = refunds
        .into_iter()
        .map(|(id, amount, reason, attempt_id, created_at)| Refund {
            id: RefundId(id),
            amount,
            reason,
            attempt_id: AttemptId(attempt_id),
            created_at,
        })
        .collect();
    Ok(p)
}

impl PostgresStore {
    /// The payments whose `column` is `value`, oldest first, with their captures and refunds,
    /// in one statement.
    pub(crate) async fn payments_where(
        &self,
        column: &str,
        value: &str,
    ) -> Result<Vec<Payment>, StoreError> {
        self.query(
            &format!("SELECT {PAYMENT_COLUMNS}, {MOVEMENTS} FROM payments p WHERE p.{column} = $1 ORDER BY p.created_at, p.id"),
            &[&value],
        )
        .await?
        .iter()
        .map(|r| with_movements(r, 0))
        .collect()
    }

    /// A payment and its session, in one statement.
    pub(crate) async fn read_payment_and_session(
        &self,
        id: &str,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        let row = self
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS}, {PAYMENT_COLUMNS}, {MOVEMENTS} FROM payments p JOIN payment_sessions s ON s.id = p.payment_session_id WHERE p.id = $1"),
                &[&id],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                with_movements(&r, SESSION_COLUMNS.split(", ").count())?,
                decode(&r, 0, rows::session)?,
            ))),
        }
    }
}
