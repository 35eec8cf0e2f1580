//! Payment collections and sessions: their rows written and read.

use payhost_core::domain::{PaymentCollection, PaymentSession, SessionId};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, COLLECTION_COLUMNS, SESSION_COLUMNS};
use rusqlite::{Connection, OptionalExtension, params};

use crate::sql::{classify, decode, exec, json};

pub(crate) fn insert_collection(tx: &Connection, c: &PaymentCollection) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO payment_collections (id, amount, currency_code, metadata, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6)",
        params![c.id.0, c.amount, c.currency_code.code(), json(&c.metadata), c.created_at, c.updated_at],
    )
    .map_err(|e| classify(e, c.id.as_str()))?;
    Ok(())
}

pub(crate) fn insert_session(tx: &Connection, s: &PaymentSession) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version, reference, account_holder_id) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
        params![s.id.0, s.payment_collection_id.0, s.cart_id, json(&s.cart), json(&s.context), s.provider_id, s.is_selected, s.is_initiated, s.status.as_str(), json(&s.data), s.idempotency_key, s.amount, s.currency_code.code(), s.payment_authorized_at, json(&s.metadata), s.created_at, s.updated_at, s.version, s.reference, s.account_holder_id.as_ref().map(|h| &h.0)],
    )
    .map_err(|e| classify(e, s.id.as_str()))?;
    Ok(())
}

/// Writes the session if it is still at `expected_version` (else a version conflict).
pub(crate) fn update_session(
    tx: &Connection,
    s: &PaymentSession,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE payment_sessions SET cart_id=?2, cart=?3, context=?4, is_selected=?5, is_initiated=?6, status=?7, data=?8, amount=?9, payment_authorized_at=?10, metadata=?11, updated_at=?12, version=?13 WHERE id=?1 AND version=?14",
        params![s.id.0, s.cart_id, json(&s.cart), json(&s.context), s.is_selected, s.is_initiated, s.status.as_str(), json(&s.data), s.amount, s.payment_authorized_at, json(&s.metadata), s.updated_at, s.version, expected_version],
    )
    .map_err(|e| classify(e, s.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(s.id.0.clone()));
    }
    Ok(())
}

/// Selects the session, deselecting the others of its collection and of its cart.
pub(crate) fn select_session(tx: &Connection, id: &SessionId) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE payment_sessions SET is_selected = (id = ?1), version = version + 1 WHERE id = ?1 OR (is_selected = 1 AND (payment_collection_id = (SELECT payment_collection_id FROM payment_sessions WHERE id = ?1) OR (cart_id IS NOT NULL AND cart_id = (SELECT cart_id FROM payment_sessions WHERE id = ?1))))",
        params![id.0],
    )
    .map_err(|e| classify(e, id.as_str()))?;
    Ok(())
}

pub(crate) fn collection(c: &Connection, id: &str) -> rusqlite::Result<Option<PaymentCollection>> {
    c.prepare_cached(&format!(
        "SELECT {COLLECTION_COLUMNS} FROM payment_collections c WHERE c.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::collection))
    .optional()
}

pub(crate) fn session(c: &Connection, id: &str) -> rusqlite::Result<Option<PaymentSession>> {
    c.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM payment_sessions s WHERE s.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::session))
    .optional()
}

/// The sessions of a cart, oldest first.
pub(crate) fn of_cart(c: &Connection, cart_id: &str) -> rusqlite::Result<Vec<PaymentSession>> {
    c.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM payment_sessions s WHERE s.cart_id = ?1 ORDER BY s.created_at, s.id"
    ))?
    .query_map([cart_id], |r| decode(r, 0, rows::session))?
    .collect()
}

/// The sessions of a collection, oldest first.
pub(crate) fn of_collection(c: &Connection, id: &str) -> rusqlite::Result<Vec<PaymentSession>> {
    c.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM payment_sessions s WHERE s.payment_collection_id = ?1 ORDER BY s.created_at, s.id"
    ))?
    .query_map([id], |r| decode(r, 0, rows::session))?
    .collect()
}

/// The sessions carrying the caller's `reference`, oldest first.
pub(crate) fn of_reference(
    c: &Connection,
    reference: &str,
) -> rusqlite::Result<Vec<PaymentSession>> {
    c.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM payment_sessions s WHERE s.reference = ?1 ORDER BY s.created_at, s.id"
    ))?
    .query_map([reference], |r| decode(r, 0, rows::session))?
    .collect()
}
