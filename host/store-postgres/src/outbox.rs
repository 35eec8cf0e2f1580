//! The outbox: events appended unnumbered and numbered once committed (migration 7), one
//! delivery row per event and endpoint, deliveries claimed by one host at a time, what became
//! of each, pruning. Each write's statement (and, for the append, its `payhost_write`
//! encoding), and the reads.

use deadpool_postgres::Transaction;
use payhost_core::domain::Timestamp;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage};
use payhost_core::store::StoreError;
use payhost_store_rows::{self as rows, DELIVERY_COLUMNS, EVENT_COLUMNS};

use crate::PostgresStore;
use crate::sql::{classify, connection_error, decode, get, json};
use crate::write::JsonObject;

/// Appends the event, unnumbered (the sequencer numbers it once committed), with a delivery
/// to each endpoint, in one statement; skipped if the event is stored already (a redone
/// write).
pub(crate) async fn append(
    tx: &Transaction<'_>,
    e: &Event,
    deliver_to: &[String],
) -> Result<(), StoreError> {
    tx.execute(
        "WITH ev AS (INSERT INTO events (id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data) \
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING RETURNING pos) \
         INSERT INTO event_deliveries (id, endpoint_id, event_pos, order_key, state, next_at, created_at) \
         SELECT $1 || ':' || ep, ep, ev.pos, $11, 'pending', payhost_now_ms(), payhost_now_ms() FROM ev, unnest($12::TEXT[]) AS ep",
        &[&e.id, &e.kind.as_str(), &e.payment_collection_id, &e.payment_session_id, &e.payment_id, &e.attempt_id, &e.amount, &e.currency_code, &e.created_at, &json(&e.data), &e.order_key(), &deliver_to],
    )
    .await
    .map_err(|err| classify(err, &e.id))?;
    Ok(())
}

pub(crate) fn encode_append(e: &Event, deliver_to: &[String], out: &mut Vec<u8>) {
    JsonObject::new(out, "append_event")
        .str("id", &e.id)
        .str("type", e.kind.as_str())
        .opt_str("collection_id", e.payment_collection_id.as_deref())
        .opt_str("session_id", e.payment_session_id.as_deref())
        .opt_str("payment_id", e.payment_id.as_deref())
        .opt_str("attempt_id", e.attempt_id.as_deref())
        .opt_int("amount", e.amount)
        .opt_str("currency_code", e.currency_code.as_deref())
        .int("created_at", e.created_at)
        .json_text("data", &e.data)
        .str("order_key", &e.order_key())
        .strings("deliver_to", deliver_to)
        .end();
}

/// Records what became of the deliveries `claimer` holds: delivered, failed (retried after the
/// given milliseconds, or parked when there are none), or released untried.
pub(crate) async fn delivery_outcomes(
    tx: &Transaction<'_>,
    claimer: &str,
    delivered: &[String],
    failed: &[(String, Option<i64>, String)],
    released: &[String],
) -> Result<(), StoreError> {
    if !delivered.is_empty() {
        tx.execute(
            "UPDATE event_deliveries SET state = 'delivered', delivered_at = payhost_now_ms(), attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, payhost_now_ms()), last_error = NULL, claimed_until = NULL WHERE id = ANY($1) AND state = 'pending' AND claimed_by = $2",
            &[&delivered, &claimer],
        )
        .await
        .map_err(|e| classify(e, "event deliveries"))?;
    }
    for (id, retry_in_ms, error) in failed {
        tx.execute(
            "UPDATE event_deliveries SET attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, payhost_now_ms()), next_at = payhost_now_ms() + COALESCE($3::BIGINT, 0), state = CASE WHEN $3::BIGINT IS NULL THEN 'parked' ELSE 'pending' END, last_error = $4, claimed_until = NULL WHERE id = $1 AND state = 'pending' AND claimed_by = $2",
            &[id, &claimer, retry_in_ms, error],
        )
        .await
        .map_err(|e| classify(e, id))?;
    }
    if !released.is_empty() {
        tx.execute(
            "UPDATE event_deliveries SET claimed_until = NULL WHERE id = ANY($1) AND state = 'pending' AND claimed_by = $2",
            &[&released, &claimer],
        )
        .await
        .map_err(|e| classify(e, "event deliveries"))?;
    }
    Ok(())
}

