//! Account holders, their saved payment methods and the holder attempts: each write's
//! statement (they have no `payhost_write` encoding: a write with one takes the
//! statement-per-op path), and the reads.

use deadpool_postgres::Transaction;
use payhost_core::domain::{AccountHolder, HolderAttempt, PaymentMethod};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, HOLDER_ATTEMPT_COLUMNS, HOLDER_COLUMNS, METHOD_COLUMNS};

use crate::PostgresStore;
use crate::sql::{classify, decode, json};

fn customer(h: &AccountHolder) -> String {
    serde_json::to_string(&h.customer).unwrap_or_else(|_| "{}".into())
}

fn opt_json(v: &Option<serde_json::Value>) -> Option<String> {
    v.as_ref().map(json)
}

pub(crate) async fn insert_holder(
    tx: &Transaction<'_>,
    h: &AccountHolder,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO account_holders (id, provider_id, customer_id, customer, reference, data, status, idempotency_key, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
        &[&h.id.0, &h.provider_id, &h.customer_id, &customer(h), &h.reference, &json(&h.data), &h.status.as_str(), &h.idempotency_key, &h.created_at, &h.updated_at, &h.version],
    )
    .await
    .map_err(|e| match e.as_db_error().and_then(|d| d.constraint()) {
        Some("account_holders_one_live") => StoreError::KeyExists(format!(
            "account holder of customer {} at {}",
            h.customer_id, h.provider_id
        )),
        _ => classify(e, h.id.as_str()),
    })?;
    Ok(())
}

pub(crate) async fn update_holder(
    tx: &Transaction<'_>,
    h: &AccountHolder,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE account_holders SET customer=$2, reference=$3, data=$4, status=$5, updated_at=$6, version=$7 WHERE id=$1 AND version=$8",
            &[&h.id.0, &customer(h), &h.reference, &json(&h.data), &h.status.as_str(), &h.updated_at, &h.version, &expected_version],
        )
        .await
        .map_err(|e| classify(e, h.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(h.id.0.clone()));
    }
    Ok(())
}

pub(crate) async fn insert_method(
    tx: &Transaction<'_>,
    m: &PaymentMethod,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO payment_methods (id, account_holder_id, provider_id, reference, data, status, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
        &[&m.id.0, &m.account_holder_id.0, &m.provider_id, &m.reference, &json(&m.data), &m.status.as_str(), &m.created_at, &m.updated_at, &m.version],
    )
    .await
    .map_err(|e| classify(e, m.id.as_str()))?;
    Ok(())
}

pub(crate) async fn update_method(
    tx: &Transaction<'_>,
    m: &PaymentMethod,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE payment_methods SET reference=$2, data=$3, status=$4, updated_at=$5, version=$6 WHERE id=$1 AND version=$7",
            &[&m.id.0, &m.reference, &json(&m.data), &m.status.as_str(), &m.updated_at, &m.version, &expected_version],
        )
        .await
        .map_err(|e| classify(e, m.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(m.id.0.clone()));
    }
    Ok(())
}

pub(crate) async fn insert_attempt(
    tx: &Transaction<'_>,
    t: &HolderAttempt,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO holder_attempts (id, account_holder_id, payment_method_id, provider_id, operation, idempotency_key, state, detail, outcome, error, checks, next_check_at, call_deadline_at, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
        &[&t.id.0, &t.account_holder_id.0, &t.payment_method_id.as_ref().map(|m| m.0.as_str()), &t.provider_id, &t.operation.as_str(), &t.idempotency_key, &t.state.as_str(), &json(&t.detail), &opt_json(&t.outcome), &opt_json(&t.error), &t.checks, &t.next_check_at, &t.call_deadline_at, &t.created_at, &t.updated_at, &t.version],
    )
    .await
    .map_err(|e| match e.as_db_error().and_then(|d| d.constraint()) {
        Some("holder_attempts_one_open") => StoreError::AttemptOpen(t.account_holder_id.0.clone()),
        _ => classify(e, t.account_holder_id.as_str()),
    })?;
    Ok(())
}

pub(crate) async fn update_attempt(
    tx: &Transaction<'_>,
    t: &HolderAttempt,
    expected_version: i64,
) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE holder_attempts SET state=$2, outcome=$3, error=$4, checks=$5, next_check_at=$6, updated_at=$7, version=$8 WHERE id=$1 AND version=$9",
            &[&t.id.0, &t.state.as_str(), &opt_json(&t.outcome), &opt_json(&t.error), &t.checks, &t.next_check_at, &t.updated_at, &t.version, &expected_version],
        )
        .await
        .map_err(|e| classify(e, t.id.as_str()))?;
    if n == 0 {
        return Err(StoreError::VersionConflict(t.id.0.clone()));
    }
    Ok(())
}

impl PostgresStore {
    /// The holders whose `column` is `value`, oldest first.
    pub(crate) async fn holders_where(
        &self,
        column: &str,
        value: &str,
    ) -> Result<Vec<AccountHolder>, StoreError> {
        self.query(
            &format!("SELECT {HOLDER_COLUMNS} FROM account_holders h WHERE h.{column} = $1 ORDER BY h.created_at, h.id"),
            &[&value],
        )
        .await?
        .iter()
        .map(|r| decode(r, 0, rows::holder))
        .collect()
    }

    /// The methods whose `column` is `value`, oldest first.
    pub(crate) async fn methods_where(
        &self,
        column: &str,
        value: &str,
    ) -> Result<Vec<PaymentMethod>, StoreError> {
        self.query(
            &format!("SELECT {METHOD_COLUMNS} FROM payment_methods m WHERE m.{column} = $1 ORDER BY m.created_at, m.id"),
            &[&value],
        )
        .await?
        .iter()
        .map(|r| decode(r, 0, rows::method))
        .collect()
    }

    /// The holder attempts matching `condition` (on `t`, with `$1` bound to `value`), oldest
    /// first.
    pub(crate) async fn holder_attempts_where(
        &self,
        condition: &str,
        value: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<HolderAttempt>, StoreError> {
        self.query(
            &format!("SELECT {HOLDER_ATTEMPT_COLUMNS} FROM holder_attempts t WHERE {condition} ORDER BY t.created_at, t.id"),
            value,
        )
        .await?
        .iter()
        .map(|r| decode(r, 0, rows::holder_attempt))
        .collect()
    }
}
