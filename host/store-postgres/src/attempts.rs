//! Attempts, the write-ahead record of every provider call: each write's statement and its
//! `payhost_write` encoding. An attempt is owned by the host that started it (or took it
//! over), and only while that host's lease is current: deadlines are on the database's clock.

use deadpool_postgres::Transaction;
use payhost_core::domain::{Attempt, AttemptId, Resolution, Timestamp};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, ATTEMPT_COLUMNS, ATTEMPT_OWNER_COLUMNS};

use crate::PostgresStore;
use crate::sql::{classify, decode, json};
use crate::write::{JsonObject, Owner};

fn resolution(r: &Option<Resolution>) -> Option<String> {
    r.as_ref()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
}

/// Starts an attempt, owned by this host, and only while its lease is current (a host that
/// slept through it starts nothing).
pub(crate) async fn insert(
    tx: &Transaction<'_>,
    a: &Attempt,
    me: &Owner,
) -> Result<(), StoreError> {
    let call_ms = a.call_deadline_at.map(|d| d - a.created_at);
    let n = tx.execute(
        "INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, owner_host, owner_epoch) SELECT $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18, payhost_now_ms() + $19::BIGINT, $20, $21::TEXT, $22::BIGINT WHERE $21::TEXT IS NULL OR payhost_host_live($21, $22)",
        &[&a.id.0, &a.entity(), &a.session_id.0, &a.payment_id.as_ref().map(|p| p.0.clone()), &a.provider_id, &a.operation.as_str(), &a.amount, &a.currency_code.code(), &a.idempotency_key, &a.state.as_str(), &a.outcome.as_ref().map(json), &a.error.as_ref().map(json), &a.reason, &a.checks, &a.next_check_at, &resolution(&a.resolution), &a.created_at, &a.updated_at, &call_ms, &a.requested_by, &me.host, &me.epoch],
    )
    .await
    .map_err(|e| classify(e, &a.entity()))?;
    if n == 0 {
        return Err(me.fenced(&format!("starting attempt {}", a.id)));
    }
    Ok(())
}

pub(crate) fn encode_insert(a: &Attempt, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_attempt")
        .str("id", &a.id.0)
        .str("entity_id", &a.entity())
        .str("session_id", &a.session_id.0)
        .opt_str("payment_id", a.payment_id.as_ref().map(|p| p.0.as_str()))
        .str("provider_id", &a.provider_id)
        .str("operation", a.operation.as_str())
        .int("amount", a.amount)
        .str("currency_code", a.currency_code.code())
        .str("idempotency_key", &a.idempotency_key)
        .str("state", a.state.as_str())
        .opt_json_text("outcome", a.outcome.as_ref())
        .opt_json_text("error", a.error.as_ref())
        .opt_str("reason", a.reason.as_deref())
        .int("checks", a.checks)
        .opt_int("next_check_at", a.next_check_at)
        .opt_str("resolution", resolution(&a.resolution).as_deref())
        .int("created_at", a.created_at)
        .int("updated_at", a.updated_at)
        .opt_int("call_ms", a.call_deadline_at.map(|d| d - a.created_at))
        .opt_str("requested_by", a.requested_by.as_deref())
        .end();
}

/// Writes what became of an attempt. Only its owner does: a host whose lease lapsed while
/// another took the attempt over cannot write over what that one settled.
pub(crate) async fn update(
    tx: &Transaction<'_>,
    a: &Attempt,
    me: &Owner,
) -> Result<(), StoreError> {
    let n = tx.execute(
        "UPDATE attempts SET state=$2, outcome=$3, error=$4, checks=$5, next_check_at=$6, resolution=$7, updated_at=$8 WHERE id=$1 AND (owner_host IS NULL OR $9::TEXT IS NULL OR (owner_host = $9 AND owner_epoch = $10))",
        &[&a.id.0, &a.state.as_str(), &a.outcome.as_ref().map(json), &a.error.as_ref().map(json), &a.checks, &a.next_check_at, &resolution(&a.resolution), &a.updated_at, &me.host, &me.epoch],
    )
    .await
    .map_err(|e| classify(e, a.id.as_str()))?;
    if n == 0 {
        return Err(me.fenced(&format!("writing attempt {}", a.id)));
    }
    Ok(())
}

