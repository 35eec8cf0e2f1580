//! The outbox: events appended in commit order, one delivery row per event and endpoint, what
//! became of each delivery, pruning. One host per file and one deliverer per endpoint, so what
//! is due is this host's and nothing needs claiming.

use payhost_core::domain::Timestamp;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, DELIVERY_COLUMNS, EVENT_COLUMNS};
use rusqlite::{Connection, params};

use crate::sql::{classify, decode, exec, json, now_ms};

/// Appends an event (`INSERT … SELECT … WHERE NOT EXISTS` on the same table would build a
/// temporary B-tree on every event: [`append`] looks for the id first).
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)";

/// Appends the event with a delivery to each endpoint; a write applied twice appends its
/// events once.
pub(crate) fn append(tx: &Connection, e: &Event, deliver_to: &[String]) -> Result<(), StoreError> {
    let known = tx
        .prepare_cached("SELECT 1 FROM events WHERE id = ?1")
        .and_then(|mut st| st.exists([&e.id]))
        .map_err(|err| classify(err, &e.id))?;
    if known {
        return Ok(());
    }
    tx.prepare_cached(INSERT_EVENT)
        .and_then(|mut st| {
            st.execute(params![
                e.id,
                e.kind.as_str(),
                e.payment_collection_id,
                e.payment_session_id,
                e.payment_id,
                e.attempt_id,
                e.amount,
                e.currency_code,
                e.created_at,
                json(&e.data)
            ])
        })
        .map_err(|err| classify(err, &e.id))?;
    let seq = tx.last_insert_rowid();
    let key = e.order_key();
    for endpoint in deliver_to {
        tx.prepare_cached(
            "INSERT INTO event_deliveries (id, endpoint_id, event_seq, order_key, state, next_at, created_at) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5)",
        )
        .and_then(|mut st| {
            st.execute(params![format!("{}:{endpoint}", e.id), endpoint, seq, key, e.created_at])
        })
        .map_err(|err| classify(err, &e.id))?;
    }
    Ok(())
}

/// Records what became of claimed deliveries: delivered, or failed (retried after the given
/// milliseconds, or parked when there are none).
pub(crate) fn delivery_outcomes(
    tx: &Connection,
    delivered: &[String],
    failed: &[(String, Option<i64>, String)],
) -> Result<(), StoreError> {
    let now = now_ms();
    for id in delivered {
        exec(
            tx,
            "UPDATE event_deliveries SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, ?2), last_error = NULL WHERE id = ?1 AND state = 'pending'",
            params![id, now],
        )
        .map_err(|e| classify(e, id))?;
    }
    for (id, retry_in_ms, error) in failed {
        exec(
            tx,
            "UPDATE event_deliveries SET attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, ?2), next_at = ?2 + ?3, state = CASE WHEN ?4 THEN 'parked' ELSE 'pending' END, last_error = ?5 WHERE id = ?1 AND state = 'pending'",
            params![id, now, retry_in_ms.unwrap_or(0), retry_in_ms.is_none(), error],
        )
        .map_err(|e| classify(e, id))?;
    }
    Ok(())
}

/// Sends parked deliveries again (one, or all of the given endpoints'), recording who did.
pub(crate) fn redeliver(
    tx: &Connection,
    id: Option<&str>,
    endpoints: &[String],
    by: &str,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE event_deliveries SET state = 'pending', attempts = 0, first_tried_at = NULL, next_at = ?2, claimed_by = NULL, claimed_until = NULL, redelivered_by = ?4, redelivered_at = ?2 WHERE state = 'parked' AND (?1 IS NULL OR id = ?1) AND endpoint_id IN (SELECT value FROM json_each(?3))",
        params![id, now_ms(), serde_json::to_string(endpoints).unwrap_or_default(), by],
    )
    .map_err(|e| classify(e, id.unwrap_or("deliveries")))?;
    Ok(())
}

/// Parks the pending deliveries to endpoints no longer configured.
pub(crate) fn park_unconfigured(tx: &Connection, configured: &[String]) -> Result<(), StoreError> {
    let configured = serde_json::to_string(configured).unwrap_or_default();
    exec(
        tx,
        "UPDATE event_deliveries SET state = 'parked', last_error = 'the endpoint `' || endpoint_id || '` is no longer configured' WHERE state = 'pending' AND endpoint_id NOT IN (SELECT value FROM json_each(?1))",
        params![configured],
    )
    .map_err(|e| classify(e, "event deliveries"))?;
    Ok(())
}

