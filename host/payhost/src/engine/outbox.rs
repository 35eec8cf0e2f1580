//! The outbox's engine side: which change makes which event (appended to the very write that
//! makes the change), the stream embedders read, and the deliverer that POSTs events to
//! endpoints.

use futures_util::Stream;

use super::{
    Arc, Duration, EngineError, Host, Serialize, Value, WebhookEvent, WriteOp, no_attempt,
    not_found,
};
use crate::domain::*;
use crate::events::{Cursor, Delivery, DeliveryState, Endpoint, Event, EventSettings, EventType};

/// Events read per store query.
const PAGE: usize = 256;
/// Deliveries claimed per pass of an endpoint (sessions sent at once, each in order).
const CLAIM: usize = 256;
/// How often delivered events past the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Host {
    /// Where events go and how long they are kept.
    pub fn with_events(mut self, settings: EventSettings) -> Host {
        *self.events.get_mut().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        self
    }

    /// The event settings: the running request's pinned generation, else the current one.
    pub fn event_settings(&self) -> Arc<EventSettings> {
        super::PINNED
            .try_with(|p| p.events.clone())
            .unwrap_or_else(|_| {
                self.events
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
    }

    /// Swaps the event settings (a reload): writes from now on deliver to the new endpoints,
    /// and the deliverer starts, stops or restarts each endpoint's task to match. Deliveries
    /// to a removed endpoint are parked, as at start-up.
    pub fn swap_event_settings(&self, settings: EventSettings) {
        *self.events.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        self.events_swapped.notify_one();
    }

    /// The op appending `event` (about `provider`'s session or payment, if any), with a
    /// delivery to each endpoint that wants its type and provider.
    pub(super) fn event_op(&self, event: Event, provider: Option<&str>) -> WriteOp {
        let deliver_to = self
            .event_settings()
            .endpoints
            .iter()
            .filter(|e| e.wants(event.kind, provider))
            .map(|e| e.id.clone())
            .collect();
        WriteOp::AppendEvent { event, deliver_to }
    }

    pub(super) fn collection_event(&self, collection: &PaymentCollection) -> WriteOp {
        let mut e = Event::new(
            EventType::CollectionCreated,
            self.now(),
            to_json(collection),
        );
        e.payment_collection_id = Some(collection.id.0.clone());
        e.amount = Some(collection.amount);
        e.currency_code = Some(collection.currency_code.code().to_owned());
        self.event_op(e, None)
    }

    /// The event of a session's new status, if `before` was another.
    pub(super) fn session_changed(
        &self,
        before: Option<SessionStatus>,
        after: &PaymentSession,
        payment: Option<&PaymentId>,
    ) -> Option<WriteOp> {
        let kind = match (before, after.status) {
            (None, _) => EventType::SessionCreated,
            (Some(b), a) if b == a => return None,
            (_, SessionStatus::Pending) => EventType::SessionPending,
            (_, SessionStatus::RequiresMore) => EventType::SessionRequiresMore,
            (_, SessionStatus::Authorized) => EventType::SessionAuthorized,
            (_, SessionStatus::Error) => EventType::SessionError,
            (_, SessionStatus::Canceled) => EventType::SessionCanceled,
        };
        let mut e = Event::new(kind, after.updated_at, to_json(after));
        e.payment_collection_id = Some(after.payment_collection_id.0.clone());
        e.payment_session_id = Some(after.id.0.clone());
        e.payment_id = payment.map(|p| p.0.clone());
        e.amount = Some(after.amount);
        e.currency_code = Some(after.currency_code.code().to_owned());
        Some(self.event_op(e, Some(&after.provider_id)))
    }

    /// A payment's capture, refund or cancel: `payment` as it stands after it, `amount` the
    /// movement's.
    pub(super) fn payment_event(
        &self,
        kind: EventType,
        payment: &Payment,
        amount: i64,
        attempt: &AttemptId,
    ) -> WriteOp {
        let mut e = Event::new(kind, payment.updated_at, to_json(payment));
        e.payment_collection_id = Some(payment.payment_collection_id.0.clone());
        e.payment_session_id = Some(payment.payment_session_id.0.clone());
        e.payment_id = Some(payment.id.0.clone());
        e.attempt_id = Some(attempt.0.clone());
        e.amount = Some(amount);
        e.currency_code = Some(payment.currency_code.code().to_owned());
        self.event_op(e, Some(&payment.provider_id))
    }

    /// An attempt became unknown, needs an operator, or was resolved (`resolved_by`).
    pub(super) fn attempt_event(
        &self,
        kind: EventType,
        attempt: &Attempt,
        resolved_by: Option<&str>,
    ) -> WriteOp {
        let mut data = to_json(attempt);
        if let (Some(by), Value::Object(map)) = (resolved_by, &mut data) {
            map.insert("resolved_by".into(), Value::String(by.to_owned()));
        }
        let mut e = Event::new(kind, attempt.updated_at, data);
        e.payment_session_id = Some(attempt.session_id.0.clone());
        e.payment_id = attempt.payment_id.as_ref().map(|p| p.0.clone());
        e.attempt_id = Some(attempt.id.0.clone());
        e.amount = Some(attempt.amount);
        e.currency_code = Some(attempt.currency_code.code().to_owned());
        self.event_op(e, Some(&attempt.provider_id))
    }

    /// A verified webhook was applied.
    pub(super) fn webhook_event(
        &self,
        provider_id: &str,
        event: &WebhookEvent,
        at: Timestamp,
    ) -> WriteOp {
        let mut e = Event::new(
            EventType::WebhookApplied,
            at,
            serde_json::json!({
                "provider_id": provider_id,
                "event_id": event.event_id,
                "action": event.action,
                "payment_session_id": event.session_id,
            }),
        );
        e.payment_session_id = event.session_id.clone();
        self.event_op(e, Some(provider_id))
    }

    // ------------------------------------------------------------ reading

    /// Up to `limit` events after `after` (0: from the start) of the `types` named, or
    /// [`EngineError::EventsPruned`] when `after` is inside the pruned prefix.
    pub async fn events_page(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<Vec<Event>, EngineError> {
        let page = self.store.events_after(after, types, limit).await?;
        if after < page.pruned_through {
            return Err(EngineError::EventsPruned {
                after,
                pruned_through: page.pruned_through,
            });
        }
        Ok(page.events)
    }

    /// The cursor before the oldest event kept (the last pruned one's; the start if none was).
    pub async fn oldest_cursor(&self) -> Result<Cursor, EngineError> {
        let page = self.store.events_after(i64::MAX, None, 1).await?;
        Ok(Cursor(page.pruned_through))
    }

    /// [`Host::events_page`], waiting up to `wait` for an event when there is none yet.
    pub async fn wait_for_events(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
        wait: Duration,
    ) -> Result<Vec<Event>, EngineError> {
        let until = tokio::time::Instant::now() + wait;
        let appended = self.store.appended();
        loop {
            let woken = appended.notified();
            let events = self.events_page(after, types.clone(), limit).await?;
            if !events.is_empty() || tokio::time::Instant::now() >= until {
                return Ok(events);
            }
            let nap = self
                .event_settings()
                .poll
                .min(until - tokio::time::Instant::now());
            let _ = tokio::time::timeout(nap, woken).await;
        }
    }

    /// Every event after `after` (`None`: from the oldest kept), then each new one as it commits:
    /// at least once, in commit order. Store the [`Event::cursor`] of each event handled and
    /// resume after it.
    /// Ends with [`EngineError::EventsPruned`] if `after` was pruned; a store error is yielded
    /// and the stream goes on trying.
    pub fn events(
        self: &Arc<Self>,
        after: Option<Cursor>,
    ) -> impl Stream<Item = Result<Event, EngineError>> + Send + 'static {
        struct State {
            host: Arc<Host>,
            after: i64,
            /// No cursor was given: start at the oldest event kept.
            from_oldest: bool,
            buffer: std::collections::VecDeque<Event>,
            done: bool,
        }
        let state = State {
            host: self.clone(),
            after: after.unwrap_or_default().seq(),
            from_oldest: after.is_none(),
            buffer: Default::default(),
            done: false,
        };
        futures_util::stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                if let Some(e) = s.buffer.pop_front() {
                    s.after = e.seq;
                    return Some((Ok(e), s));
                }
                let appended = s.host.store.appended();
                let woken = appended.notified();
                match s.host.events_page(s.after, None, PAGE).await {
                    Ok(events) if !events.is_empty() => {
                        s.from_oldest = false;
                        s.buffer.extend(events);
                    }
                    Ok(_) => {
                        s.from_oldest = false;
                        let _ = tokio::time::timeout(s.host.event_settings().poll, woken).await;
                    }
                    Err(EngineError::EventsPruned { pruned_through, .. }) if s.from_oldest => {
                        s.after = pruned_through;
                    }
                    Err(e @ EngineError::EventsPruned { .. }) => {
                        s.done = true;
                        return Some((Err(e), s));
                    }
                    Err(e) => {
                        tokio::time::sleep(s.host.event_settings().poll).await;
                        return Some((Err(e), s));
                    }
                }
            }
        })
    }

    // ------------------------------------------------------------ delivering

    /// Deliveries that are parked (retried for their whole period), oldest first.
    pub async fn parked_deliveries(&self, limit: usize) -> Result<Vec<Delivery>, EngineError> {
        Ok(self.store.deliveries(DeliveryState::Parked, limit).await?)
    }

    /// Sends a parked delivery (or, with `None`, every parked one) again from scratch, with a
    /// fresh retry period, recording `by` as who asked. Only deliveries to endpoints configured
    /// here are sent again.
    pub async fn redeliver(
        &self,
        id: Option<&str>,
        by: &str,
        idempotency_key: Option<&str>,
    ) -> Result<usize, EngineError> {
        let request = serde_json::json!({ "id": id, "by": by });
        self.idempotent(idempotency_key, "redeliver", &request, no_attempt, || {
            self.redeliver_once(id, by)
        })
        .await
    }

    async fn redeliver_once(&self, id: Option<&str>, by: &str) -> Result<usize, EngineError> {
        if by.trim().is_empty() {
            return Err(EngineError::invalid(
                "by",
                "say who sends the deliveries again",
            ));
        }
        let parked = self
            .store
            .deliveries(DeliveryState::Parked, usize::MAX >> 1)
            .await?;
        let configured: Vec<String> = self
            .event_settings()
            .endpoints
            .iter()
            .map(|e| e.id.clone())
            .collect();
        let n = match id {
            Some(id) => {
                let Some(d) = parked.iter().find(|d| d.id == id) else {
                    return Err(not_found("parked delivery", id));
                };
                if !configured.contains(&d.endpoint_id) {
                    return Err(EngineError::invalid(
                        "id",
                        format!(
                            "delivery {id} is to endpoint `{}`, which is not configured",
                            d.endpoint_id
                        ),
                    ));
                }
                1
            }
            None => parked
                .iter()
                .filter(|d| configured.contains(&d.endpoint_id))
                .count(),
        };
        self.store
            .write(vec![WriteOp::Redeliver {
                id: id.map(str::to_owned),
                endpoints: configured,
                by: by.to_owned(),
            }])
            .await?;
        Ok(n)
    }

    /// Who claims deliveries for this host.
    fn claimer(&self) -> String {
        self.store
            .host_lease()
            .map(|l| format!("{}:{}", l.host_id, l.epoch))
            .unwrap_or_else(|| "local".into())
    }

    /// One pass for one endpoint: claims its due deliveries (for each session, a run from its
    /// first undelivered one on), sends each session's run in order — sessions at once — and
    /// records every outcome in one write. A failed try holds the rest of its session's run
    /// back (released untried). Returns how many were claimed.
    pub async fn deliver_due(
        &self,
        endpoint: &Endpoint,
        client: &reqwest::Client,
    ) -> Result<usize, EngineError> {
        let claimer = self.claimer();
        let claimed = self
            .store
            .claim_deliveries(
                &endpoint.id,
                &claimer,
                self.event_settings().claim.as_millis() as i64,
                CLAIM,
            )
            .await?;
        let n = claimed.len();
        if n == 0 {
            return Ok(0);
        }
        // A try starts only if it ends within the claim: another host never sends what this one
        // still is.
        let claimed_until = std::time::Instant::now() + self.event_settings().claim;
        // Runs by session, each in order (the store returns them ordered).
        let mut runs: Vec<(String, Vec<(Delivery, Event)>)> = Vec::new();
        for (delivery, event) in claimed {
            let key = event.order_key();
            match runs.iter_mut().find(|(k, _)| *k == key) {
                Some((_, run)) => run.push((delivery, event)),
                None => runs.push((key, vec![(delivery, event)])),
            }
        }
        let sent = runs.into_iter().map(|(_, run)| async move {
            let mut outcome = Outcomes::default();
            let mut run = run.into_iter().peekable();
            while let Some((delivery, event)) = run.next_if(|_| {
                std::time::Instant::now() + endpoint.timeout < claimed_until
            }) {
                let started = std::time::Instant::now();
                let m = crate::metrics::global();
                match post(client, endpoint, &event).await {
                    Ok(()) => {
                        m.event_delivered(&endpoint.id, "delivered", started.elapsed());
                        outcome.delivered.push(delivery.id);
                    }
                    Err(why) => {
                        let now = self.store_now().await.unwrap_or_else(|_| self.now());
                        let first = delivery.first_tried_at.unwrap_or(now);
                        let wait = endpoint.backoff(delivery.attempts, jitter());
                        let park = now + wait.as_millis() as i64
                            > first + endpoint.retry_for.as_millis() as i64;
                        m.event_delivered(
                            &endpoint.id,
                            if park { "parked" } else { "failed" },
                            started.elapsed(),
                        );
                        if park {
                            tracing::error!(delivery = %delivery.id, endpoint = %endpoint.id, tries = delivery.attempts + 1, "event delivery parked after its retry period: {why}; `payhost events redeliver` sends it again");
                        } else {
                            tracing::warn!(delivery = %delivery.id, endpoint = %endpoint.id, tries = delivery.attempts + 1, retry_in_ms = wait.as_millis() as u64, "event delivery failed: {why}");
                        }
                        outcome.failed.push((
                            delivery.id,
                            (!park).then_some(wait.as_millis() as i64),
                            why,
                        ));
                        break;
                    }
                }
            }
            outcome.released.extend(run.map(|(d, _)| d.id));
            outcome
        });
        let mut all = Outcomes::default();
        for o in futures_util::future::join_all(sent).await {
            all.delivered.extend(o.delivered);
            all.failed.extend(o.failed);
            all.released.extend(o.released);
        }
        // One write for the pass. A store error leaves the claims to lapse, and the deliveries
        // are sent again (at least once; receivers dedupe by event id).
        let op = WriteOp::DeliveryOutcomes {
            claimer,
            delivered: all.delivered,
            failed: all.failed,
            released: all.released,
        };
        if let Err(e) = self.store.write(vec![op]).await {
            tracing::warn!(code = e.code(), endpoint = %endpoint.id, "recording event deliveries failed: {e}");
        }
        Ok(n)
    }

    /// Delivers events to each configured endpoint (one task each, so a slow endpoint delays
    /// only its own deliveries) and prunes delivered events past the retention, until the tasks
    /// are aborted. Follows [`Host::swap_event_settings`]: a new endpoint gets its task, a
    /// removed one loses it (its pending deliveries are parked), a changed one is restarted with
    /// its new settings (a delivery it was sending is sent again: deliveries are at least once).
    pub fn spawn_deliverer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let host = self.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("payhost/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default();
            let mut running: std::collections::HashMap<
                String,
                (Endpoint, tokio::task::AbortHandle),
            > = std::collections::HashMap::new();
            let mut tasks = tokio::task::JoinSet::new();
            let swapped = host.events_swapped.clone();
            let mut next_prune = tokio::time::Instant::now();
            let mut first = true;
            loop {
                let woken = swapped.notified();
                let settings = host.event_settings();
                let wanted: std::collections::HashMap<&str, &Endpoint> = settings
                    .endpoints
                    .iter()
                    .map(|e| (e.id.as_str(), e))
                    .collect();
                let ids_changed = first
                    || running.len() != wanted.len()
                    || running.keys().any(|id| !wanted.contains_key(id.as_str()));
                first = false;
                let stale: Vec<String> = running
                    .iter()
                    .filter(|(id, (e, _))| {
                        wanted.get(id.as_str()).is_none_or(|w| !same_endpoint(w, e))
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in stale {
                    if let Some((_, task)) = running.remove(&id) {
                        task.abort();
                    }
                }
                if ids_changed {
                    // Deliveries to an endpoint removed from the config are parked, so they are
                    // listed (`payhost events failed`) rather than waiting unseen.
                    let configured = wanted.keys().map(|id| (*id).to_owned()).collect();
                    if let Err(e) = host
                        .store
                        .write(vec![WriteOp::ParkUnconfigured { configured }])
                        .await
                    {
                        tracing::warn!(
                            code = e.code(),
                            "parking deliveries to removed endpoints failed: {e}"
                        );
                    }
                }
                for (id, endpoint) in wanted {
                    if running.contains_key(id) {
                        continue;
                    }
                    let endpoint = endpoint.clone();
                    let (h, client) = (host.clone(), client.clone());
                    let mine = endpoint.clone();
                    let task = tasks.spawn(async move {
                        let appended = h.store.appended();
                        loop {
                            let woken = appended.notified();
                            let tried = match h.deliver_due(&mine, &client).await {
                                Ok(n) => n,
                                Err(e) => {
                                    tracing::warn!(code = e.code(), endpoint = %mine.id, "event delivery pass failed: {e}");
                                    0
                                }
                            };
                            if tried == 0 {
                                let _ = tokio::time::timeout(h.event_settings().poll, woken).await;
                            }
                        }
                    });
                    running.insert(id.to_owned(), (endpoint, task));
                }
                if tokio::time::Instant::now() >= next_prune {
                    if let Err(e) = host.prune_events().await {
                        tracing::warn!(code = e.code(), "pruning events failed: {e}");
                    }
                    next_prune = tokio::time::Instant::now()
                        + PRUNE_EVERY.min(settings.retention.max(settings.poll));
                }
                // Reap finished tasks (an aborted one) without waiting for them.
                while tasks.try_join_next().is_some() {}
                let _ = tokio::time::timeout_at(next_prune, woken).await;
            }
        })
    }

    /// Prunes delivered events older than the retention.
    pub async fn prune_events(&self) -> Result<(), EngineError> {
        let before = self.now() - self.event_settings().retention.as_millis() as i64;
        self.store
            .write(vec![WriteOp::PruneEvents { before }])
            .await?;
        Ok(())
    }
}