pub(crate) fn encode_update(a: &Attempt, out: &mut Vec<u8>) {
    JsonObject::new(out, "update_attempt")
        .str("id", &a.id.0)
        .str("state", a.state.as_str())
        .opt_json_text("outcome", a.outcome.as_ref())
        .opt_json_text("error", a.error.as_ref())
        .int("checks", a.checks)
        .opt_int("next_check_at", a.next_check_at)
        .opt_str("resolution", resolution(&a.resolution).as_deref())
        .int("updated_at", a.updated_at)
        .end();
}

/// The attempt is sent again: its call may land until `call_ms` from now (database clock).
pub(crate) async fn extend_deadline(
    tx: &Transaction<'_>,
    id: &AttemptId,
    call_ms: i64,
    me: &Owner,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE attempts SET call_deadline_at = payhost_now_ms() + $2, resends = resends + 1 WHERE id = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
            &[&id.0, &call_ms, &me.host, &me.epoch],
        )
        .await
        .map_err(|e| classify(e, id.as_str()))?;
    if n == 0 {
        return Err(me.fenced(&format!("sending attempt {id} again")));
    }
    Ok(())
}

/// Takes an attempt for the reconciler until `until`. With leases: an open attempt of this
/// host's that is due, or one whose owner's lease lapsed and whose call's deadline passed
/// (database clock), so that no request of the dead owner can still be on its way; it becomes
/// this host's. Without: an unknown one that is due, or an in-flight one gone stale. Another
/// claimant got there first if it is neither (a version conflict).
pub(crate) async fn claim(
    tx: &Transaction<'_>,
    id: &AttemptId,
    until: Timestamp,
    now: Timestamp,
    stale_before: Timestamp,
    me: &Owner,
) -> Result<(), StoreError> {
    let n = if me.leased() {
        let row = tx
            .query_opt(
                "WITH old AS (SELECT owner_host, owner_epoch FROM attempts WHERE id = $1 FOR UPDATE) \
                 UPDATE attempts a SET next_check_at = $2, state = 'unknown', owner_host = $4, owner_epoch = $5 FROM old \
                 WHERE a.id = $1 AND a.state IN ('in_flight', 'unknown') AND ( \
                   (a.owner_host = $4 AND a.owner_epoch = $5 AND a.state = 'unknown' AND COALESCE(a.next_check_at, 0) <= $3) \
                   OR (NOT payhost_host_live(a.owner_host, a.owner_epoch) AND COALESCE(a.call_deadline_at, a.created_at + 600000) < payhost_now_ms())) \
                 RETURNING (old.owner_host IS DISTINCT FROM $4 OR old.owner_epoch IS DISTINCT FROM $5)",
                &[&id.0, &until, &now, &me.host, &me.epoch],
            )
            .await
            .map_err(|e| classify(e, id.as_str()))?;
        let taken_over = match &row {
            Some(r) => crate::sql::get::<bool>(r, 0)?,
            None => false,
        };
        if taken_over {
            payhost_core::metrics::global().attempt_takeovers.inc();
            tracing::info!(attempt = %id, "took over an attempt whose host's lease lapsed");
        }
        u64::from(row.is_some())
    } else {
        tx.execute(
            "UPDATE attempts SET next_check_at = $2, state = 'unknown' WHERE id = $1 AND ((state = 'unknown' AND COALESCE(next_check_at, 0) <= $3) OR (state = 'in_flight' AND updated_at < $4))",
            &[&id.0, &until, &now, &stale_before],
        )
        .await
        .map_err(|e| classify(e, id.as_str()))?
    };
    if n == 0 {
        return Err(StoreError::VersionConflict(id.0.clone()));
    }
    Ok(())
}

impl PostgresStore {
    /// The attempts matching `clause` (on `attempts a`, with `$1` bound to `arg`), oldest
    /// first.
    pub(crate) async fn attempts_where(
        &self,
        clause: &str,
        arg: Option<&str>,
    ) -> Result<Vec<Attempt>, StoreError> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS}, {ATTEMPT_OWNER_COLUMNS} FROM attempts a WHERE {clause} ORDER BY a.created_at, a.id"
        );
        let found = match arg {
            Some(a) => self.query(&sql, &[&a]).await?,
            None => self.query(&sql, &[]).await?,
        };
        found
            .iter()
            .map(|r| {
                let mut a = decode(r, 0, rows::attempt)?;
                rows::attempt_owner(&crate::sql::Columns(r), 20, &mut a)?;
                Ok(a)
            })
            .collect()
    }
}
