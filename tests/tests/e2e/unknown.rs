//! Unknown means unknown: no outcome is settled as "did not happen" while its call may still
//! land, and nothing a retry, an operator or a restart does can move money twice. Each test
//! uses the timing that breaks the rule (a processor slower than the deadline, retries racing),
//! not the one that hides it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost::domain::*;
use payhost::engine::*;
use payhost::store::{StoreError, WriteOp};
use payhost::{Clock, EngineError, Host};
use payhost_e2e::{Backend, HOST, Scratch};
use serde_json::{Value, json};

async fn collection(host: &Host, amount: i64) -> String {
    host.create_collection(
        NewCollection {
            amount,
            currency_code: "eur".into(),
            metadata: Value::Null,
        },
        None,
    )
    .await
    .unwrap()
    .id
    .0
}

fn new_session(collection: &str, provider: &str, data: Value) -> NewSession {
    NewSession {
        payment_collection_id: Some(collection.into()),
        provider_id: provider.into(),
        cart_id: None,
        cart: Value::Null,
        context: Value::Null,
        data,
        amount: None,
        currency_code: None,
        metadata: Value::Null,
        reference: None,
        account_holder_id: None,
        initiate: true,
    }
}

/// An authorized payment of `amount` on `provider`, the session created with `data`.
async fn payment(host: &Host, provider: &str, amount: i64, data: Value) -> (String, String) {
    let col = collection(host, amount).await;
    let session = host
        .create_session(new_session(&col, provider, data), None)
        .await
        .unwrap();
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .expect("authorized");
    (session.id.0, payment.id.0)
}

async fn ledger(host: &Host, session: &str, op: &str) -> Vec<i64> {
    let entries = host
        .providers()
        .get("sandbox")
        .unwrap()
        .call_custom("ledger", json!({ "session_id": session }))
        .await
        .unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == op && e["response"]["outcome"]["status"] == "processed")
        .map(|e| e["amount"].as_i64().unwrap())
        .collect()
}

fn with_settings(host: Arc<Host>, settings: ReconcileSettings) -> Arc<Host> {
    Arc::new(
        Arc::try_unwrap(host)
            .unwrap_or_else(|_| panic!("the test holds the only reference"))
            .with_reconcile(settings),
    )
}

