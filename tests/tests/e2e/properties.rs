//! Random sequences of lifecycle operations — some of them concurrent — with provider outcomes
//! drawn from the sandbox. Each operation's result is checked against a model of what it must
//! give (the status, the amounts, or the error code), and the model against the host's state;
//! after every step the money invariants and the transition table hold, the outbox holds
//! exactly the committed changes (derived from the writes a recording store saw commit), and at
//! the end payhost's books agree with the sandbox's ledger. Webhooks arrive through the intake
//! (`receive_webhook`: verification, event-id dedupe, the outbox), delivered again at times.
//!
//! The generator picks mostly targets an operation can act on, so that each kind of operation
//! has an effect in most cases; the distribution is printed once and held to that.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use payhost::Host;
use payhost::domain::*;
use payhost::engine::*;
use payhost::events::{Delivery, DeliveryState, Event, EventPage};
use payhost::store::{HostLease, Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};
use payhost_e2e::{Backend, HOST, Scratch};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};
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
    /// `any`: any session (refusals too), else one that can be authorized.
    Authorize {
        pick: usize,
        any: bool,
    },
    /// Several authorizes of one session at once.
    AuthorizeTogether {
        pick: usize,
        n: usize,
    },
    Capture {
        pick: usize,
        amount: i64,
        any: bool,
    },
    /// Several identical captures at once.
    CaptureTogether {
        pick: usize,
        amount: i64,
        n: usize,
    },
    Refund {
        pick: usize,
        amount: i64,
        any: bool,
    },
    Cancel {
        pick: usize,
        any: bool,
    },
    /// The processor finishes a pending authorization; its webhook arrives at the intake.
    Settle {
        pick: usize,
    },
    /// The processor sends a webhook it sent before again.
    Resend {
        pick: usize,
    },
    Reconcile,
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Authorize { .. } => "authorize",
            Op::AuthorizeTogether { .. } => "authorize_together",
            Op::Capture { .. } => "capture",
            Op::CaptureTogether { .. } => "capture_together",
            Op::Refund { .. } => "refund",
            Op::Cancel { .. } => "cancel",
            Op::Settle { .. } => "settle",
            Op::Resend { .. } => "resend",
            Op::Reconcile => "reconcile",
        }
    }
}

