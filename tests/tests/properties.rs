//! Random sequences of lifecycle operations — some of them concurrent — with provider outcomes
//! drawn from the sandbox, checking the money invariants and the transition table after every
//! step, that the outbox holds exactly the committed changes (derived from the writes a
//! recording store saw commit), and that payhost's books agree with the sandbox's ledger at the
//! end.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use payhost::Host;
use payhost::domain::*;
use payhost::engine::*;
use payhost::events::{Delivery, DeliveryState, Event, EventPage};
use payhost::store::{HostLease, Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};
use payhost_e2e::{Backend, HOST, Scratch};
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
enum Op {
    /// A new session; outcomes of its authorize, capture and refund calls.
    Create {
        system: bool,
        authorize: &'static str,
        capture: &'static str,
        refund: &'static str,
    },
    Authorize(usize),
    /// Several authorizes of one session at once.
    AuthorizeTogether(usize, usize),
    Capture(usize, i64),
    /// Several identical captures at once.
    CaptureTogether(usize, i64, usize),
    Refund(usize, i64),
    Cancel(usize),
    /// The processor finishes a pending authorization and its webhook is applied.
    Settle(usize),
    Reconcile,
}

fn create() -> impl Strategy<Value = Op> {
    let authorize = prop::sample::select(vec![
        "processed",
        "processed",
        "declined",
        "requires_more",
        "pending",
        "unknown",
        "not_attempted",
        "error",
        "panic",
    ]);
    let money = prop::sample::select(vec![
        "processed",
        "processed",
        "processed",
        "unknown",
        "error",
        "panic",
    ]);
    (prop::bool::weighted(0.2), authorize, money.clone(), money).prop_map(
        |(system, authorize, capture, refund)| Op::Create {
            system,
            authorize,
            capture,
            refund,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => create(),
        4 => (0..6usize).prop_map(Op::Authorize),
        1 => (0..6usize, 2..5usize).prop_map(|(s, n)| Op::AuthorizeTogether(s, n)),
        4 => (0..6usize, 1..1200i64).prop_map(|(p, a)| Op::Capture(p, a)),
        1 => (0..6usize, 1..800i64, 2..4usize).prop_map(|(p, a, n)| Op::CaptureTogether(p, a, n)),
        3 => (0..6usize, 1..1200i64).prop_map(|(p, a)| Op::Refund(p, a)),
        1 => (0..6usize).prop_map(Op::Cancel),
        2 => (0..6usize).prop_map(Op::Settle),
        2 => Just(Op::Reconcile),
    ]
}

struct World {
    host: Arc<Host>,
    recorder: Arc<Recorder>,
    collection: String,
    sessions: Vec<String>,
    statuses: HashMap<String, SessionStatus>,
}

fn terminal(s: SessionStatus) -> bool {
    matches!(
        s,
        SessionStatus::Authorized | SessionStatus::Error | SessionStatus::Canceled
    )
}

impl World {
    fn pick(&self, i: usize) -> Option<String> {
        (!self.sessions.is_empty()).then(|| self.sessions[i % self.sessions.len()].clone())
    }

    async fn payment_of(&self, i: usize) -> Option<Payment> {
        let session = self.pick(i)?;
        let sid = payhost::domain::SessionId(session);
        self.host.store().payment_of_session(&sid).await.unwrap()
    }

    async fn step(&mut self, op: &Op) {
        let h = &self.host;
        match op {
            Op::Create {
                system,
                authorize,
                capture,
                refund,
            } => {
                let s = h
                    .create_session(
                        NewSession {
                            payment_collection_id: self.collection.clone(),
                            provider_id: if *system { "system" } else { "sandbox" }.into(),
                            cart_id: Some("cart".into()),
                            cart: Value::Null,
                            context: Value::Null,
                            data: json!({"sandbox": {"authorize": authorize, "capture": capture, "refund": refund}}),
                            amount: Some(1000),
                            currency_code: None,
                            metadata: Value::Null,
                            initiate: true,
                        },
                        None,
                    )
                    .await
                    .unwrap();
                self.sessions.push(s.id.0);
            }
            Op::Authorize(i) => {
                if let Some(s) = self.pick(*i) {
                    let _ = h
                        .authorize_session(&s, AuthorizeInput::default(), None)
                        .await;
                }
            }
            Op::AuthorizeTogether(i, n) => {
                if let Some(s) = self.pick(*i) {
                    let tasks: Vec<_> = (0..*n)
                        .map(|_| {
                            let (h, s) = (h.clone(), s.clone());
                            tokio::spawn(async move {
                                h.authorize_session(&s, AuthorizeInput::default(), None)
                                    .await
                            })
                        })
                        .collect();
                    for t in tasks {
                        let _ = t.await.unwrap();
                    }
                }
            }
            Op::Capture(i, amount) => {
                if let Some(p) = self.payment_of(*i).await {
                    let _ = h
                        .capture_payment(
                            &p.id.0,
                            CaptureInput {
                                amount: Some(*amount),
                            },
                            None,
                        )
                        .await;
                }
            }
            Op::CaptureTogether(i, amount, n) => {
                if let Some(p) = self.payment_of(*i).await {
                    let tasks: Vec<_> = (0..*n)
                        .map(|_| {
                            let (h, id, a) = (h.clone(), p.id.0.clone(), *amount);
                            tokio::spawn(async move {
                                h.capture_payment(&id, CaptureInput { amount: Some(a) }, None)
                                    .await
                            })
                        })
                        .collect();
                    for t in tasks {
                        let _ = t.await.unwrap();
                    }
                }
            }
            Op::Refund(i, amount) => {
                if let Some(p) = self.payment_of(*i).await {
                    let _ = h
                        .refund_payment(
                            &p.id.0,
                            RefundInput {
                                amount: Some(*amount),
                                reason: None,
                            },
                            None,
                        )
                        .await;
                }
            }
            Op::Cancel(i) => {
                if let Some(p) = self.payment_of(*i).await {
                    let _ = h.cancel_payment(&p.id.0, None).await;
                }
            }
            Op::Settle(i) => {
                if let Some(s) = self.pick(*i) {
                    let session = h.session(&s).await.unwrap();
                    if session.provider_id == "sandbox" {
                        let sandbox = h.providers().get("sandbox").unwrap();
                        if let Ok(hook) = sandbox
                            .call_custom("settle", json!({"session_id": s}))
                            .await
                        {
                            let event = sandbox
                                .call(payhost_provider_api::WebhookRequest {
                                    body: hook["body"].as_str().unwrap().into(),
                                    headers: serde_json::from_value(hook["headers"].clone())
                                        .unwrap(),
                                    received_at_unix_ms: payhost::Clock::now_unix_ms(
                                        &payhost::SystemClock,
                                    ),
                                })
                                .await
                                .unwrap();
                            let _ = h.apply_webhook("sandbox", &event).await;
                        }
                    }
                }
            }
            Op::Reconcile => {
                h.reconcile_due().await.unwrap();
            }
        }
    }

    /// The invariants, after every step.
    async fn check(&mut self) {
        let view = self.host.collection(&self.collection).await.unwrap();
        for s in &view.payment_sessions {
            if let Some(before) = self.statuses.get(&s.id.0)
                && terminal(*before)
            {
                assert_eq!(*before, s.status, "terminal status of {} moved", s.id);
            }
            self.statuses.insert(s.id.0.clone(), s.status);
            let payments: Vec<&Payment> = view
                .payments
                .iter()
                .filter(|p| p.payment_session_id == s.id)
                .collect();
            assert!(payments.len() <= 1, "one payment per session");
            assert_eq!(
                payments.len() == 1,
                s.status == SessionStatus::Authorized,
                "a payment exists exactly when the session is authorized ({})",
                s.id
            );
        }
        for p in &view.payments {
            let (captured, refunded) = (p.captured_amount(), p.refunded_amount());
            assert!(captured <= p.amount, "Σcaptures ≤ amount for {}", p.id);
            assert!(refunded <= captured, "Σrefunds ≤ Σcaptures for {}", p.id);
            if p.canceled_at.is_some() {
                assert_eq!(captured, 0, "nothing captured on canceled {}", p.id);
            }
        }
        for a in self.host.open_attempts().await.unwrap() {
            assert_ne!(
                a.state,
                AttemptState::InFlight,
                "no call is running between steps"
            );
        }
        self.outbox_is_the_committed_changes().await;
    }

    /// The outbox holds exactly one event per committed change, gap-free, each session's (or
    /// collection's) in the order its changes committed.
    async fn outbox_is_the_committed_changes(&self) {
        let events = self.host.events_page(0, None, 100_000).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "numbered without gaps"
        );
        let mut changes = Changes::default();
        for write in self.recorder.committed.lock().unwrap().iter() {
            changes.apply(write);
        }
        let by_key = |list: Vec<Expected>| {
            let mut map: HashMap<String, Vec<Expected>> = HashMap::new();
            for e in list {
                map.entry(e.1.clone()).or_default().push(e);
            }
            map
        };
        let got = by_key(events.iter().map(observed).collect());
        let want = by_key(changes.expected);
        assert_eq!(got, want, "the outbox is the committed changes");
        for e in &events {
            if let Some(status) = e.kind.as_str().strip_prefix("payment_session.") {
                if status != "created" {
                    assert_eq!(
                        e.data["status"], status,
                        "{} carries the session after",
                        e.id
                    );
                }
                assert_eq!(e.data["id"].as_str(), e.payment_session_id.as_deref());
            }
            if e.kind.as_str().starts_with("payment.") {
                assert_eq!(e.data["id"].as_str(), e.payment_id.as_deref());
            }
        }
    }

    /// At the end: every open outcome reconciles, and the sandbox's books match payhost's.
    async fn agree_with_the_sandbox(&self) {
        // Calls that answered `unknown` may land until their deadline has passed.
        payhost_e2e::reconcile_until_settled(&self.host, std::time::Duration::from_secs(5)).await;
        let open = self.host.open_attempts().await.unwrap();
        assert!(open.is_empty(), "every outcome settled: {open:?}");
        let view = self.host.collection(&self.collection).await.unwrap();
        let sandbox = self.host.providers().get("sandbox").unwrap();
        for s in view
            .payment_sessions
            .iter()
            .filter(|s| s.provider_id == "sandbox")
        {
            let ledger = sandbox
                .call_custom("ledger", json!({"session_id": s.id.0}))
                .await
                .unwrap();
            let sum = |op: &str| -> i64 {
                ledger
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["op"] == op && e["response"]["outcome"]["status"] == "processed")
                    .map(|e| e["amount"].as_i64().unwrap())
                    .sum()
            };
            let payment = view.payments.iter().find(|p| p.payment_session_id == s.id);
            assert_eq!(
                sum("capture"),
                payment.map_or(0, Payment::captured_amount),
                "captures of {}",
                s.id
            );
            assert_eq!(
                sum("refund"),
                payment.map_or(0, Payment::refunded_amount),
                "refunds of {}",
                s.id
            );
            let authorized_at_sandbox = sum("authorize") + sum("settle") > 0;
            assert_eq!(
                authorized_at_sandbox,
                s.status == SessionStatus::Authorized,
                "authorization of {}",
                s.id
            );
        }
    }
}