/// The reconciler as `payhost serve` runs it, but asking at once and every 100 ms.
fn eager() -> ReconcileSettings {
    ReconcileSettings {
        first_check_ms: 0,
        base_backoff_ms: 0,
        max_checks: 5,
        landing_margin_ms: 0,
        interval: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn the_attempt(host: &Host, payment: &str) -> Attempt {
    host.attempts_of(payment).await.unwrap().pop().unwrap()
}

async fn a_capture_the_processor_finishes_late_is_never_settled_as_failed(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    // Even with no landing margin at all: the call is still running in this host.
    let host = with_settings(host, eager());
    let reconciler = host.spawn_reconciler();
    // The processor takes 3 s; payhost waits 400 ms.
    let (session, pay) = payment(
        &host,
        "sandbox",
        3000,
        json!({"sandbox": {"capture": {"delay_ms": 3000}}}),
    )
    .await;
    let started = Instant::now();
    let e = host
        .capture_payment(&pay, CaptureInput::default(), Some("capture-late"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "outcome_unknown", "{e}");
    assert!(started.elapsed() < Duration::from_millis(1500));

    // The reconciler asks the sandbox many times meanwhile; its ledger has nothing yet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempt = the_attempt(&host, &pay).await;
    assert_eq!(
        attempt.state,
        AttemptState::Unknown,
        "settled while the call was still running: {attempt:?}"
    );
    assert_eq!(host.payment(&pay).await.unwrap().captured_amount(), 0);
    // The payment stays blocked: no second capture, with or without the key.
    for key in [Some("capture-late"), None] {
        let e = host
            .capture_payment(&pay, CaptureInput::default(), key)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "attempt_unresolved", "{e}");
    }
    // An operator cannot decide it either.
    let e = host
        .resolve_attempt(
            &attempt.id.0,
            ResolveAs::Failed,
            "ops",
            "looks failed",
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, EngineError::CallMayLand { until: None, .. }),
        "{e}"
    );

    // The processor captures; its late answer settles the attempt.
    let deadline = Instant::now() + Duration::from_secs(5);
    while the_attempt(&host, &pay).await.state.is_open() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reconciler.abort();
    let attempt = the_attempt(&host, &pay).await;
    assert_eq!(attempt.state, AttemptState::Succeeded, "{attempt:?}");
    assert_eq!(host.payment(&pay).await.unwrap().captured_amount(), 3000);
    assert_eq!(ledger(&host, &session, "capture").await, vec![3000]);
    // The client's retry with its key now gets the truth, and nothing moves again.
    let replay = host
        .capture_payment(&pay, CaptureInput::default(), Some("capture-late"))
        .await
        .unwrap();
    assert_eq!(replay.captured_amount(), 3000);
    assert_eq!(ledger(&host, &session, "capture").await, vec![3000]);
}

async fn the_system_providers_not_attempted_counts_only_once_the_call_can_no_longer_land(
    backend: Backend,
) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let host = with_settings(
        host,
        ReconcileSettings {
            landing_margin_ms: 1_000,
            stale_after_ms: 0,
            ..eager()
        },
    );
    let (session, pay) = payment(&host, "system", 1000, Value::Null).await;
    // A host died in the middle of a capture whose deadline is a second from now. (On
    // PostgreSQL its own lease is live; the attempt belongs to no one.)
    let now = payhost::SystemClock.now_unix_ms();
    let attempt_id = AttemptId::generate();
    let session = host.session(&session).await.unwrap();
    host.store()
        .write(vec![WriteOp::InsertAttempt(Attempt {
            idempotency_key: format!("{}:{attempt_id}", session.idempotency_key),
            id: attempt_id.clone(),
            session_id: session.id.clone(),
            payment_id: Some(PaymentId(pay.clone())),
            provider_id: "system".into(),
            operation: payhost_provider_api::Operation::Capture,
            amount: 1000,
            currency_code: session.currency_code,
            state: AttemptState::Unknown,
            outcome: None,
            error: None,
            reason: None,
            checks: 0,
            next_check_at: None,
            resolution: None,
            created_at: now,
            updated_at: now,
            call_deadline_at: Some(now + 1_000),
            requested_by: None,
            owner_host: None,
            owner_epoch: None,
            resends: 0,
        })])
        .await
        .unwrap();
    // The system provider keeps no record: "not attempted" — but its deadline has not passed.
    for _ in 0..3 {
        host.reconcile_due().await.unwrap();
    }
    let a = host.attempts_of(&pay).await.unwrap().pop().unwrap();
    assert_eq!(a.state, AttemptState::Unknown, "{a:?}");
    assert_eq!(
        a.checks, 0,
        "waiting for the horizon spends no operator check"
    );
    assert!(
        a.error
            .as_ref()
            .unwrap()
            .to_string()
            .contains("may still land"),
        "{a:?}"
    );
    let e = host
        .resolve_attempt(
            &attempt_id.0,
            ResolveAs::Failed,
            "ops",
            "nothing at the PSP",
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, EngineError::CallMayLand { until: Some(_), .. }),
        "{e}"
    );
    assert_eq!(
        host.capture_payment(&pay, CaptureInput::default(), None)
            .await
            .unwrap_err()
            .code(),
        "attempt_unresolved"
    );
    // Its 1 s deadline and the 1 s margin later it can no longer land: "not attempted" is
    // the truth.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    host.reconcile_due().await.unwrap();
    let a = host.attempts_of(&pay).await.unwrap().pop().unwrap();
    assert_eq!(a.state, AttemptState::Failed, "{a:?}");
    let p = host
        .capture_payment(&pay, CaptureInput::default(), None)
        .await
        .unwrap();
    assert_eq!(p.captured_amount(), 1000);
}

