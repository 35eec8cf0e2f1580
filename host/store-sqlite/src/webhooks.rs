//! Providers' webhooks as received (after verification), applied once per (provider, event id).

use payhost_core::domain::Timestamp;
use payhost_core::store::{StoreError, WebhookEventRecord};
use payhost_store_rows::{self as rows, WEBHOOK_EVENT_COLUMNS};
use rusqlite::{Connection, OptionalExtension, params};

use crate::sql::{classify, decode, exec};

pub(crate) fn insert(tx: &Connection, e: &WebhookEventRecord) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO webhook_events (provider_id, event_id, body, session_id, action, received_at, applied_at) VALUES (?1,?2,?3,?4,?5,?6,NULL)",
        params![e.provider_id, e.event_id, e.body, e.session_id, e.action, e.received_at],
    )
    .map_err(|err| classify(err, &format!("{}/{}", e.provider_id, e.event_id)))?;
    Ok(())
}

pub(crate) fn mark_applied(
    tx: &Connection,
    provider_id: &str,
    event_id: &str,
    at: Timestamp,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE webhook_events SET applied_at = ?3 WHERE provider_id = ?1 AND event_id = ?2",
        params![provider_id, event_id, at],
    )
    .map_err(|e| classify(e, event_id))?;
    Ok(())
}

pub(crate) fn event(
    c: &Connection,
    provider_id: &str,
    event_id: &str,
) -> rusqlite::Result<Option<WebhookEventRecord>> {
    c.prepare_cached(&format!(
        "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events w WHERE w.provider_id = ?1 AND w.event_id = ?2"
    ))?
    .query_row([provider_id, event_id], |r| decode(r, 0, rows::webhook_event))
    .optional()
}