fn run_case(backend: Backend, ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let scratch = Scratch::new();
        let Some(url) = scratch.storage_url(backend).await else {
            return;
        };
        let (config, report) = scratch.load(
            &HOST
                .replace("timeout_ms = 400", "timeout_ms = 2000")
                .replace("sqlite://{dir}/payhost.db", &url),
        );
        let recorder = Arc::new(Recorder {
            inner: open_store(&config).await.unwrap(),
            committed: Default::default(),
        });
        let host = Host::new(recorder.clone(), report.providers)
            .with_events(config.events.clone())
            .with_reconcile(ReconcileSettings {
                first_check_ms: 0,
                base_backoff_ms: 0,
                max_checks: 3,
                stale_after_ms: 60_000,
                landing_margin_ms: 0,
                ..Default::default()
            });
        host.register().await.unwrap();
        let host = Arc::new(host);
        let collection = host
            .create_collection(
                NewCollection {
                    amount: 1000,
                    currency_code: "eur".into(),
                    metadata: Value::Null,
                },
                None,
            )
            .await
            .unwrap()
            .id
            .0;
        let mut world = World {
            host,
            recorder,
            collection,
            sessions: Vec::new(),
            statuses: HashMap::new(),
        };
        for op in &ops {
            world.step(op).await;
            world.check().await;
        }
        world.agree_with_the_sandbox().await;
        world.check().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants_on_sqlite(
        creates in prop::collection::vec(create(), 1..4),
        rest in prop::collection::vec(op(), 1..18),
    ) {
        run_case(Backend::Sqlite, creates.into_iter().chain(rest).collect());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants_on_postgres(
        creates in prop::collection::vec(create(), 1..4),
        rest in prop::collection::vec(op(), 1..18),
    ) {
        run_case(Backend::Postgres, creates.into_iter().chain(rest).collect());
    }
}

/// The store, with a record of every write that committed: the changes the outbox must match.
struct Recorder {
    inner: Arc<dyn Store>,
    committed: std::sync::Mutex<Vec<Vec<WriteOp>>>,
}

#[async_trait::async_trait]
impl Store for Recorder {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let result = self.inner.write(ops.clone()).await;
        if result.is_ok() {
            self.committed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ops);
        }
        result
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn register_host(&self, lease: Duration) -> Result<Option<HostLease>, StoreError> {
        self.inner.register_host(lease).await
    }
    fn host_lease(&self) -> Option<HostLease> {
        self.inner.host_lease()
    }
    async fn renew_host(&self, lease: Duration) -> Result<bool, StoreError> {
        self.inner.renew_host(lease).await
    }
    async fn now_ms(&self) -> Result<i64, StoreError> {
        self.inner.now_ms().await
    }
    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError> {
        self.inner.collection(id).await
    }
    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError> {
        self.inner.session(id).await
    }
    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError> {
        self.inner.sessions_by_cart(cart_id).await
    }
    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.inner.sessions_by_collection(id).await
    }
    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError> {
        self.inner.payment(id).await
    }
    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError> {
        self.inner.payment_of_session(id).await
    }
    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError> {
        self.inner.payments_by_collection(id).await
    }
    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError> {
        self.inner.attempt(id).await
    }
    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError> {
        self.inner.attempts_of(entity).await
    }
    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError> {
        self.inner.open_attempts().await
    }
    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        self.inner.webhook_event(provider_id, event_id).await
    }
    async fn key(&self, key: &str) -> Result<Option<StoredKey>, StoreError> {
        self.inner.key(key).await
    }
    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.inner.events_after(after, types, limit).await
    }
    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        claimer: &str,
        claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        self.inner
            .claim_deliveries(endpoint_id, claimer, claim_ms, limit)
            .await
    }
    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.inner.deliveries(state, limit).await
    }
    fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.inner.appended()
    }
}