/// What happened to the deliveries of a pass.
#[derive(Default)]
struct Outcomes {
    delivered: Vec<String>,
    failed: Vec<(String, Option<i64>, String)>,
    released: Vec<String>,
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A number in [0, 1) that differs between calls and hosts.
fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0
}

/// POSTs one event, signed. Ok only for a 2xx read in full.
/// Whether two settings of one endpoint deliver alike (its task is kept across a reload).
fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    a.url == b.url
        && a.secret == b.secret
        && a.previous_secrets == b.previous_secrets
        && a.types == b.types
        && a.providers == b.providers
        && (a.timeout, a.retry_for, a.retry_base, a.retry_max)
            == (b.timeout, b.retry_for, b.retry_base, b.retry_max)
}

/// `t=…,v1=…`, with one more `v1=` for each secret a reload replaced whose overlap has not ended
/// (a receiver verifying with either accepts; `payhost::events::verify` takes any match).
fn signature(endpoint: &Endpoint, t: i64, body: &[u8]) -> String {
    let mut secrets = endpoint
        .signing_secrets(std::time::SystemTime::now())
        .into_iter();
    let mut header = crate::events::sign(secrets.next().unwrap_or_default(), t, body);
    for other in secrets {
        let extra = crate::events::sign(other, t, body);
        if let Some(v1) = extra.split_once(",v1=").map(|(_, v)| v) {
            header.push_str(",v1=");
            header.push_str(v1);
        }
    }
    header
}