fn create() -> impl Strategy<Value = Op> {
    let authorize = prop::sample::select(vec![
        "processed",
        "processed",
        "processed",
        "processed",
        "pending",
        "pending",
        "pending",
        "pending",
        "declined",
        "requires_more",
        "unknown",
        "not_attempted",
        "error",
        "panic",
    ]);
    let money = prop::sample::select(vec![
        "processed",
        "processed",
        "processed",
        "processed",
        "processed",
        "processed",
        "processed",
        "processed",
        "unknown",
        "error",
        "panic",
    ]);
    (prop::bool::weighted(0.15), authorize, money.clone(), money).prop_map(
        |(system, authorize, capture, refund)| Op::Create {
            system,
            authorize,
            capture,
            refund,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let any = || prop::bool::weighted(0.1);
    prop_oneof![
        1 => create(),
        3 => (0..8usize, any()).prop_map(|(pick, any)| Op::Authorize { pick, any }),
        1 => (0..8usize, 2..5usize).prop_map(|(pick, n)| Op::AuthorizeTogether { pick, n }),
        5 => (0..8usize, 1..1200i64, any()).prop_map(|(pick, amount, any)| Op::Capture { pick, amount, any }),
        1 => (0..8usize, 1..800i64, 2..4usize).prop_map(|(pick, amount, n)| Op::CaptureTogether { pick, amount, n }),
        5 => (0..8usize, 1..1200i64, any()).prop_map(|(pick, amount, any)| Op::Refund { pick, amount, any }),
        1 => (0..8usize, any()).prop_map(|(pick, any)| Op::Cancel { pick, any }),
        4 => (0..8usize).prop_map(|pick| Op::Settle { pick }),
        3 => (0..8usize).prop_map(|pick| Op::Resend { pick }),
        2 => Just(Op::Reconcile),
    ]
}

/// What an operation gave, in a comparable form: what it did, or the error code.
type Got = Result<String, String>;

/// A money call whose outcome is open, as the model knows it.
#[derive(Debug, Clone)]
struct Open {
    attempt: Option<String>,
    operation: &'static str,
    amount: i64,
    /// Whether the processor acted (`unknown`: yes, the answer was lost; `panic`: no).
    acted: bool,
}

#[derive(Debug, Clone)]
struct PaymentModel {
    id: String,
    amount: i64,
    captured: i64,
    refunded: i64,
    canceled: bool,
    open: Option<Open>,
}

#[derive(Debug, Clone)]
struct SessionModel {
    id: String,
    sandbox: bool,
    authorize: &'static str,
    capture: &'static str,
    refund: &'static str,
    status: SessionStatus,
    /// The processor holds a pending authorization: `x.settle` completes it.
    awaiting: bool,
    open: Option<Open>,
    payment: Option<PaymentModel>,
}

/// A webhook the processor sent: its raw request, and whether payhost applied it.
#[derive(Debug, Clone)]
struct Hook {
    session: usize,
    body: String,
    headers: Vec<(String, String)>,
    applied: bool,
}

/// A session an authorize can act on.
fn can_authorize(s: &SessionModel) -> bool {
    matches!(
        s.status,
        SessionStatus::Pending | SessionStatus::RequiresMore
    ) && s.open.is_none()
        && !s.awaiting
}

/// What the model says an operation on `s` gives, and what it does to the model.
fn predict_authorize(s: &mut SessionModel) -> Got {
    match s.status {
        SessionStatus::Error | SessionStatus::Canceled => {
            return Err("invalid_transition".into());
        }
        SessionStatus::Authorized => return Ok("authorized".into()),
        _ => {}
    }
    if s.open.is_some() {
        return Err("attempt_unresolved".into());
    }
    let outcome = if s.sandbox { s.authorize } else { "processed" };
    let open = |acted| Open {
        attempt: None,
        operation: "authorize",
        amount: 1000,
        acted,
    };
    match outcome {
        "processed" => authorized(s),
        "declined" => {
            s.status = SessionStatus::Error;
            Ok("error, declined".into())
        }
        "requires_more" if s.status == SessionStatus::RequiresMore => authorized(s),
        "requires_more" => {
            s.status = SessionStatus::RequiresMore;
            Ok("requires_more".into())
        }
        "pending" => {
            s.status = SessionStatus::Pending;
            s.awaiting = true;
            Ok("pending".into())
        }
        "unknown" => {
            s.open = Some(open(true));
            Err("outcome_unknown".into())
        }
        "panic" => {
            s.open = Some(open(false));
            Err("outcome_unknown".into())
        }
        "not_attempted" => Err("not_attempted".into()),
        "error" => Err("provider_error".into()),
        other => panic!("no model for an authorize answering {other}"),
    }
}

fn authorized(s: &mut SessionModel) -> Got {
    s.status = SessionStatus::Authorized;
    s.awaiting = false;
    s.payment = Some(PaymentModel {
        id: String::new(),
        amount: 1000,
        captured: 0,
        refunded: 0,
        canceled: false,
        open: None,
    });
    Ok("authorized".into())
}

/// A capture, refund or cancel of `s`'s payment.
fn predict_money(s: &mut SessionModel, operation: &'static str, amount: i64) -> Got {
    let (sandbox, capture, refund) = (s.sandbox, s.capture, s.refund);
    let p = s.payment.as_mut().expect("a payment to act on");
    if p.open.is_some() {
        return Err("attempt_unresolved".into());
    }
    if p.canceled {
        return Err("invalid_transition".into());
    }
    let fits = match operation {
        "capture" => p.captured + amount <= p.amount,
        "refund" => p.refunded + amount <= p.captured,
        _ => p.captured == 0,
    };
    if !fits {
        return Err("invalid_transition".into());
    }
    let outcome = match (sandbox, operation) {
        (true, "capture") => capture,
        (true, "refund") => refund,
        _ => "processed",
    };
    let open = |acted| Open {
        attempt: None,
        operation,
        amount,
        acted,
    };
    match outcome {
        "processed" => Ok(apply_money(p, operation, amount)),
        "unknown" => {
            p.open = Some(open(true));
            Err("outcome_unknown".into())
        }
        "panic" => {
            p.open = Some(open(false));
            Err("outcome_unknown".into())
        }
        "error" => Err("provider_error".into()),
        other => panic!("no model for a {operation} answering {other}"),
    }
}

fn apply_money(p: &mut PaymentModel, operation: &str, amount: i64) -> String {
    match operation {
        "capture" => {
            p.captured += amount;
            format!("captured {}", p.captured)
        }
        "refund" => {
            p.refunded += amount;
            format!("refunded {}", p.refunded)
        }
        _ => {
            p.canceled = true;
            "canceled".into()
        }
    }
}

fn got_authorize(r: Result<AuthorizeResult, EngineError>) -> Got {
    match r {
        Ok(r) if r.decline.is_some() => {
            Ok(format!("{}, declined", r.payment_session.status.as_str()))
        }
        Ok(r) => Ok(r.payment_session.status.as_str().to_owned()),
        Err(e) => Err(e.code().to_owned()),
    }
}

fn got_money(r: Result<Payment, EngineError>, operation: &str) -> Got {
    match r {
        Ok(p) => Ok(match operation {
            "capture" => format!("captured {}", p.captured_amount()),
            "refund" => format!("refunded {}", p.refunded_amount()),
            _ if p.canceled_at.is_some() => "canceled".into(),
            _ => "not canceled".into(),
        }),
        Err(e) => Err(e.code().to_owned()),
    }
}

fn got_hook(r: Result<WebhookReceipt, EngineError>) -> Got {
    match r {
        Ok(r) if r.duplicate => Ok("duplicate".into()),
        Ok(_) => Ok("applied".into()),
        Err(e) => Err(e.code().to_owned()),
    }
}

/// The sorted results of operations run at once (they serialize on their entity's lock, in an
/// order nobody chooses).
fn sorted(mut results: Vec<Got>) -> Vec<Got> {
    results.sort();
    results
}

/// How often each kind of operation ran and acted, over every case of a run.
#[derive(Debug, Default, Clone, Copy)]
struct KindStats {
    runs: usize,
    acted: usize,
    cases_with: usize,
    cases_acted: usize,
}

static STATS: Mutex<BTreeMap<&'static str, KindStats>> = Mutex::new(BTreeMap::new());

struct World {
    host: Arc<Host>,
    recorder: Arc<Recorder>,
    collection: String,
    sessions: Vec<SessionModel>,
    hooks: Vec<Hook>,
    statuses: HashMap<String, SessionStatus>,
    /// This case's kinds: (ran, acted).
    seen: BTreeMap<&'static str, (bool, bool)>,
}

fn terminal(s: SessionStatus) -> bool {
    matches!(
        s,
        SessionStatus::Authorized | SessionStatus::Error | SessionStatus::Canceled
    )
}

impl World {
    /// The `pick`-th of the sessions that `fits`; with `any`, of all (refusals are checked
    /// too). `None`: nothing to act on, and the operation is not run.
    fn pick(&self, pick: usize, any: bool, fits: impl Fn(&SessionModel) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.sessions.len())
            .filter(|i| any || fits(&self.sessions[*i]))
            .collect();
        (!candidates.is_empty()).then(|| candidates[pick % candidates.len()])
    }

    /// Like [`World::pick`], among the sessions with a payment.
    fn with_payment(
        &self,
        pick: usize,
        any: bool,
        fits: impl Fn(&PaymentModel) -> bool,
    ) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.sessions.len())
            .filter(|i| {
                self.sessions[*i]
                    .payment
                    .as_ref()
                    .is_some_and(|p| any || fits(p))
            })
            .collect();
        (!candidates.is_empty()).then(|| candidates[pick % candidates.len()])
    }

    fn ran(&mut self, kind: &'static str, acted: bool) {
        let entry = self.seen.entry(kind).or_default();
        entry.0 = true;
        entry.1 |= acted;
        let mut stats = STATS.lock().unwrap();
        let k = stats.entry(kind).or_default();
        k.runs += 1;
        k.acted += usize::from(acted);
    }

    async fn step(&mut self, op: &Op) {
        let h = self.host.clone();
        let before = format!("{:?}", self.sessions);
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
                            payment_collection_id: Some(self.collection.clone()),
                            provider_id: if *system { "system" } else { "sandbox" }.into(),
                            cart_id: Some("cart".into()),
                            cart: Value::Null,
                            context: Value::Null,
                            data: json!({"sandbox": {"authorize": authorize, "capture": capture, "refund": refund}}),
                            amount: Some(1000),
                            currency_code: None,
                            metadata: Value::Null,
                            reference: None,
                            account_holder_id: None,
                            initiate: true,
                        },
                        None,
                    )
                    .await
                    .unwrap();
                assert_eq!(s.status, SessionStatus::Pending);
                assert!(s.is_initiated);
                self.sessions.push(SessionModel {
                    id: s.id.0,
                    sandbox: !*system,
                    authorize,
                    capture,
                    refund,
                    status: SessionStatus::Pending,
                    awaiting: false,
                    open: None,
                    payment: None,
                });
            }
            Op::Authorize { pick, any } => {
                let Some(i) = self.pick(*pick, *any, can_authorize) else {
                    return;
                };
                let want = predict_authorize(&mut self.sessions[i]);
                let id = self.sessions[i].id.clone();
                let got = got_authorize(
                    h.authorize_session(&id, AuthorizeInput::default(), None)
                        .await,
                );
                assert_eq!(got, want, "authorize {id}");
            }
            Op::AuthorizeTogether { pick, n } => {
                let Some(i) = self.pick(*pick, false, can_authorize) else {
                    return;
                };
                let want: Vec<Got> = (0..*n)
                    .map(|_| predict_authorize(&mut self.sessions[i]))
                    .collect();
                let id = self.sessions[i].id.clone();
                let tasks: Vec<_> = (0..*n)
                    .map(|_| {
                        let (h, id) = (h.clone(), id.clone());
                        tokio::spawn(async move {
                            got_authorize(
                                h.authorize_session(&id, AuthorizeInput::default(), None)
                                    .await,
                            )
                        })
                    })
                    .collect();
                let mut got = Vec::new();
                for t in tasks {
                    got.push(t.await.unwrap());
                }
                assert_eq!(sorted(got), sorted(want), "authorizes of {id} at once");
            }
            Op::Capture { pick, amount, any } | Op::Refund { pick, amount, any } => {
                let capture = matches!(op, Op::Capture { .. });
                let fits = |p: &PaymentModel| {
                    p.open.is_none()
                        && !p.canceled
                        && if capture {
                            p.captured < p.amount
                        } else {
                            p.captured > p.refunded
                        }
                };
                let Some(i) = self.with_payment(*pick, *any, fits) else {
                    return;
                };
                let p = self.sessions[i].payment.clone().unwrap();
                // A fitting pick asks for an amount that fits; `any` asks for whatever it drew.
                let room = if capture {
                    p.amount - p.captured
                } else {
                    p.captured - p.refunded
                };
                let amount = if *any || room <= 0 {
                    *amount
                } else {
                    1 + (*amount - 1) % room
                };
                let operation = if capture { "capture" } else { "refund" };
                let want = predict_money(&mut self.sessions[i], operation, amount);
                let got = if capture {
                    h.capture_payment(
                        &p.id,
                        CaptureInput {
                            amount: Some(amount),
                        },
                        None,
                    )
                    .await
                } else {
                    h.refund_payment(
                        &p.id,
                        RefundInput {
                            amount: Some(amount),
                            reason: None,
                        },
                        None,
                    )
                    .await
                };
                assert_eq!(
                    got_money(got, operation),
                    want,
                    "{operation} {amount} of {}",
                    p.id
                );
            }
            Op::CaptureTogether { pick, amount, n } => {
                let fits =
                    |p: &PaymentModel| p.open.is_none() && !p.canceled && p.captured < p.amount;
                let Some(i) = self.with_payment(*pick, false, fits) else {
                    return;
                };
                let p = self.sessions[i].payment.clone().unwrap();
                let room = (p.amount - p.captured).max(1);
                let amount = 1 + (*amount - 1) % room;
                let want: Vec<Got> = (0..*n)
                    .map(|_| predict_money(&mut self.sessions[i], "capture", amount))
                    .collect();
                let tasks: Vec<_> = (0..*n)
                    .map(|_| {
                        let (h, id) = (h.clone(), p.id.clone());
                        tokio::spawn(async move {
                            got_money(
                                h.capture_payment(
                                    &id,
                                    CaptureInput {
                                        amount: Some(amount),
                                    },
                                    None,
                                )
                                .await,
                                "capture",
                            )
                        })
                    })
                    .collect();
                let mut got = Vec::new();
                for t in tasks {
                    got.push(t.await.unwrap());
                }
                // Each answer names the captured total at its turn: compare how many of each
                // kind, since the turns are nobody's choice.
                let shape = |v: &[Got]| {
                    let mut v: Vec<Got> = v
                        .iter()
                        .map(|g| g.clone().map(|_| "captured".to_owned()))
                        .collect();
                    v.sort();
                    v
                };
                assert_eq!(
                    shape(&got),
                    shape(&want),
                    "captures of {amount} at once on {}",
                    p.id
                );
            }
            Op::Cancel { pick, any } => {
                let fits = |p: &PaymentModel| p.open.is_none() && !p.canceled && p.captured == 0;
                let Some(i) = self.with_payment(*pick, *any, fits) else {
                    return;
                };
                let id = self.sessions[i].payment.as_ref().unwrap().id.clone();
                let want = predict_money(&mut self.sessions[i], "cancel", 0);
                let got = got_money(h.cancel_payment(&id, None).await, "cancel");
                assert_eq!(got, want, "cancel {id}");
            }
            Op::Settle { pick } => {
                let awaiting: Vec<usize> = (0..self.sessions.len())
                    .filter(|i| {
                        self.sessions[*i].awaiting
                            && self.sessions[*i].status == SessionStatus::Pending
                    })
                    .collect();
                if awaiting.is_empty() {
                    return;
                }
                let i = awaiting[pick % awaiting.len()];
                let id = self.sessions[i].id.clone();
                let sandbox = h.providers().get("sandbox").unwrap().clone();
                let hook = sandbox
                    .call_custom("settle", json!({"session_id": id}))
                    .await
                    .unwrap_or_else(|e| panic!("the sandbox holds {id}'s authorization: {e}"));
                let body = hook["body"].as_str().unwrap().to_owned();
                let headers: Vec<(String, String)> =
                    serde_json::from_value(hook["headers"].clone()).unwrap();
                self.sessions[i].awaiting = false;
                let want = if self.sessions[i].open.is_some() {
                    Err("attempt_unresolved".to_owned())
                } else {
                    authorized(&mut self.sessions[i]).map(|_| "applied".to_owned())
                };
                let got = got_hook(
                    h.receive_webhook("sandbox", body.clone(), headers.clone())
                        .await,
                );
                assert_eq!(got, want, "the settle webhook of {id}");
                self.hooks.push(Hook {
                    session: i,
                    body,
                    headers,
                    applied: got.is_ok(),
                });
            }
            Op::Resend { pick } => {
                if self.hooks.is_empty() {
                    return;
                }
                let k = pick % self.hooks.len();
                let hook = self.hooks[k].clone();
                let want = if hook.applied {
                    Ok("duplicate".to_owned())
                } else if self.sessions[hook.session].open.is_some() {
                    Err("attempt_unresolved".to_owned())
                } else {
                    authorized(&mut self.sessions[hook.session]).map(|_| "applied".to_owned())
                };
                let got = got_hook(h.receive_webhook("sandbox", hook.body, hook.headers).await);
                assert_eq!(got, want, "a webhook sent again");
                if got.is_ok() {
                    self.hooks[k].applied = true;
                }
                // The dedupe recognising an event is what this operation exercises.
                self.ran("resend", got.is_ok());
                self.sync_payments().await;
                return;
            }
            Op::Reconcile => {
                h.reconcile_due().await.unwrap();
                self.settle_open_attempts().await;
            }
        }
        self.sync_payments().await;
        let acted = format!("{:?}", self.sessions) != before;
        self.ran(op.kind(), acted);
    }

    /// Learns the ids the model cannot predict (payments, attempts) from the host, checking
    /// that every open outcome the model expects is open there, and no other.
    async fn sync_payments(&mut self) {
        let store = self.host.store().clone();
        for s in &mut self.sessions {
            let sid = SessionId(s.id.clone());
            if let Some(p) = &mut s.payment
                && p.id.is_empty()
            {
                p.id = store
                    .payment_of_session(&sid)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("{} is authorized: it has a payment", s.id))
                    .id
                    .0;
            }
            let open_of = |entity: String| {
                let store = store.clone();
                async move {
                    store
                        .attempts_of(&entity)
                        .await
                        .unwrap()
                        .into_iter()
                        .filter(|a| a.state.is_open())
                        .map(|a| a.id.0)
                        .collect::<Vec<_>>()
                }
            };
            let on_session = open_of(s.id.clone()).await;
            assert_eq!(
                on_session.len(),
                usize::from(s.open.is_some()),
                "open attempts of {}",
                s.id
            );
            if let Some(open) = &mut s.open {
                open.attempt = on_session.first().cloned();
            }
            if let Some(p) = &mut s.payment {
                let on_payment = open_of(p.id.clone()).await;
                assert_eq!(
                    on_payment.len(),
                    usize::from(p.open.is_some()),
                    "open attempts of {}",
                    p.id
                );
                if let Some(open) = &mut p.open {
                    open.attempt = on_payment.first().cloned();
                }
            }
        }
    }

    /// After a reconciliation pass: every open outcome it settled is checked against what the
    /// processor did (acted: succeeded, with its effect; not: failed, nothing moved).
    async fn settle_open_attempts(&mut self) {
        let store = self.host.store().clone();
        for i in 0..self.sessions.len() {
            if let Some(open) = self.sessions[i].open.clone() {
                let a = store
                    .attempt(open.attempt.as_deref().unwrap())
                    .await
                    .unwrap()
                    .unwrap();
                if !a.state.is_open() {
                    assert_eq!(
                        a.state,
                        if open.acted {
                            AttemptState::Succeeded
                        } else {
                            AttemptState::Failed
                        },
                        "the reconciled authorize of {}",
                        self.sessions[i].id
                    );
                    self.sessions[i].open = None;
                    if open.acted {
                        let _ = authorized(&mut self.sessions[i]);
                    }
                }
            }
            if let Some(open) = self.sessions[i]
                .payment
                .as_ref()
                .and_then(|p| p.open.clone())
            {
                let a = store
                    .attempt(open.attempt.as_deref().unwrap())
                    .await
                    .unwrap()
                    .unwrap();
                if !a.state.is_open() {
                    assert_eq!(
                        a.state,
                        if open.acted {
                            AttemptState::Succeeded
                        } else {
                            AttemptState::Failed
                        },
                        "the reconciled {} {}",
                        open.operation,
                        a.id
                    );
                    let p = self.sessions[i].payment.as_mut().unwrap();
                    p.open = None;
                    if open.acted {
                        apply_money(p, open.operation, open.amount);
                    }
                }
            }
        }
    }

    /// The model and the host agree on every status, amount and open outcome; then the
    /// invariants.
    async fn check(&mut self) {
        let view = self.host.collection(&self.collection).await.unwrap();
        for m in &self.sessions {
            let s = view
                .payment_sessions
                .iter()
                .find(|s| s.id.0 == m.id)
                .unwrap();
            assert_eq!(s.status, m.status, "the model's status of {}", m.id);
            let p = view
                .payments
                .iter()
                .find(|p| p.payment_session_id.0 == m.id);
            assert_eq!(p.is_some(), m.payment.is_some(), "{} has a payment", m.id);
            if let (Some(p), Some(pm)) = (p, &m.payment) {
                assert_eq!(
                    (
                        p.captured_amount(),
                        p.refunded_amount(),
                        p.canceled_at.is_some()
                    ),
                    (pm.captured, pm.refunded, pm.canceled),
                    "the model's amounts of {}",
                    p.id
                );
            }
        }
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
        let sandbox = self.host.providers().get("sandbox").unwrap().clone();
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
            hooks: Vec::new(),
            statuses: HashMap::new(),
            seen: BTreeMap::new(),
        };
        for op in &ops {
            world.step(op).await;
            world.check().await;
        }
        world.agree_with_the_sandbox().await;
        world.settle_open_attempts().await;
        for s in &world.sessions {
            assert!(s.open.is_none(), "{} reconciled", s.id);
            assert!(
                s.payment.as_ref().is_none_or(|p| p.open.is_none()),
                "{}'s payment reconciled",
                s.id
            );
        }
        world.check().await;
        let mut stats = STATS.lock().unwrap();
        for (kind, (ran, acted)) in &world.seen {
            let k = stats.entry(kind).or_default();
            k.cases_with += usize::from(*ran);
            k.cases_acted += usize::from(*acted);
        }
    });
}

