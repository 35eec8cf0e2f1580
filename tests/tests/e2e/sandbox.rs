//! Every sandbox behaviour, through the real built plugin and the host's call path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost::{CallError, Clock, Provider, SystemClock};
use payhost_e2e::{BOTH, Scratch};
use payhost_provider_api::*;
use serde_json::{Value, json};

struct Fixture {
    _scratch: Scratch,
    sandbox: Arc<Provider>,
    text: String,
}

fn sandbox() -> Fixture {
    sandbox_with(BOTH)
}

fn sandbox_with(text: &str) -> Fixture {
    let scratch = Scratch::new();
    let (_c, report) = scratch.load(text);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let sandbox = report.providers.get("sandbox").unwrap().clone();
    Fixture {
        _scratch: scratch,
        sandbox,
        text: text.to_owned(),
    }
}

fn init(session: &str, data: Value) -> InitiateRequest {
    InitiateRequest {
        session_id: session.into(),
        idempotency_key: format!("{session}:init"),
        amount: 2000,
        currency_code: "eur".into(),
        context: Value::Null,
        data: Value::Null,
        input: data,
        account_holder: None,
        deadline_unix_ms: None,
    }
}

fn auth(session: &str, key: &str, data: &Value) -> AuthorizeRequest {
    AuthorizeRequest {
        session_id: session.into(),
        idempotency_key: key.into(),
        amount: 2000,
        currency_code: "eur".into(),
        context: Value::Null,
        data: data.clone(),
        input: Value::Null,
        account_holder: None,
        payment_method: None,
        deadline_unix_ms: None,
    }
}

fn capture(session: &str, key: &str, amount: i64) -> CaptureRequest {
    CaptureRequest {
        session_id: session.into(),
        payment_id: format!("pay_{session}"),
        idempotency_key: key.into(),
        amount,
        currency_code: "eur".into(),
        data: Value::Null,
        deadline_unix_ms: None,
    }
}

fn refund(session: &str, key: &str, amount: i64) -> RefundRequest {
    RefundRequest {
        session_id: session.into(),
        payment_id: format!("pay_{session}"),
        idempotency_key: key.into(),
        amount,
        currency_code: "eur".into(),
        data: Value::Null,
        reason: None,
        deadline_unix_ms: None,
    }
}

fn retrieve(session: &str, attempt: Option<(Operation, &str, i64)>) -> RetrieveRequest {
    RetrieveRequest {
        session_id: session.into(),
        payment_id: None,
        idempotency_key: format!("{session}:retrieve"),
        amount: 2000,
        currency_code: "eur".into(),
        data: Value::Null,
        attempt: attempt.map(|(operation, key, amount)| AttemptRef {
            operation,
            idempotency_key: key.into(),
            amount,
        }),
        deadline_unix_ms: None,
    }
}

/// Initiates a session with these behaviour switches and returns the data to carry.
async fn start(f: &Fixture, session: &str, data: Value) -> Value {
    let r = f.sandbox.call(init(session, data)).await.unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    r.data.unwrap_or(Value::Null)
}

