//! Attempts, the write-ahead record of every provider call: written before the call, settled
//! after it, claimed by the reconciler.

use payhost_core::domain::{Attempt, AttemptId, Timestamp};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, ATTEMPT_COLUMNS};
use rusqlite::{Connection, OptionalExtension, params};

use crate::sql::{classify, decode, exec, json};

fn resolution(a: &Attempt) -> Option<String> {
    a.resolution
        .as_ref()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
}

pub(crate) fn insert(tx: &Connection, a: &Attempt) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
        params![a.id.0, a.entity(), a.session_id.0, a.payment_id.as_ref().map(|p| &p.0), a.provider_id, a.operation.as_str(), a.amount, a.currency_code.code(), a.idempotency_key, a.state.as_str(), a.outcome.as_ref().map(json), a.error.as_ref().map(json), a.reason, a.checks, a.next_check_at, resolution(a), a.created_at, a.updated_at, a.call_deadline_at, a.requested_by],
    )
    .map_err(|e| classify(e, &a.entity()))?;
    Ok(())
}

pub(crate) fn update(tx: &Connection, a: &Attempt) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE attempts SET state=?2, outcome=?3, error=?4, checks=?5, next_check_at=?6, resolution=?7, updated_at=?8 WHERE id=?1",
        params![a.id.0, a.state.as_str(), a.outcome.as_ref().map(json), a.error.as_ref().map(json), a.checks, a.next_check_at, resolution(a), a.updated_at],
    )
    .map_err(|e| classify(e, a.id.as_str()))?;
    Ok(())
}

/// The attempt is sent again: its call may land until `deadline`.
pub(crate) fn extend_deadline(
    tx: &Connection,
    id: &AttemptId,
    deadline: Timestamp,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE attempts SET call_deadline_at = ?2, resends = resends + 1 WHERE id = ?1",
        params![id.0, deadline],
    )
    .map_err(|e| classify(e, id.as_str()))?;
    Ok(())
}

/// Takes an unknown attempt that is due (or an in-flight one gone stale) for the reconciler
/// until `until`; another claimant got there first if it is neither (a version conflict).
pub(crate) fn claim(
    tx: &Connection,
    id: &AttemptId,
    until: Timestamp,
    now: Timestamp,
    stale_before: Timestamp,
) -> Result<(), StoreError> {
    let n = exec(
        tx,
        "UPDATE attempts SET next_check_at = ?2, state = 'unknown' WHERE id = ?1 AND ((state = 'unknown' AND COALESCE(next_check_at, 0) <= ?3) OR (state = 'in_flight' AND updated_at < ?4))",
        params![id.0, until, now, stale_before],
    )
    .map_err(|e| classify(e, id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(id.0.clone()));
    }
    Ok(())
}

pub(crate) fn attempt(c: &Connection, id: &str) -> rusqlite::Result<Option<Attempt>> {
    c.prepare_cached(&format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE a.id = ?1"
    ))?
    .query_row([id], |r| decode(r, 0, rows::attempt))
    .optional()
}

/// The attempts on a session or payment, oldest first.
pub(crate) fn of_entity(c: &Connection, entity: &str) -> rusqlite::Result<Vec<Attempt>> {
    c.prepare_cached(&format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE a.entity_id = ?1 ORDER BY a.created_at, a.id"
    ))?
    .query_map([entity], |r| decode(r, 0, rows::attempt))?
    .collect()
}

/// Every attempt not settled, oldest first.
pub(crate) fn open(c: &Connection) -> rusqlite::Result<Vec<Attempt>> {
    c.prepare_cached(&format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts a WHERE a.state IN ('in_flight','unknown','needs_operator') ORDER BY a.created_at, a.id"
    ))?
    .query_map([], |r| decode(r, 0, rows::attempt))?
    .collect()
}
