//! Account holders, their saved payment methods and the holder attempts: rows written and read.

use payhost_core::domain::{AccountHolder, HolderAttempt, PaymentMethod};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, HOLDER_ATTEMPT_COLUMNS, HOLDER_COLUMNS, METHOD_COLUMNS};
use rusqlite::{Connection, OptionalExtension, params};

use crate::sql::{classify, decode, exec, json};

fn customer(h: &AccountHolder) -> String {
    serde_json::to_string(&h.customer).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn insert_holder(tx: &Connection, h: &AccountHolder) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO account_holders (id, provider_id, customer_id, customer, reference, data, status, idempotency_key, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
        params![h.id.0, h.provider_id, h.customer_id, customer(h), h.reference, json(&h.data), h.status.as_str(), h.idempotency_key, h.created_at, h.updated_at, h.version],
    )
    .map_err(|e| match classify(e, h.id.as_str()) {
        StoreError::Invariant(text) if text.contains("account_holders.provider_id") => {
            StoreError::KeyExists(format!(
                "account holder of customer {} at {}",
                h.customer_id, h.provider_id
            ))
        }
        e => e,
    })?;
    Ok(())
}

pub(crate) fn update_holder(
    tx: &Connection,
    h: &AccountHolder,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE account_holders SET customer=?2, reference=?3, data=?4, status=?5, updated_at=?6, version=?7 WHERE id=?1 AND version=?8",
        params![h.id.0, customer(h), h.reference, json(&h.data), h.status.as_str(), h.updated_at, h.version, expected_version],
    )
    .map_err(|e| classify(e, h.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(h.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn insert_method(tx: &Connection, m: &PaymentMethod) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO payment_methods (id, account_holder_id, provider_id, reference, data, status, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
        params![m.id.0, m.account_holder_id.0, m.provider_id, m.reference, json(&m.data), m.status.as_str(), m.created_at, m.updated_at, m.version],
    )
    .map_err(|e| classify(e, m.id.as_str()))?;
    Ok(())
}

pub(crate) fn update_method(
    tx: &Connection,
    m: &PaymentMethod,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE payment_methods SET reference=?2, data=?3, status=?4, updated_at=?5, version=?6 WHERE id=?1 AND version=?7",
        params![m.id.0, m.reference, json(&m.data), m.status.as_str(), m.updated_at, m.version, expected_version],
    )
    .map_err(|e| classify(e, m.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(m.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn insert_attempt(tx: &Connection, t: &HolderAttempt) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO holder_attempts (id, account_holder_id, payment_method_id, provider_id, operation, idempotency_key, state, detail, outcome, error, checks, next_check_at, call_deadline_at, created_at, updated_at, version) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
        params![t.id.0, t.account_holder_id.0, t.payment_method_id.as_ref().map(|m| &m.0), t.provider_id, t.operation.as_str(), t.idempotency_key, t.state.as_str(), json(&t.detail), t.outcome.as_ref().map(json), t.error.as_ref().map(json), t.checks, t.next_check_at, t.call_deadline_at, t.created_at, t.updated_at, t.version],
    )
    .map_err(|e| match classify(e, t.account_holder_id.as_str()) {
        StoreError::Invariant(text) if text.contains("holder_attempts.account_holder_id") => {
            StoreError::AttemptOpen(t.account_holder_id.0.clone())
        }
        e => e,
    })?;
    Ok(())
}

pub(crate) fn update_attempt(
    tx: &Connection,
    t: &HolderAttempt,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE holder_attempts SET state=?2, outcome=?3, error=?4, checks=?5, next_check_at=?6, updated_at=?7, version=?8 WHERE id=?1 AND version=?9",
        params![t.id.0, t.state.as_str(), t.outcome.as_ref().map(json), t.error.as_ref().map(json), t.checks, t.next_check_at, t.updated_at, t.version, expected_version],
    )
    .map_err(|e| classify(e, t.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(t.id.0.clone()));
    }
    Ok(())
}

pub(crate) fn holder(c: &Connection, id: &str) -> rusqlite::Result<Option<AccountHolder>> {
    c.prepare_cached(&format!(
        "SELECT {HOLDER_COLUMNS} FROM account_holders h WHERE h.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::holder))
    .optional()
}

/// The holders of a customer, oldest first.
pub(crate) fn of_customer(c: &Connection, customer: &str) -> rusqlite::Result<Vec<AccountHolder>> {
    c.prepare_cached(&format!(
        "SELECT {HOLDER_COLUMNS} FROM account_holders h WHERE h.customer_id = ?1 ORDER BY h.created_at, h.id"
    ))?
    .query_map([customer], |r| decode(r, 0, rows::holder))?
    .collect()
}

pub(crate) fn method(c: &Connection, id: &str) -> rusqlite::Result<Option<PaymentMethod>> {
    c.prepare_cached(&format!(
        "SELECT {METHOD_COLUMNS} FROM payment_methods m WHERE m.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::method))
    .optional()
}

/// The methods of a holder, oldest first.
pub(crate) fn methods_of(c: &Connection, holder: &str) -> rusqlite::Result<Vec<PaymentMethod>> {
    c.prepare_cached(&format!(
        "SELECT {METHOD_COLUMNS} FROM payment_methods m WHERE m.account_holder_id = ?1 ORDER BY m.created_at, m.id"
    ))?
    .query_map([holder], |r| decode(r, 0, rows::method))?
    .collect()
}

pub(crate) fn attempt(c: &Connection, id: &str) -> rusqlite::Result<Option<HolderAttempt>> {
    c.prepare_cached(&format!(
        "SELECT {HOLDER_ATTEMPT_COLUMNS} FROM holder_attempts t WHERE t.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::holder_attempt))
    .optional()
}

/// The attempts of a holder, oldest first.
pub(crate) fn attempts_of(c: &Connection, holder: &str) -> rusqlite::Result<Vec<HolderAttempt>> {
    c.prepare_cached(&format!(
        "SELECT {HOLDER_ATTEMPT_COLUMNS} FROM holder_attempts t WHERE t.account_holder_id = ?1 ORDER BY t.created_at, t.id"
    ))?
    .query_map([holder], |r| decode(r, 0, rows::holder_attempt))?
    .collect()
}

/// Every open holder attempt, oldest first.
pub(crate) fn open_attempts(c: &Connection) -> rusqlite::Result<Vec<HolderAttempt>> {
    c.prepare_cached(&format!(
        "SELECT {HOLDER_ATTEMPT_COLUMNS} FROM holder_attempts t WHERE (t.state = 'in_flight' OR t.state = 'unknown' OR t.state = 'needs_operator') ORDER BY t.created_at, t.id"
    ))?
    .query_map([], |r| decode(r, 0, rows::holder_attempt))?
    .collect()
}