/// Sends parked deliveries again (one, or all of the given endpoints'), recording who did.
pub(crate) async fn redeliver(
    tx: &Transaction<'_>,
    id: Option<&str>,
    endpoints: &[String],
    by: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE event_deliveries SET state = 'pending', attempts = 0, first_tried_at = NULL, next_at = payhost_now_ms(), claimed_by = NULL, claimed_until = NULL, redelivered_by = $3, redelivered_at = payhost_now_ms() WHERE state = 'parked' AND ($1::TEXT IS NULL OR id = $1) AND endpoint_id = ANY($2)",
        &[&id, &endpoints, &by],
    )
    .await
    .map_err(|e| classify(e, id.unwrap_or("deliveries")))?;
    Ok(())
}

/// Parks the pending deliveries to endpoints no longer configured.
pub(crate) async fn park_unconfigured(
    tx: &Transaction<'_>,
    configured: &[String],
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE event_deliveries SET state = 'parked', last_error = 'the endpoint `' || endpoint_id || '` is no longer configured', claimed_until = NULL WHERE state = 'pending' AND NOT (endpoint_id = ANY($1))",
        &[&configured],
    )
    .await
    .map_err(|e| classify(e, "event deliveries"))?;
    Ok(())
}

/// Removes the delivered, numbered prefix older than `before`, as this statement's snapshot
/// sees it (numbers are given in order, so a later one is higher; unnumbered events are never
/// pruned, so what committed is numbered first).
pub(crate) async fn prune(tx: &Transaction<'_>, before: Timestamp) -> Result<(), StoreError> {
    tx.execute("SELECT payhost_sequence_events()", &[])
        .await
        .map_err(|e| classify(e, "events"))?;
    tx.execute(
        "WITH cut AS (SELECT COALESCE((SELECT MIN(seq) FROM events e WHERE e.seq IS NOT NULL AND (e.created_at >= $1 OR EXISTS (SELECT 1 FROM event_deliveries d WHERE d.event_pos = e.pos AND d.state <> 'delivered'))) - 1, (SELECT MAX(seq) FROM events), 0) AS through), \
         gone AS (SELECT pos FROM events WHERE seq <= (SELECT through FROM cut)), \
         gone_d AS (DELETE FROM event_deliveries WHERE event_pos IN (SELECT pos FROM gone)), \
         gone_e AS (DELETE FROM events WHERE pos IN (SELECT pos FROM gone)) \
         UPDATE event_meta SET v = GREATEST(v, (SELECT through FROM cut)) WHERE k = 'pruned_through'",
        &[&before],
    )
    .await
    .map_err(|e| classify(e, "events"))?;
    Ok(())
}

impl PostgresStore {
    /// Numbers the committed events that have no number yet (see migration 7).
    async fn sequence_events(&self) -> Result<(), StoreError> {
        self.query_one("SELECT payhost_sequence_events()", &[])
            .await
            .map(drop)
    }

