//! Payments with their captures and refunds: their rows written and read.

use payhost_core::domain::{Capture, Payment, PaymentId, Refund};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, CAPTURE_COLUMNS, PAYMENT_COLUMNS, REFUND_COLUMNS};
use rusqlite::{Connection, params};

use crate::sql::{classify, decode, exec, json};

pub(crate) fn insert(tx: &Connection, p: &Payment) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
        params![p.id.0, p.payment_session_id.0, p.payment_collection_id.0, p.provider_id, p.amount, p.currency_code.code(), json(&p.data), p.captured_at, p.canceled_at, p.created_at, p.updated_at, p.version],
    )
    .map_err(|e| classify(e, p.id.as_str()))?;
    Ok(())
}

/// Writes the payment if it is still at `expected_version` (else a version conflict).
pub(crate) fn update(
    tx: &Connection,
    p: &Payment,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE payments SET data=?2, captured_at=?3, canceled_at=?4, updated_at=?5, version=?6 WHERE id=?1 AND version=?7",
        params![p.id.0, json(&p.data), p.captured_at, p.canceled_at, p.updated_at, p.version, expected_version],
    )
    .map_err(|e| classify(e, p.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(p.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn insert_capture(
    tx: &Connection,
    payment: &PaymentId,
    c: &Capture,
) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO captures (id, payment_id, amount, attempt_id, created_at) VALUES (?1,?2,?3,?4,?5)",
        params![c.id.0, payment.0, c.amount, c.attempt_id.0, c.created_at],
    )
    .map_err(|e| classify(e, payment.as_str()))?;
    Ok(())
}

pub(crate) fn insert_refund(
    tx: &Connection,
    payment: &PaymentId,
    r: &Refund,
) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO refunds (id, payment_id, amount, reason, attempt_id, created_at) VALUES (?1,?2,?3,?4,?5,?6)",
        params![r.id.0, payment.0, r.amount, r.reason, r.attempt_id.0, r.created_at],
    )
    .map_err(|e| classify(e, payment.as_str()))?;
    Ok(())
}

/// The payments whose `column` is `value`, oldest first, each with its captures and refunds.
fn payments_where(c: &Connection, column: &str, value: &str) -> rusqlite::Result<Vec<Payment>> {
    let payments: Vec<Payment> = c
        .prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payments p WHERE p.{column} = ?1 ORDER BY p.created_at, p.id"
        ))?
        .query_map([value], |r| decode(r, 0, rows::payment))?
        .collect::<rusqlite::Result<_>>()?;
    payments.into_iter().map(|p| with_movements(c, p)).collect()
}

pub(crate) fn payment(c: &Connection, id: &str) -> rusqlite::Result<Option<Payment>> {
    Ok(payments_where(c, "id", id)?.pop())
}

/// The payment a session was promoted to.
pub(crate) fn of_session(c: &Connection, session_id: &str) -> rusqlite::Result<Option<Payment>> {
    Ok(payments_where(c, "payment_session_id", session_id)?.pop())
}

pub(crate) fn of_collection(c: &Connection, id: &str) -> rusqlite::Result<Vec<Payment>> {
    payments_where(c, "payment_collection_id", id)
}

fn with_movements(conn: &Connection, mut p: Payment) -> rusqlite::Result<Payment> {
    p.captures = conn
        .prepare_cached(&format!(
            "SELECT {CAPTURE_COLUMNS} FROM captures c WHERE c.payment_id = ?1 ORDER BY c.created_at, c.id"
        ))?
        .query_map([&p.id.0], |r| decode(r, 0, rows::capture))?
        .collect::<rusqlite::Result<_>>()?;
    p.refunds = conn
        .prepare_cached(&format!(
            "SELECT {REFUND_COLUMNS} FROM refunds r WHERE r.payment_id = ?1 ORDER BY r.created_at, r.id"
        ))?
        .query_map([&p.id.0], |r| decode(r, 0, rows::refund))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(p)
}