/// Runs `cases` random cases on `backend`, then prints how often each kind of operation ran
/// and acted, and holds the generator to it: each kind acts in most of the cases it appears in.
fn property(backend: Backend, cases: u32, max_shrink_iters: u32) {
    if backend == Backend::Postgres {
        // Fails here, saying why, when PostgreSQL is missing (unless PAYHOST_SKIP=postgres).
        let probe = Scratch::new();
        let reachable = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(probe.storage_url(backend));
        if reachable.is_none() {
            return;
        }
    }
    // The same cases every run, so the distribution below is a property of the generator and
    // not of luck; PAYHOST_PROPTEST_SEED (a number) explores others.
    let seed: u64 = std::env::var("PAYHOST_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x70a1_d5ee_d000_0001);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = proptest::test_runner::TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &bytes,
    );
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig {
            cases,
            max_shrink_iters,
            source_file: Some(file!()),
            // `properties.proptest-regressions`, beside this file.
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
                "proptest-regressions",
            ))),
            ..ProptestConfig::default()
        },
        rng,
    );
    let strategy = (
        prop::collection::vec(create(), 1..4),
        prop::collection::vec(op(), 6..30),
    );
    STATS.lock().unwrap().clear();
    let result = runner.run(&strategy, |(creates, rest)| {
        run_case(backend, creates.into_iter().chain(rest).collect());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let stats = STATS.lock().unwrap().clone();
    eprintln!(
        "{backend:?}, {cases} cases: kind, cases with it, cases where it acted, runs, runs that acted"
    );
    for (kind, k) in &stats {
        eprintln!(
            "  {kind:<20} {:>4} {:>4} {:>5} {:>5}",
            k.cases_with, k.cases_acted, k.runs, k.acted
        );
    }
    for kind in [
        "create",
        "authorize",
        "authorize_together",
        "capture",
        "capture_together",
        "refund",
        "cancel",
        "settle",
        "resend",
        "reconcile",
    ] {
        let k = stats.get(kind).copied().unwrap_or_default();
        assert!(
            k.cases_with >= 3,
            "{kind} ran in only {} of {cases} cases",
            k.cases_with
        );
        if kind != "reconcile" {
            assert!(
                k.cases_acted * 2 >= k.cases_with,
                "{kind} acted in only {} of the {} cases it ran in",
                k.cases_acted,
                k.cases_with
            );
        }
    }
}

#[test]
fn random_operations_keep_the_invariants_on_sqlite() {
    property(Backend::Sqlite, 48, 64);
}

#[test]
fn random_operations_keep_the_invariants_on_postgres() {
    property(Backend::Postgres, 32, 32);
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
    async fn sessions_by_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.inner.sessions_by_reference(reference).await
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
    async fn account_holder(
        &self,
        id: &payhost::domain::AccountHolderId,
    ) -> Result<Option<payhost::domain::AccountHolder>, StoreError> {
        self.inner.account_holder(id).await
    }
    async fn account_holders_of_customer(
        &self,
        customer_id: &str,
    ) -> Result<Vec<payhost::domain::AccountHolder>, StoreError> {
        self.inner.account_holders_of_customer(customer_id).await
    }
    async fn payment_method(
        &self,
        id: &payhost::domain::PaymentMethodId,
    ) -> Result<Option<payhost::domain::PaymentMethod>, StoreError> {
        self.inner.payment_method(id).await
    }
    async fn payment_methods_of(
        &self,
        id: &payhost::domain::AccountHolderId,
    ) -> Result<Vec<payhost::domain::PaymentMethod>, StoreError> {
        self.inner.payment_methods_of(id).await
    }
    async fn holder_attempt(
        &self,
        id: &str,
    ) -> Result<Option<payhost::domain::HolderAttempt>, StoreError> {
        self.inner.holder_attempt(id).await
    }
    async fn holder_attempts_of(
        &self,
        id: &payhost::domain::AccountHolderId,
    ) -> Result<Vec<payhost::domain::HolderAttempt>, StoreError> {
        self.inner.holder_attempts_of(id).await
    }
    async fn open_holder_attempts(
        &self,
    ) -> Result<Vec<payhost::domain::HolderAttempt>, StoreError> {
        self.inner.open_holder_attempts().await
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