/// Removes the events older than `before` that are delivered everywhere, up to the first that
/// must stay (events are removed in order, so a reader's position stays meaningful).
pub(crate) fn prune(tx: &Connection, before: Timestamp) -> Result<(), StoreError> {
    let keep: Option<i64> = tx
        .query_row(
            "SELECT MIN(seq) FROM events e WHERE e.created_at >= ?1 OR EXISTS (SELECT 1 FROM event_deliveries d WHERE d.event_seq = e.seq AND d.state <> 'delivered')",
            params![before],
            |r| r.get(0),
        )
        .map_err(|e| classify(e, "events"))?;
    let through: Option<i64> = match keep {
        Some(k) => Some(k - 1),
        None => tx
            .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
            .map_err(|e| classify(e, "events"))?,
    };
    if let Some(through) = through {
        exec(
            tx,
            "DELETE FROM event_deliveries WHERE event_seq <= ?1",
            params![through],
        )
        .and_then(|_| exec(tx, "DELETE FROM events WHERE seq <= ?1", params![through]))
        .and_then(|_| {
            exec(
                tx,
                "UPDATE event_meta SET v = MAX(v, ?1) WHERE k = 'pruned_through'",
                params![through],
            )
        })
        .map_err(|e| classify(e, "events"))?;
    }
    Ok(())
}

/// Events after `after`, of the given types, up to `limit`.
pub(crate) fn events_after(
    c: &Connection,
    after: i64,
    types: Option<&str>,
    limit: usize,
) -> rusqlite::Result<EventPage> {
    let pruned_through: i64 = c.query_row(
        "SELECT v FROM event_meta WHERE k = 'pruned_through'",
        [],
        |r| r.get(0),
    )?;
    let events = c
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events e WHERE e.seq > ?1 AND (?2 IS NULL OR e.type IN (SELECT value FROM json_each(?2))) ORDER BY e.seq LIMIT ?3"
        ))?
        .query_map(params![after, types, limit as i64], |r| {
            decode(r, 0, rows::event)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(EventPage {
        events,
        pruned_through,
    })
}

/// The endpoint's due deliveries, up to `limit`: of each session's run, its due deliveries
/// from the first undelivered one on, up to the first that is not due (as in PostgreSQL's).
pub(crate) fn due(
    c: &Connection,
    endpoint_id: &str,
    limit: usize,
) -> rusqlite::Result<Vec<(Delivery, Event)>> {
    let mut st = c.prepare_cached(&format!(
        "WITH open AS ( \
           SELECT d.id, d.event_seq, d.state, d.next_at, \
                  row_number() OVER (PARTITION BY d.order_key ORDER BY d.event_seq) AS k, \
                  row_number() OVER (PARTITION BY d.order_key, (d.state = 'pending' AND d.next_at <= ?1) ORDER BY d.event_seq) AS r \
           FROM event_deliveries d WHERE d.endpoint_id = ?3 AND d.state <> 'delivered'), \
         wanted AS (SELECT id FROM open WHERE state = 'pending' AND next_at <= ?1 AND r = k ORDER BY event_seq LIMIT ?2) \
         SELECT {DELIVERY_COLUMNS}, d.event_seq, {EVENT_COLUMNS} FROM event_deliveries d JOIN events e ON e.seq = d.event_seq \
         WHERE d.id IN (SELECT id FROM wanted) ORDER BY d.event_seq"
    ))?;
    st.query_map(params![now_ms(), limit as i64, endpoint_id], |r| {
        Ok((decode(r, 0, rows::delivery)?, decode(r, 11, rows::event)?))
    })?
    .collect()
}

/// Deliveries in `state`, in event order, up to `limit`.
pub(crate) fn in_state(
    c: &Connection,
    state: DeliveryState,
    limit: usize,
) -> rusqlite::Result<Vec<Delivery>> {
    c.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS}, d.event_seq FROM event_deliveries d WHERE d.state = ?1 ORDER BY d.event_seq LIMIT ?2"
    ))?
    .query_map(params![state.as_str(), limit as i64], |r| {
        decode(r, 0, rows::delivery)
    })?
    .collect()
}