async fn retries_racing_on_a_key_whose_attempt_failed_run_exactly_once(backend: Backend) {
    let s = Scratch::new();
    // One call slot: a slow call holds it, so the first capture waits past its deadline and
    // is not attempted (its attempt fails, its key stays linked to it).
    let text = HOST.replace("max_concurrency = 16", "max_concurrency = 1");
    let Some(host) = s.host_on(backend, &text).await else {
        return;
    };
    let (sid, pay) = payment(&host, "sandbox", 1000, Value::Null).await;
    let col = collection(&host, 500).await;
    let slow = host
        .create_session(
            new_session(
                &col,
                "sandbox",
                json!({"sandbox": {"authorize": {"delay_ms": 1200}}}),
            ),
            None,
        )
        .await
        .unwrap();
    let blocker = {
        let host = host.clone();
        tokio::spawn(async move {
            let _ = host
                .authorize_session(&slow.id.0, AuthorizeInput::default(), None)
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let capture = CaptureInput { amount: Some(500) };
    let e = host
        .capture_payment(&pay, capture.clone(), Some("k-race"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "not_attempted", "{e}");
    blocker.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // Ten retries with the key at once: exactly one runs the capture again.
    let retries: Vec<_> = (0..10)
        .map(|_| {
            let host = host.clone();
            let pay = pay.clone();
            let capture = capture.clone();
            tokio::spawn(async move { host.capture_payment(&pay, capture, Some("k-race")).await })
        })
        .collect();
    let mut ok = 0;
    for r in retries {
        match r.await.unwrap() {
            Ok(p) => {
                assert_eq!(p.captured_amount(), 500);
                ok += 1;
            }
            // Lost the race (the claim is taken), or came once the winner's attempt began.
            Err(e) => assert!(
                ["in_progress", "attempt_unresolved"].contains(&e.code()),
                "{e}"
            ),
        }
    }
    assert!(ok >= 1, "one retry ran");
    let p = host.payment(&pay).await.unwrap();
    assert_eq!(p.captured_amount(), 500, "captured once: {:?}", p.captures);
    // At the processor too: one capture line in its ledger file (every call it acted on is a
    // line, whatever its key), and nothing left open.
    let lines = std::fs::read_to_string(s.dir.path().join("state/sandbox.ledger.jsonl")).unwrap();
    let captures: Vec<i64> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["session_id"] == sid.as_str() && e["op"] == "capture")
        .map(|e| e["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(captures, vec![500], "captured once at the processor");
    // Nothing left open on the payment (the blocker's own authorize, which overran its
    // deadline, is another session's).
    let open: Vec<_> = host
        .open_attempts()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.payment_id.as_ref().is_some_and(|p| p.0 == pay))
        .collect();
    assert!(open.is_empty(), "{open:#?}");
}

async fn forgetting_a_failed_keys_claim_removes_only_the_claim_it_read(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let store = host.store();
    let claim = WriteOp::ClaimKey {
        key: "k-cas".into(),
        operation: "capture:pay_x".into(),
        request_hash: "h".into(),
        at: 0,
        claim_id: "c1".into(),
    };
    store.write(vec![claim.clone()]).await.unwrap();
    store
        .write(vec![WriteOp::LinkKey {
            key: "k-cas".into(),
            attempt_id: "att_failed".into(),
        }])
        .await
        .unwrap();
    let forget = WriteOp::ForgetKey {
        key: "k-cas".into(),
        attempt_id: "att_failed".into(),
    };
    // The first retry replaces the claim; the second finds the fresh claim and leaves it.
    store
        .write(vec![forget.clone(), claim.clone()])
        .await
        .unwrap();
    let second = store.write(vec![forget, claim]).await.unwrap_err();
    assert!(matches!(second, StoreError::KeyExists(_)), "{second:?}");
    let kept = store.key("k-cas").await.unwrap().unwrap();
    assert_eq!(kept.attempt_id, None, "the first retry's claim is intact");
}

async fn a_pending_capture_backs_off_and_ends_with_an_operator(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let host = with_settings(
        host,
        ReconcileSettings {
            base_backoff_ms: 20,
            max_checks: 4,
            ..eager()
        },
    );
    let (_, pay) = payment(
        &host,
        "sandbox",
        1000,
        json!({"sandbox": {"capture": "pending"}}),
    )
    .await;
    let e = host
        .capture_payment(&pay, CaptureInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "outcome_unknown", "{e}");
    let mut waits = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        host.reconcile_due().await.unwrap();
        let a = the_attempt(&host, &pay).await;
        if let Some(next) = a.next_check_at {
            waits.push((a.checks, next - a.updated_at));
        }
        if a.state == AttemptState::NeedsOperator || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = the_attempt(&host, &pay).await;
    assert_eq!(
        a.state,
        AttemptState::NeedsOperator,
        "{a:?}; waits {waits:?}"
    );
    assert_eq!(a.checks, 4);
    // The wait set by each check, in order.
    let mut distinct: Vec<_> = waits
        .iter()
        .copied()
        .filter(|(checks, _)| *checks > 0)
        .collect();
    distinct.dedup_by_key(|(checks, _)| *checks);
    assert!(
        distinct.windows(2).all(|w| w[1].1 >= w[0].1),
        "each wait at least as long as the one before: {distinct:?}"
    );
    assert!(
        distinct.last().unwrap().1 > distinct.first().unwrap().1,
        "it backs off: {distinct:?}"
    );
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(payhost_e2e::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(payhost_e2e::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_stores!(
    a_capture_the_processor_finishes_late_is_never_settled_as_failed,
    the_system_providers_not_attempted_counts_only_once_the_call_can_no_longer_land,
    retries_racing_on_a_key_whose_attempt_failed_run_exactly_once,
    forgetting_a_failed_keys_claim_removes_only_the_claim_it_read,
    a_pending_capture_backs_off_and_ends_with_an_operator,
);