/// An event as the committed changes say it must be: its type, what orders it (its session,
/// or else its collection), and the amount of a collection, session, capture or refund.
type Expected = (String, String, Option<i64>);

/// Derives the events from the committed writes alone (never from the events they carry):
/// what each write changed, against the state the writes before it left.
#[derive(Default)]
struct Changes {
    sessions: HashMap<String, (String, SessionStatus)>,
    attempts: HashMap<String, AttemptState>,
    attempt_sessions: HashMap<String, String>,
    payments: HashMap<String, (String, bool)>,
    hooks: HashMap<(String, String), Option<String>>,
    expected: Vec<Expected>,
}

impl Changes {
    fn apply(&mut self, ops: &[WriteOp]) {
        for op in ops {
            let mut push = |kind: &str, key: &str, amount: Option<i64>| {
                self.expected
                    .push((kind.to_owned(), key.to_owned(), amount));
            };
            match op {
                WriteOp::InsertCollection(c) => {
                    push("payment_collection.created", &c.id.0, Some(c.amount))
                }
                WriteOp::InsertSession(s) => {
                    push("payment_session.created", &s.id.0, Some(s.amount));
                    self.sessions.insert(
                        s.id.0.clone(),
                        (s.payment_collection_id.0.clone(), s.status),
                    );
                }
                WriteOp::UpdateSession { session, .. } => {
                    let before = self.sessions.get(&session.id.0).map(|s| s.1);
                    if before != Some(session.status) {
                        push(
                            &format!("payment_session.{}", session.status.as_str()),
                            &session.id.0,
                            Some(session.amount),
                        );
                    }
                    self.sessions.insert(
                        session.id.0.clone(),
                        (session.payment_collection_id.0.clone(), session.status),
                    );
                }
                WriteOp::InsertAttempt(a) => {
                    self.attempts.insert(a.id.0.clone(), a.state);
                    self.attempt_sessions
                        .insert(a.id.0.clone(), a.session_id.0.clone());
                }
                WriteOp::UpdateAttempt(a) => {
                    let before = self.attempts.get(&a.id.0).copied();
                    let was_open = matches!(
                        before,
                        Some(AttemptState::Unknown | AttemptState::NeedsOperator)
                    );
                    let kind = match a.state {
                        AttemptState::Unknown if !was_open => Some("attempt.unknown"),
                        AttemptState::NeedsOperator
                            if before != Some(AttemptState::NeedsOperator) =>
                        {
                            Some("attempt.needs_operator")
                        }
                        AttemptState::Succeeded | AttemptState::Failed if was_open => {
                            Some("attempt.resolved")
                        }
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        push(kind, &a.session_id.0, None);
                    }
                    self.attempts.insert(a.id.0.clone(), a.state);
                }
                WriteOp::ClaimAttempt { id, .. }
                    if self.attempts.get(&id.0) == Some(&AttemptState::InFlight) =>
                {
                    let session = self.attempt_sessions[&id.0].clone();
                    self.expected
                        .push(("attempt.unknown".into(), session, None));
                    self.attempts.insert(id.0.clone(), AttemptState::Unknown);
                }
                WriteOp::InsertPayment(p) => {
                    self.payments
                        .insert(p.id.0.clone(), (p.payment_session_id.0.clone(), false));
                }
                WriteOp::InsertCapture(p, c) => {
                    let session = self.payments[&p.0].0.clone();
                    push("payment.captured", &session, Some(c.amount));
                }
                WriteOp::InsertRefund(p, r) => {
                    let session = self.payments[&p.0].0.clone();
                    push("payment.refunded", &session, Some(r.amount));
                }
                WriteOp::UpdatePayment { payment, .. } => {
                    let entry = self.payments.get_mut(&payment.id.0).unwrap();
                    if payment.canceled_at.is_some() && !entry.1 {
                        entry.1 = true;
                        let session = entry.0.clone();
                        push("payment.canceled", &session, None);
                    }
                }
                WriteOp::InsertWebhookEvent(w) => {
                    self.hooks.insert(
                        (w.provider_id.clone(), w.event_id.clone()),
                        w.session_id.clone(),
                    );
                }
                WriteOp::MarkWebhookApplied {
                    provider_id,
                    event_id,
                    ..
                } => {
                    let session = self.hooks[&(provider_id.clone(), event_id.clone())]
                        .clone()
                        .unwrap();
                    push("webhook.applied", &session, None);
                }
                _ => {}
            }
        }
    }
}

/// What an event says, in the shape of [`Expected`] (amounts only where the change has one).
fn observed(e: &Event) -> Expected {
    let key = e
        .payment_session_id
        .clone()
        .or_else(|| e.payment_collection_id.clone())
        .unwrap();
    let kind = e.kind.as_str();
    let amount = match kind {
        "payment.canceled" | "webhook.applied" => None,
        t if t.starts_with("attempt.") => None,
        _ => e.amount,
    };
    (kind.to_owned(), key, amount)
}
