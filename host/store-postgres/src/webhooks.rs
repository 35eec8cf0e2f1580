//! Providers' webhooks as received (after verification), applied once per (provider, event
//! id): each write's statement and its `payhost_write` encoding.

use deadpool_postgres::Transaction;
use payhost_core::domain::Timestamp;
use payhost_core::store::{StoreError, WebhookEventRecord};
use payhost_store_rows::{self as rows, WEBHOOK_EVENT_COLUMNS};

use crate::PostgresStore;
use crate::sql::{classify, decode};
use crate::write::JsonObject;

pub(crate) async fn insert(tx: &Transaction<'_>, e: &WebhookEventRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO webhook_events (provider_id, event_id, body, session_id, action, received_at, applied_at) VALUES ($1,$2,$3,$4,$5,$6,NULL)",
        &[&e.provider_id, &e.event_id, &e.body, &e.session_id, &e.action, &e.received_at],
    )
    .await
    .map_err(|err| classify(err, &format!("{}/{}", e.provider_id, e.event_id)))?;
    Ok(())
}

pub(crate) fn encode_insert(e: &WebhookEventRecord, out: &mut Vec<u8>) {
    JsonObject::new(out, "insert_webhook_event")
        .str("provider_id", &e.provider_id)
        .str("event_id", &e.event_id)
        .str("body", &e.body)
        .opt_str("session_id", e.session_id.as_deref())
        .str("action", &e.action)
        .int("received_at", e.received_at)
        .end();
}

pub(crate) async fn mark_applied(
    tx: &Transaction<'_>,
    provider_id: &str,
    event_id: &str,
    at: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE webhook_events SET applied_at = $3 WHERE provider_id = $1 AND event_id = $2",
        &[&provider_id, &event_id, &at],
    )
    .await
    .map_err(|e| classify(e, event_id))?;
    Ok(())
}

pub(crate) fn encode_mark_applied(
    provider_id: &str,
    event_id: &str,
    at: Timestamp,
    out: &mut Vec<u8>,
) {
    JsonObject::new(out, "mark_webhook_applied")
        .str("provider_id", provider_id)
        .str("event_id", event_id)
        .int("at", at)
        .end();
}

impl PostgresStore {
    pub(crate) async fn read_webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        self.query_opt(
            &format!("SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events w WHERE w.provider_id = $1 AND w.event_id = $2"),
            &[&provider_id, &event_id],
        )
        .await?
        .map(|r| decode(&r, 0, rows::webhook_event))
        .transpose()
    }
}