async fn post(client: &reqwest::Client, endpoint: &Endpoint, event: &Event) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let answer = client
        .post(&endpoint.url)
        .timeout(endpoint.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            crate::events::SIGNATURE_HEADER,
            signature(endpoint, t, &body),
        )
        .header(crate::events::EVENT_ID_HEADER, &event.id)
        .header("payhost-event-type", event.kind.as_str())
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "failed"
            };
            // Without the URL: its query may hold a token (the endpoint id names it).
            format!("{kind}: {}", e.without_url())
        })?;
    let status = answer.status();
    // Read the answer (bounded by the timeout and in size), so the connection can be reused and
    // a 2xx counts only once it arrived whole: a cut answer may be a proxy's, not the receiver's.
    let read = read_answer(answer).await;
    match (status.is_success(), read) {
        (true, Ok(())) => Ok(()),
        (true, Err(why)) => Err(format!("the endpoint answered {status}, but {why}")),
        (false, _) => Err(format!("the endpoint answered {status}")),
    }
}

/// The most of an endpoint's answer read: receivers answer with a word, not a document.
const MAX_ENDPOINT_ANSWER: usize = 64 * 1024;

/// Reads an endpoint's answer through, up to [`MAX_ENDPOINT_ANSWER`].
async fn read_answer(mut answer: reqwest::Response) -> Result<(), String> {
    let mut read = 0usize;
    loop {
        match answer.chunk().await {
            Ok(None) => return Ok(()),
            Ok(Some(chunk)) => {
                read += chunk.len();
                if read > MAX_ENDPOINT_ANSWER {
                    return Err(format!(
                        "its answer is over {MAX_ENDPOINT_ANSWER} bytes (not read further)"
                    ));
                }
            }
            Err(e) => return Err(format!("its answer was cut off: {}", e.without_url())),
        }
    }
}