fn conflict_code(e: CallError) -> String {
    match e {
        CallError::Provider(e) => {
            assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
            e.code.unwrap_or_default()
        }
        other => panic!("expected a provider conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_card_is_authorized_captured_in_parts_and_refunded_in_parts() {
    let f = sandbox();
    let data = start(&f, "ps_ok", json!({"card_number": "4242424242424242"})).await;
    let r = f.sandbox.call(auth("ps_ok", "a1", &data)).await.unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    assert!(r.reference.unwrap().starts_with("sbx_"));
    for (key, amount) in [("c1", 1500), ("c2", 500)] {
        let r = f.sandbox.call(capture("ps_ok", key, amount)).await.unwrap();
        assert_eq!(r.outcome, Outcome::Processed);
    }
    let over = f.sandbox.call(capture("ps_ok", "c3", 1)).await.unwrap_err();
    assert_eq!(conflict_code(over), "amount_too_large");
    f.sandbox.call(refund("ps_ok", "r1", 700)).await.unwrap();
    f.sandbox.call(refund("ps_ok", "r2", 1300)).await.unwrap();
    let over = f.sandbox.call(refund("ps_ok", "r3", 1)).await.unwrap_err();
    assert_eq!(conflict_code(over), "amount_too_large");
    let truth = f.sandbox.call(retrieve("ps_ok", None)).await.unwrap();
    assert_eq!(truth.status, RemoteStatus::Captured);
    assert_eq!(
        (
            truth.amount_authorized,
            truth.amount_captured,
            truth.amount_refunded
        ),
        (Some(2000), Some(2000), Some(2000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declining_cards_are_declined_with_their_codes() {
    let f = sandbox();
    for (card, code) in [
        ("4000000000000002", "card_declined"),
        ("4000000000009995", "insufficient_funds"),
    ] {
        let session = format!("ps_{code}");
        let data = start(&f, &session, json!({ "card_number": card })).await;
        let r = f
            .sandbox
            .call(auth(&session, &format!("{session}:a"), &data))
            .await
            .unwrap();
        match r.outcome {
            Outcome::Declined { code: Some(c), .. } => assert_eq!(c, code),
            other => panic!("{other:?}"),
        }
        let truth = f.sandbox.call(retrieve(&session, None)).await.unwrap();
        assert_eq!(truth.status, RemoteStatus::Error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3ds_card_requires_more_then_authorizes_on_the_next_authorize() {
    let f = sandbox();
    let data = start(&f, "ps_3ds", json!({"card_number": "4000002500003155"})).await;
    let first = f.sandbox.call(auth("ps_3ds", "a1", &data)).await.unwrap();
    match &first.outcome {
        Outcome::RequiresMore { next_action } => {
            assert_eq!(next_action["type"], "redirect");
            assert!(next_action["url"].as_str().unwrap().contains("ps_3ds"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.sandbox
            .call(retrieve("ps_3ds", None))
            .await
            .unwrap()
            .status,
        RemoteStatus::RequiresMore
    );
    let second = f.sandbox.call(auth("ps_3ds", "a2", &data)).await.unwrap();
    assert_eq!(second.outcome, Outcome::Processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_authorization_completes_with_a_signed_webhook() {
    let f = sandbox();
    let data = start(&f, "ps_pend", json!({"sandbox": {"authorize": "pending"}})).await;
    let r = f.sandbox.call(auth("ps_pend", "a1", &data)).await.unwrap();
    assert_eq!(r.outcome, Outcome::Pending);
    assert_eq!(
        f.sandbox
            .call(retrieve("ps_pend", None))
            .await
            .unwrap()
            .status,
        RemoteStatus::Pending
    );

    let hook = f
        .sandbox
        .call_custom("settle", json!({"session_id": "ps_pend"}))
        .await
        .unwrap();
    let body = hook["body"].as_str().unwrap().to_owned();
    let headers: Vec<(String, String)> = serde_json::from_value(hook["headers"].clone()).unwrap();
    let now = SystemClock.now_unix_ms();
    let event = f
        .sandbox
        .call(WebhookRequest {
            body: body.clone(),
            headers: headers.clone(),
            received_at_unix_ms: now,
        })
        .await
        .unwrap();
    assert_eq!(event.action, WebhookAction::Authorized);
    assert_eq!(event.session_id.as_deref(), Some("ps_pend"));
    assert_eq!(event.amount, Some(2000));
    assert!(event.event_id.starts_with("evt_"));
    assert_eq!(
        f.sandbox
            .call(retrieve("ps_pend", None))
            .await
            .unwrap()
            .status,
        RemoteStatus::Authorized
    );

    // Forged: the body changed after signing.
    let forged = f
        .sandbox
        .call(WebhookRequest {
            body: body.replace("2000", "200000"),
            headers: headers.clone(),
            received_at_unix_ms: now,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(forged, CallError::Provider(ref e) if e.kind == ErrorKind::InvalidSignature),
        "{forged:?}"
    );
    // Replayed long after it was signed.
    let stale = f
        .sandbox
        .call(WebhookRequest {
            body,
            headers,
            received_at_unix_ms: now + 3_600_000,
        })
        .await
        .unwrap_err();
    assert!(stale.to_string().contains("tolerance"), "{stale}");
    // No signature at all.
    let unsigned = f
        .sandbox
        .call(WebhookRequest {
            body: "{}".into(),
            headers: vec![],
            received_at_unix_ms: now,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(unsigned, CallError::Provider(ref e) if e.kind == ErrorKind::InvalidSignature)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_signed_with_another_secret_is_refused() {
    let f = sandbox();
    let other = sandbox_with(&BOTH.replace("whsec_test_secret", "whsec_someone_else"));
    let hook = other
        .sandbox
        .call_custom(
            "webhook",
            json!({"session_id": "ps_x", "type": "payment.captured", "amount": 5}),
        )
        .await
        .unwrap();
    let err = f
        .sandbox
        .call(WebhookRequest {
            body: hook["body"].as_str().unwrap().into(),
            headers: serde_json::from_value(hook["headers"].clone()).unwrap(),
            received_at_unix_ms: SystemClock.now_unix_ms(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert_ne!(f.text, other.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_attempted_records_nothing_and_retrieve_says_so() {
    let f = sandbox();
    let data = start(&f, "ps_na", json!({"card_number": "4000000000000101"})).await;
    let r = f.sandbox.call(auth("ps_na", "a1", &data)).await.unwrap();
    assert!(matches!(r.outcome, Outcome::NotAttempted { .. }), "{r:?}");
    let truth = f
        .sandbox
        .call(retrieve("ps_na", Some((Operation::Authorize, "a1", 2000))))
        .await
        .unwrap();
    assert!(matches!(truth.attempt, Some(Outcome::NotAttempted { .. })));
    assert_eq!(
        truth.status,
        RemoteStatus::Pending,
        "initiated, never authorized"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_happened_and_retrieve_and_a_retry_with_the_same_key_say_so() {
    let f = sandbox();
    let data = start(&f, "ps_unk", json!({"card_number": "4000000000000119"})).await;
    let r = f.sandbox.call(auth("ps_unk", "a1", &data)).await.unwrap();
    assert!(matches!(r.outcome, Outcome::Unknown { .. }), "{r:?}");
    let truth = f
        .sandbox
        .call(retrieve("ps_unk", Some((Operation::Authorize, "a1", 2000))))
        .await
        .unwrap();
    assert_eq!(truth.attempt, Some(Outcome::Processed));
    assert_eq!(truth.status, RemoteStatus::Authorized);
    // The same key again replays the first (true) result and acts no second time.
    let again = f.sandbox.call(auth("ps_unk", "a1", &data)).await.unwrap();
    assert_eq!(again.outcome, Outcome::Processed);
    let ledger = f
        .sandbox
        .call_custom("ledger", json!({"session_id": "ps_unk"}))
        .await
        .unwrap();
    let authorizations = ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == "authorize")
        .count();
    assert_eq!(authorizations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_replays_the_first_result_and_a_reused_key_is_refused() {
    let f = sandbox();
    let data = start(&f, "ps_idem", Value::Null).await;
    f.sandbox.call(auth("ps_idem", "a1", &data)).await.unwrap();
    let first = f
        .sandbox
        .call(capture("ps_idem", "c1", 1200))
        .await
        .unwrap();
    let replay = f
        .sandbox
        .call(capture("ps_idem", "c1", 1200))
        .await
        .unwrap();
    assert_eq!(first, replay);
    let truth = f.sandbox.call(retrieve("ps_idem", None)).await.unwrap();
    assert_eq!(
        truth.amount_captured,
        Some(1200),
        "captured once, not twice"
    );
    let reused = f
        .sandbox
        .call(capture("ps_idem", "c1", 300))
        .await
        .unwrap_err();
    match reused {
        CallError::Provider(e) => assert_eq!(e.code.as_deref(), Some("idempotency_key_reused")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_a_restart_and_retrieve_answers_truthfully() {
    let scratch = Scratch::new();
    let (_c, report) = scratch.load(BOTH);
    let first = report.providers.get("sandbox").unwrap().clone();
    first.call(init("ps_crash", Value::Null)).await.unwrap();
    first
        .call(auth("ps_crash", "a1", &Value::Null))
        .await
        .unwrap();
    first.call(capture("ps_crash", "c1", 800)).await.unwrap();

    // A new instance on the same state folder (as after a host restart) sees what happened.
    let (_c, report) = scratch.load(BOTH);
    let second = report.providers.get("sandbox").unwrap().clone();
    let truth = second
        .call(retrieve("ps_crash", Some((Operation::Capture, "c1", 800))))
        .await
        .unwrap();
    assert_eq!(truth.attempt, Some(Outcome::Processed));
    assert_eq!(truth.amount_captured, Some(800));
    let replay = second.call(capture("ps_crash", "c1", 800)).await.unwrap();
    assert_eq!(replay.outcome, Outcome::Processed);
    let truth = second.call(retrieve("ps_crash", None)).await.unwrap();
    assert_eq!(truth.amount_captured, Some(800));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_is_honoured() {
    let f = sandbox();
    let data = start(&f, "ps_delay", json!({"sandbox": {"delay_ms": 150}})).await;
    let started = Instant::now();
    let r = f.sandbox.call(auth("ps_delay", "a1", &data)).await.unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_processor_error_is_retryable_and_a_panic_is_caught() {
    let f = sandbox();
    let data = start(
        &f,
        "ps_err",
        json!({"sandbox": {"capture": "error", "refund": "panic"}}),
    )
    .await;
    f.sandbox.call(auth("ps_err", "a1", &data)).await.unwrap();
    let mut c = capture("ps_err", "c1", 100);
    c.data = data.clone();
    match f.sandbox.call(c).await.unwrap_err() {
        CallError::Provider(e) => {
            assert_eq!(e.kind, ErrorKind::Processor);
            assert!(e.retryable);
        }
        other => panic!("{other:?}"),
    }
    let mut r = refund("ps_err", "r1", 100);
    r.data = data;
    match f.sandbox.call(r).await.unwrap_err() {
        CallError::Provider(e) => assert_eq!(e.kind, ErrorKind::Panic),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_releases_an_authorization_and_blocks_later_captures() {
    let f = sandbox();
    let data = start(&f, "ps_cancel", Value::Null).await;
    f.sandbox
        .call(auth("ps_cancel", "a1", &data))
        .await
        .unwrap();
    let r = f
        .sandbox
        .call(CancelRequest {
            session_id: "ps_cancel".into(),
            payment_id: Some("pay_ps_cancel".into()),
            idempotency_key: "x1".into(),
            amount: 2000,
            currency_code: "eur".into(),
            data: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    let err = f
        .sandbox
        .call(capture("ps_cancel", "c1", 100))
        .await
        .unwrap_err();
    assert_eq!(conflict_code(err), "payment_not_capturable");
    assert_eq!(
        f.sandbox
            .call(retrieve("ps_cancel", None))
            .await
            .unwrap()
            .status,
        RemoteStatus::Canceled
    );
}

/// A customer's account holder at the sandbox, created through the host's call path.
async fn holder(f: &Fixture, id: &str) -> AccountHolderRef {
    let created = f
        .sandbox
        .call(CreateAccountHolderRequest {
            account_holder_id: id.into(),
            idempotency_key: format!("{id}:create"),
            customer: Customer {
                id: format!("cus_{id}"),
                email: Some("ada@example.com".into()),
                ..Default::default()
            },
            input: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(created.outcome, Outcome::Processed);
    assert!(created.reference.is_some(), "the customer's sandbox id");
    AccountHolderRef {
        id: id.into(),
        reference: created.reference,
        data: created.data.unwrap_or(Value::Null),
    }
}

fn save(h: &AccountHolderRef, method: &str, input: Value) -> SavePaymentMethodRequest {
    SavePaymentMethodRequest {
        account_holder: h.clone(),
        payment_method_id: method.into(),
        idempotency_key: format!("{}:{method}:save", h.id),
        input,
        deadline_unix_ms: None,
    }
}

/// Saves a card to `h`; the host's view of the method.
async fn saved(f: &Fixture, h: &AccountHolderRef, method: &str, card: &str) -> PaymentMethodRef {
    let r = f
        .sandbox
        .call(save(h, method, json!({"card_number": card})))
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    let data = r.data.unwrap();
    assert!(!data.to_string().contains(card), "never the number: {data}");
    PaymentMethodRef {
        id: method.into(),
        reference: r.reference,
        data,
    }
}

/// An authorize of `session` that charges a saved method, with no card input.
fn charge(
    session: &str,
    key: &str,
    h: &AccountHolderRef,
    m: &PaymentMethodRef,
) -> AuthorizeRequest {
    let mut r = auth(session, key, &Value::Null);
    r.account_holder = Some(h.clone());
    r.payment_method = Some(m.clone());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_saved_once_pays_later_sessions_without_card_input() {
    let f = sandbox();
    let h = holder(&f, "ach_ada").await;
    let m = saved(&f, &h, "pm_ada_1", cards_ok()).await;
    assert_eq!(m.data["card"]["last4"], "4242");
    for session in ["ps_saved_1", "ps_saved_2"] {
        let mut i = init(session, Value::Null);
        i.account_holder = Some(h.clone());
        f.sandbox.call(i).await.unwrap();
        let r = f
            .sandbox
            .call(charge(session, &format!("{session}:a1"), &h, &m))
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Processed, "{session}");
        let c = f
            .sandbox
            .call(capture(session, &format!("{session}:c1"), 2000));
        assert_eq!(c.await.unwrap().outcome, Outcome::Processed);
    }
    let listed = f
        .sandbox
        .call(ListPaymentMethodsRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_ada:list".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(listed.methods.len(), 1);
    assert_eq!(Some(listed.methods[0].reference.clone()), m.reference);
}

fn cards_ok() -> &'static str {
    "4242424242424242"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_card_declines_or_asks_for_3ds_again_as_its_kind_says() {
    let f = sandbox();
    let h = holder(&f, "ach_bob").await;
    let declining = saved(&f, &h, "pm_bob_declined", "4000000000000002").await;
    let r = f
        .sandbox
        .call(charge("ps_bob_1", "ps_bob_1:a1", &h, &declining))
        .await
        .unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Declined { code: Some(c), .. } if c == "card_declined"),
        "{r:?}"
    );
    let three_ds = saved(&f, &h, "pm_bob_3ds", "4000002500003155").await;
    let first = f
        .sandbox
        .call(charge("ps_bob_2", "ps_bob_2:a1", &h, &three_ds))
        .await
        .unwrap();
    assert!(
        matches!(first.outcome, Outcome::RequiresMore { .. }),
        "{first:?}"
    );
    let second = f
        .sandbox
        .call(charge("ps_bob_2", "ps_bob_2:a2", &h, &three_ds))
        .await
        .unwrap();
    assert_eq!(second.outcome, Outcome::Processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_holder_detaches_its_methods_and_a_later_charge_is_refused() {
    let f = sandbox();
    let h = holder(&f, "ach_cy").await;
    let m = saved(&f, &h, "pm_cy", cards_ok()).await;
    let deleted = f
        .sandbox
        .call(DeleteAccountHolderRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_cy:delete".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Processed);
    let r = f
        .sandbox
        .call(charge("ps_cy", "ps_cy:a1", &h, &m))
        .await
        .unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Declined { code: Some(c), .. } if c == "payment_method_unavailable"),
        "{r:?}"
    );
    let status = f
        .sandbox
        .call(RetrieveAccountHolderRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_cy:retrieve".into(),
            attempt: None,
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(status.status, HolderStatus::Deleted);
    let err = f
        .sandbox
        .call(save(&h, "pm_cy_2", json!({"card_number": cards_ok()})))
        .await
        .unwrap_err();
    assert_eq!(conflict_code(err), "customer_deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_method_is_no_longer_listed_or_charged() {
    let f = sandbox();
    let h = holder(&f, "ach_di").await;
    let keep = saved(&f, &h, "pm_di_keep", cards_ok()).await;
    let gone = saved(&f, &h, "pm_di_gone", "5555555555554444").await;
    let r = f
        .sandbox
        .call(DeletePaymentMethodRequest {
            account_holder: h.clone(),
            payment_method: gone.clone(),
            idempotency_key: "pm_di_gone:delete".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Processed);
    let listed = f
        .sandbox
        .call(ListPaymentMethodsRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_di:list".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    let refs: Vec<_> = listed
        .methods
        .iter()
        .map(|m| m.reference.as_str())
        .collect();
    assert_eq!(refs, [keep.reference.as_deref().unwrap()]);
    let r = f
        .sandbox
        .call(charge("ps_di", "ps_di:a1", &h, &gone))
        .await
        .unwrap();
    assert!(matches!(r.outcome, Outcome::Declined { .. }), "{r:?}");

    // A new instance on the same ledger (a host restart) knows the same customer and cards.
    let (_c, report) = f._scratch.load(&f.text);
    let again = report.providers.get("sandbox").unwrap().clone();
    let listed = again
        .call(ListPaymentMethodsRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_di:list2".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    let refs: Vec<_> = listed
        .methods
        .iter()
        .map(|m| m.reference.as_str())
        .collect();
    assert_eq!(refs, [keep.reference.as_deref().unwrap()]);
    let paid = again
        .call(charge("ps_di_2", "ps_di_2:a1", &h, &keep))
        .await
        .unwrap();
    assert_eq!(paid.outcome, Outcome::Processed);
    let refused = again
        .call(charge("ps_di_3", "ps_di_3:a1", &h, &gone))
        .await
        .unwrap();
    assert!(
        matches!(refused.outcome, Outcome::Declined { .. }),
        "{refused:?}"
    );
    // The same key for another card is refused, never replayed as the first save.
    let mut reused = save(&h, "pm_di_keep", json!({"card_number": "5555555555554444"}));
    reused.payment_method_id = "pm_di_other".into();
    reused.account_holder.id = "ach_other".into();
    let err = again.call(reused).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Provider(e) if e.code.as_deref() == Some("idempotency_key_reused")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_save_happened_and_retrieve_says_what_it_made() {
    let f = sandbox();
    let h = holder(&f, "ach_eve").await;
    let request = save(
        &h,
        "pm_eve",
        json!({"card_number": cards_ok(), "sandbox": {"save_payment_method": "unknown"}}),
    );
    let r = f.sandbox.call(request.clone()).await.unwrap();
    assert!(matches!(r.outcome, Outcome::Unknown { .. }), "{r:?}");
    let told = f
        .sandbox
        .call(RetrieveAccountHolderRequest {
            account_holder: h.clone(),
            idempotency_key: "ach_eve:retrieve".into(),
            attempt: Some(AttemptRef {
                operation: Operation::SavePaymentMethod,
                idempotency_key: request.idempotency_key.clone(),
                amount: 0,
            }),
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(told.attempt, Some(Outcome::Processed));
    let made = told.attempt_reference.clone().expect("the method it saved");
    assert_eq!(told.data.unwrap()["card"]["last4"], "4242");
    // The same key again answers the first save's truth, and saves nothing more.
    let again = f.sandbox.call(request).await.unwrap();
    assert_eq!(again.reference.as_deref(), Some(made.as_str()));
    let listed = f
        .sandbox
        .call(ListPaymentMethodsRequest {
            account_holder: h,
            idempotency_key: "ach_eve:list".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(listed.methods.len(), 1);
    // A key that never reached the sandbox is not_attempted.
    let never = f
        .sandbox
        .call(RetrieveAccountHolderRequest {
            account_holder: AccountHolderRef {
                id: "ach_never".into(),
                reference: None,
                data: Value::Null,
            },
            idempotency_key: "ach_never:retrieve".into(),
            attempt: Some(AttemptRef {
                operation: Operation::CreateAccountHolder,
                idempotency_key: "ach_never:create".into(),
                amount: 0,
            }),
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(never.status, HolderStatus::NotFound);
    assert!(matches!(never.attempt, Some(Outcome::NotAttempted { .. })));
}

#[test]
fn the_sandbox_passes_the_kits_account_holder_check() {
    let dir = tempfile::tempdir().unwrap();
    let options = json!({"state_dir": dir.path(), "webhook_secret": "whsec_kit_check"});
    let host = payhost_provider_api::testkit::TestHost::new();
    payhost_provider_api::testkit::check_conformance::<payhost_provider_sandbox::SandboxProvider>(
        &host,
        options.clone(),
    )
    .unwrap();
    payhost_provider_api::testkit::check_account_holders::<
        payhost_provider_sandbox::SandboxProvider,
    >(&host, options, json!({"card_number": "4242424242424242"}))
    .unwrap();
}