    /// Events after `after`, of the given types, up to `limit`. Whatever committed is numbered
    /// first, so the page holds every committed event (a number is never given below one
    /// already read: the sequencer numbers after the last).
    pub(crate) async fn read_events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.sequence_events().await?;
        let found = self
            .query(
                &format!("SELECT {EVENT_COLUMNS}, (SELECT v FROM event_meta WHERE k = 'pruned_through') FROM events e WHERE e.seq > $1 AND ($2::TEXT[] IS NULL OR e.type = ANY($2)) ORDER BY e.seq LIMIT $3"),
                &[&after, &types, &(limit as i64)],
            )
            .await?;
        let pruned_through = match found.first() {
            Some(r) => get(r, 11)?,
            None => get(
                &self
                    .query_one("SELECT v FROM event_meta WHERE k = 'pruned_through'", &[])
                    .await?,
                0,
            )?,
        };
        Ok(EventPage {
            events: found
                .iter()
                .map(|r| decode(r, 0, rows::event))
                .collect::<Result<_, _>>()?,
            pruned_through,
        })
    }

    /// Claims the endpoint's due deliveries for `claimer` for `claim_ms`: numbers what
    /// committed, then claims, in one transaction (one commit).
    ///
    /// `open`: the endpoint's undelivered deliveries, `k` their place in their session's
    /// queue. `ready`: those that could go now; a session's run is its ready ones from the
    /// first of its queue on (`r = k`: none before them is parked, waiting, unnumbered or held
    /// by another host). `locked`: those rows, skipping any another host is claiming this
    /// instant; a skipped row would leave a hole, so only the run up to the first hole is kept.
    pub(crate) async fn claim_due(
        &self,
        endpoint_id: &str,
        claimer: &str,
        claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        let sql = format!(
            "WITH now AS (SELECT payhost_now_ms() AS t), \
             open AS ( \
               SELECT d.id, d.order_key, d.event_pos, d.state, d.next_at, d.claimed_until, e.seq, \
                      row_number() OVER (PARTITION BY d.order_key ORDER BY d.event_pos) AS k \
               FROM event_deliveries d JOIN events e ON e.pos = d.event_pos \
               WHERE d.endpoint_id = $4 AND d.state <> 'delivered'), \
             ready AS ( \
               SELECT o.id, o.event_pos, o.k, row_number() OVER (PARTITION BY o.order_key ORDER BY o.event_pos) AS r \
               FROM open o, now \
               WHERE o.state = 'pending' AND o.seq IS NOT NULL AND o.next_at <= now.t \
                 AND (o.claimed_until IS NULL OR o.claimed_until < now.t)), \
             wanted AS (SELECT id FROM ready WHERE r = k ORDER BY event_pos LIMIT $3), \
             locked AS (SELECT d.id FROM event_deliveries d WHERE d.id IN (SELECT id FROM wanted) FOR UPDATE SKIP LOCKED), \
             kept AS ( \
               SELECT id FROM (SELECT o.id, o.k, row_number() OVER (PARTITION BY o.order_key ORDER BY o.event_pos) AS r \
                               FROM open o JOIN locked l ON l.id = o.id) x \
               WHERE x.r = x.k), \
             claimed AS (UPDATE event_deliveries d SET claimed_by = $1, claimed_until = (SELECT t FROM now) + $2 FROM kept WHERE d.id = kept.id RETURNING d.*) \
             SELECT {DELIVERY_COLUMNS}, e.seq, {EVENT_COLUMNS} FROM claimed d JOIN events e ON e.pos = d.event_pos ORDER BY d.event_pos"
        );
        let mut client = self.client().await?;
        self.counts.transaction();
        self.counts.statements(4);
        let timed = tokio::time::timeout(self.op_timeout, async {
            let tx = client.transaction().await.map_err(connection_error)?;
            tx.execute("SELECT payhost_sequence_events()", &[])
                .await
                .map_err(|e| classify(e, "events"))?;
            let claimed = tx
                .query(&sql, &[&claimer, &claim_ms, &(limit as i64), &endpoint_id])
                .await
                .map_err(|e| classify(e, "event deliveries"))?;
            tx.commit().await.map_err(|e| classify(e, "commit"))?;
            Ok::<_, StoreError>(claimed)
        })
        .await;
        let claimed = match timed {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(e)) => {
                if client.is_closed() {
                    drop(deadpool_postgres::Object::take(client));
                }
                return Err(e);
            }
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL did not answer within {} ms",
                    self.op_timeout.as_millis()
                )));
            }
        };
        claimed
            .iter()
            .map(|r| Ok((decode(r, 0, rows::delivery)?, decode(r, 11, rows::event)?)))
            .collect()
    }

    /// Deliveries in `state` of numbered events, in event order, up to `limit`.
    pub(crate) async fn read_deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.sequence_events().await?;
        let found = self
            .query(
                &format!("SELECT {DELIVERY_COLUMNS}, e.seq FROM event_deliveries d JOIN events e ON e.pos = d.event_pos WHERE d.state = $1 AND e.seq IS NOT NULL ORDER BY d.event_pos LIMIT $2"),
                &[&state.as_str(), &(limit as i64)],
            )
            .await?;
        found.iter().map(|r| decode(r, 0, rows::delivery)).collect()
    }
}
