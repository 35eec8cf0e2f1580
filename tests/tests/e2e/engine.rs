//! The lifecycle engine through the library API, on the durable SQLite store, with the real
//! plugins.

use std::sync::Arc;

use payhost::domain::{AttemptState, CollectionStatus, PaymentStatus, SessionStatus};
use payhost::engine::*;
use payhost::{EngineError, Host};
use payhost_e2e::{Backend, HOST, Scratch, payhost, text};
use serde_json::{Value, json};

async fn collection(host: &Host, amount: i64, currency: &str) -> String {
    host.create_collection(
        NewCollection {
            amount,
            currency_code: currency.into(),
            metadata: Value::Null,
        },
        None,
    )
    .await
    .unwrap()
    .id
    .0
}

/// A 1000 EUR collection and its session on `provider`, authorized: the payment.
async fn authorized(host: &Host, provider: &str) -> payhost::domain::Payment {
    let col = collection(host, 1000, "eur").await;
    let session = host
        .create_session(new_session(&col, provider, Value::Null), None)
        .await
        .unwrap();
    host.authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap()
}

fn new_session(collection: &str, provider: &str, data: Value) -> NewSession {
    NewSession {
        payment_collection_id: Some(collection.into()),
        provider_id: provider.into(),
        cart_id: Some("cart_1".into()),
        cart: json!({"email": "c@example.com"}),
        context: json!({"ip": "203.0.113.7"}),
        data,
        amount: None,
        currency_code: None,
        metadata: Value::Null,
        reference: None,
        account_holder_id: None,
        initiate: true,
    }
}

async fn sandbox_entries(host: &Host, session: &str, op: &str) -> usize {
    let ledger = host
        .providers()
        .get("sandbox")
        .unwrap()
        .call_custom("ledger", json!({ "session_id": session }))
        .await
        .unwrap();
    ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == op && e["response"]["outcome"]["status"] == "processed")
        .count()
}

async fn a_system_payment_is_authorized_captured_in_parts_and_refunded_in_parts(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 1500, "EUR").await;
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::NotPaid
    );
    let session = host
        .create_session(new_session(&col, "system", Value::Null), None)
        .await
        .unwrap();
    assert!(session.is_initiated);
    assert_eq!(session.status, SessionStatus::Pending);
    assert_eq!(session.amount, 1500);
    assert_eq!(session.currency_code.code(), "eur");
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::Awaiting
    );

    let result = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(result.payment_session.status, SessionStatus::Authorized);
    assert!(result.payment_session.payment_authorized_at.is_some());
    let payment = result.payment.unwrap();
    assert_eq!(payment.amount, 1500);
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::Authorized
    );

    let p = host
        .capture_payment(&payment.id.0, CaptureInput { amount: Some(1000) }, None)
        .await
        .unwrap();
    assert_eq!(p.status(), PaymentStatus::PartiallyCaptured);
    let p = host
        .capture_payment(&payment.id.0, CaptureInput::default(), None)
        .await
        .unwrap();
    assert_eq!(p.captured_amount(), 1500);
    assert!(p.captured_at.is_some());
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::Completed
    );

    let over = host
        .capture_payment(&payment.id.0, CaptureInput { amount: Some(1) }, None)
        .await
        .unwrap_err();
    assert_eq!(over.code(), "invalid_transition", "{over}");

    host.refund_payment(
        &payment.id.0,
        RefundInput {
            amount: Some(200),
            reason: Some("damaged".into()),
        },
        None,
    )
    .await
    .unwrap();
    let p = host
        .refund_payment(
            &payment.id.0,
            RefundInput {
                amount: Some(300),
                reason: None,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(p.refunded_amount(), 500);
    assert_eq!(p.status(), PaymentStatus::PartiallyRefunded);
    assert_eq!(p.refunds[0].reason.as_deref(), Some("damaged"));
    let over = host
        .refund_payment(
            &payment.id.0,
            RefundInput {
                amount: Some(1001),
                reason: None,
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(over.code(), "invalid_transition");
    assert!(
        over.to_string().contains("would exceed what was captured"),
        "{over}"
    );
    let p = host
        .refund_payment(&payment.id.0, RefundInput::default(), None)
        .await
        .unwrap();
    assert_eq!(p.status(), PaymentStatus::Refunded);

    // Every money call left a settled attempt, none open.
    assert!(host.open_attempts().await.unwrap().is_empty());
    let attempts = host.attempts_of(&payment.id.0).await.unwrap();
    assert_eq!(attempts.len(), 5);
    assert!(attempts.iter().all(|a| a.state == AttemptState::Succeeded));
}

async fn requires_more_returns_the_next_action_and_the_next_authorize_completes(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 4200, "usd").await;
    let session = host
        .create_session(
            new_session(&col, "sandbox", json!({"card_number": "4000002500003155"})),
            None,
        )
        .await
        .unwrap();
    let first = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(first.payment_session.status, SessionStatus::RequiresMore);
    assert_eq!(first.next_action.unwrap()["type"], "redirect");
    assert!(first.payment.is_none());
    let second = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(second.payment_session.status, SessionStatus::Authorized);
    assert!(second.payment.is_some());
}

async fn a_pending_authorization_completes_by_webhook_and_a_late_pending_changes_nothing(
    backend: Backend,
) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 999, "eur").await;
    let session = host
        .create_session(
            new_session(
                &col,
                "sandbox",
                json!({"sandbox": {"authorize": "pending"}}),
            ),
            None,
        )
        .await
        .unwrap();
    let r = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Pending);
    assert!(
        host.open_attempts().await.unwrap().is_empty(),
        "pending is an answer, not an open outcome"
    );

    let sandbox = host.providers().get("sandbox").unwrap().clone();
    let hook = sandbox
        .call_custom("settle", json!({"session_id": session.id.0}))
        .await
        .unwrap();
    let (body, headers): (String, Vec<(String, String)>) = (
        hook["body"].as_str().unwrap().into(),
        serde_json::from_value(hook["headers"].clone()).unwrap(),
    );
    // Through the intake, as the processor's POST arrives: verified, stored, applied.
    let receipt = host
        .receive_webhook("sandbox", body.clone(), headers.clone())
        .await
        .unwrap();
    assert!(!receipt.duplicate);
    let applied = host.session(&session.id.0).await.unwrap();
    assert_eq!(applied.status, SessionStatus::Authorized);
    assert!(host.collection(&col).await.unwrap().payments.len() == 1);

    // Out of order: a "pending" after "authorized" is ignored; the session does not move back.
    let late = host
        .apply_report(&session.id.0, payhost_provider_api::WebhookAction::Pending)
        .await
        .unwrap();
    assert_eq!(late.status, SessionStatus::Authorized);
    let failed = host
        .apply_report(&session.id.0, payhost_provider_api::WebhookAction::Failed)
        .await
        .unwrap();
    assert_eq!(failed.status, SessionStatus::Authorized);
    // The processor sends the same event again: the intake knows its id, says so, and records
    // nothing more (no second payment, no second `webhook.applied`).
    let again = host
        .receive_webhook("sandbox", body, headers)
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "the second delivery of an event is a duplicate"
    );
    assert_eq!(again.event_id, receipt.event_id);
    assert_eq!(host.collection(&col).await.unwrap().payments.len(), 1);
    let applied_events: Vec<_> = host
        .wait_for_events(
            0,
            Some(vec!["webhook.applied".into()]),
            100,
            std::time::Duration::ZERO,
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.data["event_id"] == receipt.event_id.as_str())
        .collect();
    assert_eq!(applied_events.len(), 1, "{applied_events:?}");
}

async fn a_decline_leaves_the_session_in_error_for_good(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 500, "gbp").await;
    let session = host
        .create_session(
            new_session(&col, "sandbox", json!({"card_number": "4000000000000002"})),
            None,
        )
        .await
        .unwrap();
    let r = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Error);
    assert_eq!(r.decline.unwrap().code.as_deref(), Some("card_declined"));
    let again = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(again.code(), "invalid_transition");
    let attempts = host.attempts_of(&session.id.0).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].state, AttemptState::Failed, "kept, not deleted");
}

async fn bad_inputs_give_clear_errors_and_change_nothing(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let bad = |amount: i64, currency: &str| NewCollection {
        amount,
        currency_code: currency.into(),
        metadata: Value::Null,
    };
    for (input, field, needle) in [
        (bad(100, "xyz"), "currency_code", "ISO 4217"),
        (bad(0, "eur"), "amount", "positive"),
        (bad(-10, "eur"), "amount", "positive"),
        (bad(i64::MAX, "eur"), "amount", "too large"),
    ] {
        match host.create_collection(input, None).await.unwrap_err() {
            EngineError::InvalidInput { field: f, message } => {
                assert_eq!(f, field);
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    let col = collection(&host, 1000, "jpy").await;
    let mut wrong_currency = new_session(&col, "system", Value::Null);
    wrong_currency.currency_code = Some("eur".into());
    let e = host.create_session(wrong_currency, None).await.unwrap_err();
    assert!(e.to_string().contains("currency mismatch"), "{e}");
    let mut zero = new_session(&col, "system", Value::Null);
    zero.amount = Some(0);
    assert_eq!(
        host.create_session(zero, None).await.unwrap_err().code(),
        "invalid_input"
    );
    let e = host
        .create_session(new_session(&col, "stripe", Value::Null), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "provider_not_loaded");
    let e = host
        .create_session(new_session("paycol_nope", "system", Value::Null), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "not_found");
    assert!(
        host.collection(&col)
            .await
            .unwrap()
            .payment_sessions
            .is_empty(),
        "nothing changed"
    );
    assert_eq!(
        host.session("ps_missing").await.unwrap_err().code(),
        "not_found"
    );
    assert_eq!(
        host.payment("not-an-id").await.unwrap_err().code(),
        "not_found"
    );

    let session = host
        .create_session(new_session(&col, "system", Value::Null), None)
        .await
        .unwrap();
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    for amount in [0, -1, 1001] {
        let e = host
            .capture_payment(
                &payment.id.0,
                CaptureInput {
                    amount: Some(amount),
                },
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), "invalid_input" | "invalid_transition"),
            "{e}"
        );
    }
    let refund = host
        .refund_payment(
            &payment.id.0,
            RefundInput {
                amount: Some(1),
                reason: None,
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(refund.code(), "invalid_transition");
    let p = host.payment(&payment.id.0).await.unwrap();
    assert!(p.captures.is_empty() && p.refunds.is_empty());
    assert_eq!(
        host.attempts_of(&payment.id.0).await.unwrap().len(),
        0,
        "refused before any attempt"
    );
}

async fn an_idempotency_key_replays_its_result_and_refuses_another_request(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 2500, "eur").await;
    let session = host
        .create_session(new_session(&col, "sandbox", Value::Null), Some("create-1"))
        .await
        .unwrap();
    let replay = host
        .create_session(new_session(&col, "sandbox", Value::Null), Some("create-1"))
        .await
        .unwrap();
    assert_eq!(session, replay);
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), Some("auth-1"))
        .await
        .unwrap()
        .payment
        .unwrap();
    let first = host
        .capture_payment(
            &payment.id.0,
            CaptureInput { amount: Some(700) },
            Some("cap-1"),
        )
        .await
        .unwrap();
    let second = host
        .capture_payment(
            &payment.id.0,
            CaptureInput { amount: Some(700) },
            Some("cap-1"),
        )
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(
        host.payment(&payment.id.0).await.unwrap().captured_amount(),
        700
    );
    assert_eq!(sandbox_entries(&host, &session.id.0, "capture").await, 1);

    let mismatch = host
        .capture_payment(
            &payment.id.0,
            CaptureInput { amount: Some(800) },
            Some("cap-1"),
        )
        .await
        .unwrap_err();
    assert_eq!(mismatch.code(), "idempotency_mismatch");
    let other_op = host
        .refund_payment(
            &payment.id.0,
            RefundInput {
                amount: Some(700),
                reason: None,
            },
            Some("cap-1"),
        )
        .await
        .unwrap_err();
    assert_eq!(other_op.code(), "idempotency_mismatch");
    assert_eq!(
        host.payment(&payment.id.0).await.unwrap().captured_amount(),
        700
    );

    // A failed request releases its key: the retry runs again.
    let e = host
        .capture_payment(
            &payment.id.0,
            CaptureInput { amount: Some(5000) },
            Some("cap-2"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_transition");
    // Released, not remembered: the same key now carries another (valid) request, which runs.
    // (A remembered failure would answer `idempotency_mismatch` here.)
    let ok = host
        .capture_payment(
            &payment.id.0,
            CaptureInput { amount: Some(300) },
            Some("cap-2"),
        )
        .await
        .unwrap();
    assert_eq!(ok.captured_amount(), 1000);
    assert_eq!(sandbox_entries(&host, &session.id.0, "capture").await, 2);
}

async fn concurrent_authorizes_of_one_session_call_the_provider_once(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 3000, "eur").await;
    let session = host
        .create_session(
            new_session(
                &col,
                "sandbox",
                json!({"sandbox": {"authorize": {"delay_ms": 100}}}),
            ),
            None,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let host = host.clone();
        let id = session.id.0.clone();
        tasks.push(tokio::spawn(async move {
            host.authorize_session(&id, AuthorizeInput::default(), None)
                .await
        }));
    }
    let mut payments = Vec::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.payment_session.status, SessionStatus::Authorized);
        payments.push(r.payment.unwrap().id);
    }
    payments.dedup();
    assert_eq!(payments.len(), 1, "one payment for all");
    assert_eq!(sandbox_entries(&host, &session.id.0, "authorize").await, 1);
    assert_eq!(host.attempts_of(&session.id.0).await.unwrap().len(), 1);
}

async fn an_unknown_outcome_blocks_money_operations_until_reconciled(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 1200, "eur").await;
    let session = host
        .create_session(
            new_session(&col, "sandbox", json!({"card_number": "4000000000000119"})),
            None,
        )
        .await
        .unwrap();
    let e = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    let EngineError::OutcomeUnknown { attempt_id, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(attempt_id.starts_with("att_"));
    assert_eq!(
        host.session(&session.id.0).await.unwrap().status,
        SessionStatus::Pending
    );
    let blocked = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved", "{blocked}");
    assert!(blocked.to_string().contains(attempt_id.as_str()));
    let deleted = host.delete_session(&session.id.0, None).await.unwrap_err();
    assert_eq!(deleted.code(), "attempt_unresolved");

    let report = host.reconcile_due().await.unwrap();
    assert_eq!(report.settled, 1, "{report:?}");
    let session = host.session(&session.id.0).await.unwrap();
    assert_eq!(
        session.status,
        SessionStatus::Authorized,
        "the processor did authorize"
    );
    assert_eq!(host.collection(&col).await.unwrap().payments.len(), 1);
    assert_eq!(sandbox_entries(&host, &session.id.0, "authorize").await, 1);
}

async fn a_capture_that_times_out_is_recorded_once_after_reconciling(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    }; // sandbox timeout 400 ms
    let col = collection(&host, 1000, "eur").await;
    // The capture is slow: the sandbox still captures, after the host gave up waiting.
    let session = host
        .create_session(
            new_session(
                &col,
                "sandbox",
                json!({"sandbox": {"capture": {"delay_ms": 900}}}),
            ),
            None,
        )
        .await
        .unwrap();
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    let e = host
        .update_session(&session.id.0, SessionUpdate::default(), None)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        "invalid_transition",
        "an authorized session cannot be updated"
    );
    let e = host
        .capture_payment(&payment.id.0, CaptureInput { amount: Some(600) }, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "outcome_unknown", "{e}");
    let blocked = host
        .refund_payment(&payment.id.0, RefundInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved");
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let report = host.reconcile_due().await.unwrap();
    assert_eq!(report.settled, 1, "{report:?}");
    let p = host.payment(&payment.id.0).await.unwrap();
    assert_eq!(p.captured_amount(), 600);
    assert_eq!(sandbox_entries(&host, &session.id.0, "capture").await, 1);
}

async fn an_operator_lists_and_resolves_an_open_attempt_from_the_command_line(backend: Backend) {
    let s = Scratch::new();
    // The call's deadline is 400 ms; a second after it, it can no longer land.
    let config_text = format!("{HOST}\n[reconcile]\nlanding_margin_ms = 1000\n");
    let Some(host) = s.host_on(backend, &config_text).await else {
        return;
    };
    let col = collection(&host, 800, "eur").await;
    let session = host
        .create_session(
            new_session(&col, "sandbox", json!({"card_number": "4000000000000119"})),
            None,
        )
        .await
        .unwrap();
    let EngineError::OutcomeUnknown { attempt_id, .. } = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap_err()
    else {
        panic!()
    };
    let config = s.config_path();
    let config = config.to_str().unwrap();
    // Listing works beside the running host (read-only on SQLite).
    let out = payhost(&["attempts", "--config", config], &[]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        listing.contains(&attempt_id)
            && listing.contains("unknown")
            && listing.contains("authorize"),
        "{listing}"
    );
    let resolve = |outcome: &str, note: &str| {
        payhost(
            &[
                "attempts",
                "resolve",
                &attempt_id,
                "--as",
                outcome,
                "--note",
                note,
                "--by",
                "ops@example",
                "--config",
                config,
            ],
            &[],
        )
    };
    if backend == Backend::Sqlite {
        // The running host has the file: only it knows which calls still run.
        let out = resolve("succeeded", "seen in the PSP dashboard");
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("store.locked") && err.contains("/v1/attempts/<id>/resolve"),
            "{err}"
        );
        drop(host);
    }
    // Before the call's deadline plus the margin, nobody may say what happened.
    let out = resolve("failed", "the PSP shows nothing");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("call_may_land"),
        "{}",
        text(&out.stderr)
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let out = resolve("succeeded", "seen in the PSP dashboard");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let host = s.host_on(backend, &config_text).await.unwrap();
    let attempt = host.attempts_of(&session.id.0).await.unwrap().remove(0);
    assert_eq!(attempt.state, AttemptState::Succeeded);
    let resolution = attempt.resolution.unwrap();
    assert_eq!(resolution.by, "ops@example");
    assert_eq!(resolution.note, "seen in the PSP dashboard");
    assert_eq!(
        host.session(&session.id.0).await.unwrap().status,
        SessionStatus::Authorized
    );
    drop(host);

    let again = resolve("failed", "x");
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already settled"));
}

async fn cancel_voids_a_payment_and_the_database_refuses_captures_after_it(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let payment = authorized(&host, "sandbox").await;
    let col = payment.payment_collection_id.0.clone();
    let p = host.cancel_payment(&payment.id.0, None).await.unwrap();
    assert_eq!(p.status(), PaymentStatus::Canceled);
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::Canceled
    );
    let e = host
        .capture_payment(&payment.id.0, CaptureInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_transition");

    // Below the engine, the database holds the invariants too.
    let capture = payhost::domain::Capture {
        id: payhost::domain::CaptureId::generate(),
        amount: 100,
        attempt_id: payhost::domain::AttemptId::generate(),
        created_at: 0,
    };
    let e = host
        .store()
        .write(vec![payhost::store::WriteOp::InsertCapture(
            payment.id.clone(),
            capture,
        )])
        .await
        .unwrap_err();
    assert_eq!(e.code(), "store.invariant", "{e}");
    let refund = payhost::domain::Refund {
        id: payhost::domain::RefundId::generate(),
        amount: 1,
        reason: None,
        attempt_id: payhost::domain::AttemptId::generate(),
        created_at: 0,
    };
    let e = host
        .store()
        .write(vec![payhost::store::WriteOp::InsertRefund(
            payment.id.clone(),
            refund,
        )])
        .await
        .unwrap_err();
    assert_eq!(e.code(), "store.invariant");
    let mut back = host.session(&payment.payment_session_id.0).await.unwrap();
    let expected = back.version;
    back.status = SessionStatus::Pending;
    back.version += 1;
    let e = host
        .store()
        .write(vec![payhost::store::WriteOp::UpdateSession {
            session: back,
            expected_version: expected,
        }])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("terminal"), "{e}");
}

/// Writes sent together (SQLite commits them as one transaction): the ones the database refuses
/// fail alone, with their own error, and every other one commits.
async fn writes_sent_together_fail_alone(backend: Backend) {
    use payhost::domain::{CollectionId, Currency, PaymentCollection};
    use payhost::store::WriteOp;
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let payment = authorized(&host, "sandbox").await;
    host.cancel_payment(&payment.id.0, None).await.unwrap();

    for round in 0..4 {
        let mut writes = Vec::new();
        let mut good = Vec::new();
        for i in 0..32 {
            if (i + round) % 3 == 0 {
                // A capture of a canceled payment: the database refuses it.
                writes.push(vec![WriteOp::InsertCapture(
                    payment.id.clone(),
                    payhost::domain::Capture {
                        id: payhost::domain::CaptureId::generate(),
                        amount: 100,
                        attempt_id: payhost::domain::AttemptId::generate(),
                        created_at: 0,
                    },
                )]);
            } else {
                let c = PaymentCollection {
                    id: CollectionId::generate(),
                    amount: 100 + i,
                    currency_code: Currency::parse("eur").unwrap(),
                    metadata: Value::Null,
                    created_at: 1,
                    updated_at: 1,
                };
                good.push(c.id.0.clone());
                writes.push(vec![WriteOp::InsertCollection(c)]);
            }
        }
        let store = host.store();
        let results =
            futures_util::future::join_all(writes.into_iter().map(|ops| store.write(ops))).await;
        for (i, r) in results.iter().enumerate() {
            if (i as i64 + round) % 3 == 0 {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.code(), "store.invariant", "write {i}: {e}");
            } else {
                assert!(r.is_ok(), "write {i} of round {round}: {r:?}");
            }
        }
        for id in &good {
            host.collection(id).await.unwrap();
        }
    }
    let payment = host.payment(&payment.id.0).await.unwrap();
    assert!(payment.captures.is_empty(), "{:?}", payment.captures);
}

async fn one_session_is_selected_per_cart_and_placeholders_initiate_on_selection(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 1000, "eur").await;
    let mut placeholder = new_session(&col, "sandbox", Value::Null);
    placeholder.initiate = false;
    let a = host.create_session(placeholder, None).await.unwrap();
    assert!(!a.is_initiated);
    let b = host
        .create_session(new_session(&col, "system", Value::Null), None)
        .await
        .unwrap();
    let a = host.select_session(&a.id.0, None).await.unwrap();
    assert!(a.is_selected && a.is_initiated, "initiated when selected");
    let b = host.select_session(&b.id.0, None).await.unwrap();
    assert!(b.is_selected);
    let by_cart = host.sessions_of_cart("cart_1").await.unwrap();
    assert_eq!(by_cart.len(), 2);
    assert_eq!(by_cart.iter().filter(|s| s.is_selected).count(), 1);
    assert_eq!(host.sessions_of_collection(&col).await.unwrap().len(), 2);

    let updated = host
        .update_session(
            &b.id.0,
            SessionUpdate {
                amount: Some(900),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(updated.amount, 900);
    let deleted = host.delete_session(&a.id.0, None).await.unwrap();
    assert_eq!(deleted.status, SessionStatus::Canceled);
    let e = host
        .authorize_session(&a.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_transition");
}

async fn everything_survives_reopening_the_store(backend: Backend) {
    let s = Scratch::new();
    let (col, payment) = {
        let Some(host) = s.host_on(backend, HOST).await else {
            return;
        };
        let payment = authorized(&host, "system").await;
        let col = payment.payment_collection_id.0.clone();
        host.capture_payment(&payment.id.0, CaptureInput { amount: Some(400) }, None)
            .await
            .unwrap();
        (col, payment.id.0)
    };
    let Some(host): Option<Arc<Host>> = s.host_on(backend, HOST).await else {
        return;
    };
    assert_eq!(host.payment(&payment).await.unwrap().captured_amount(), 400);
    assert_eq!(
        host.collection(&col).await.unwrap().status,
        CollectionStatus::Authorized
    );
}

async fn a_retry_with_the_key_of_an_unknown_capture_never_captures_twice(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let col = collection(&host, 1000, "eur").await;
    let session = host
        .create_session(
            new_session(&col, "sandbox", json!({"sandbox": {"capture": "unknown"}})),
            None,
        )
        .await
        .unwrap();
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    let capture = || CaptureInput { amount: Some(600) };
    let first = host
        .capture_payment(&payment.id.0, capture(), Some("cap-k"))
        .await
        .unwrap_err();
    assert_eq!(first.code(), "outcome_unknown", "{first}");
    // Retried while the outcome is open: told so, nothing runs.
    let early = host
        .capture_payment(&payment.id.0, capture(), Some("cap-k"))
        .await
        .unwrap_err();
    assert_eq!(early.code(), "attempt_unresolved", "{early}");
    // After a restart (giving the lease up, as `serve` does on SIGTERM) and reconciliation the
    // key is still bound to its attempt.
    host.release_lease().await;
    drop(host);
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    // (On PostgreSQL the new host takes the attempt over once its call's deadline passed.)
    payhost_e2e::reconcile_until_settled(&host, std::time::Duration::from_secs(5)).await;
    let replay = host
        .capture_payment(&payment.id.0, capture(), Some("cap-k"))
        .await
        .unwrap();
    assert_eq!(replay.captured_amount(), 600);
    let again = host
        .capture_payment(&payment.id.0, capture(), Some("cap-k"))
        .await
        .unwrap();
    assert_eq!(again, replay);
    assert_eq!(
        sandbox_entries(&host, &session.id.0, "capture").await,
        1,
        "captured once"
    );

    // A declined authorize retried with its key gets the same decline.
    let declined = host
        .create_session(
            new_session(&col, "sandbox", json!({"card_number": "4000000000000002"})),
            None,
        )
        .await
        .unwrap();
    let a = host
        .authorize_session(&declined.id.0, AuthorizeInput::default(), Some("auth-d"))
        .await
        .unwrap();
    let b = host
        .authorize_session(&declined.id.0, AuthorizeInput::default(), Some("auth-d"))
        .await
        .unwrap();
    assert_eq!(a.decline, b.decline);
    assert!(b.decline.is_some());
}

/// SQLite's log is copied back into the database as it grows (by the store's checkpoint
/// thread, not by the writer): it stays near its 1,000-frame threshold however much is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_stays_bounded_as_payments_are_written() {
    let s = Scratch::new();
    let host = s.host_on(Backend::Sqlite, HOST).await.unwrap();
    let wal = s.dir.path().join("payhost.db-wal");
    // 1,000 frames of 4 KiB pages: what SQLite's own automatic checkpoint keeps it near.
    let bound = 3 * 1000 * (4096 + 24);
    let mut largest = 0;
    for _ in 0..120 {
        let payment = authorized(&host, "system").await;
        host.capture_payment(&payment.id.0, CaptureInput::default(), None)
            .await
            .unwrap();
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    // Unchecked, 120 flows' commits (about 8 pages each) would leave a WAL of about 27 MB.
    assert!(largest > 0, "the WAL was never seen");
    assert!(largest <= bound, "the WAL reached {largest} bytes");
}

/// A session created with an amount and a currency and no collection brings its own, in the
/// same write (one transaction on PostgreSQL), with both events; it carries the caller's
/// reference, by which it is listed. A session without the currency creates nothing.
async fn a_session_without_a_collection_brings_its_own_in_one_write(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let mut input = new_session("", "system", Value::Null);
    input.payment_collection_id = None;
    input.amount = Some(1234);
    input.currency_code = Some("kwd".into());
    input.reference = Some("payses_medusa_1".into());
    let before = host.store().statement_counts();
    let session = host.create_session(input.clone(), None).await.unwrap();
    if let (Some((_, tx_before)), Some((_, tx_after))) = (before, host.store().statement_counts()) {
        assert_eq!(tx_after - tx_before, 1, "one write transaction");
    }
    let view = host
        .collection(&session.payment_collection_id.0)
        .await
        .unwrap();
    assert_eq!(
        (view.collection.amount, view.collection.currency_code.code()),
        (1234, "kwd")
    );
    assert_eq!(session.reference.as_deref(), Some("payses_medusa_1"));
    let found = host
        .sessions_with_reference("payses_medusa_1")
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, session.id);
    let events = host.events_page(0, None, 100).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["payment_collection.created", "payment_session.created"]
    );
    assert_eq!(events[1].data["reference"], "payses_medusa_1");

    for (missing, field) in [("currency_code", "currency_code"), ("amount", "amount")] {
        let mut bad = input.clone();
        bad.reference = Some("payses_medusa_2".into());
        match missing {
            "currency_code" => bad.currency_code = None,
            _ => bad.amount = None,
        }
        match host.create_session(bad, None).await.unwrap_err() {
            EngineError::InvalidInput { field: f, message } => {
                assert_eq!(f, field);
                assert!(
                    message.contains("without `payment_collection_id`"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let mut long = input.clone();
    long.reference = Some("r".repeat(256));
    assert!(matches!(
        host.create_session(long, None).await.unwrap_err(),
        EngineError::InvalidInput { field, .. } if field == "reference"
    ));
    assert!(
        host.sessions_with_reference("payses_medusa_2")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        host.events_page(0, None, 100).await.unwrap().len(),
        2,
        "the refused sessions created nothing"
    );
}

/// Capturing or refunding "what is left" when nothing is left is an invalid state that says
/// so, not a complaint about an amount nobody sent.
async fn nothing_left_to_capture_or_refund_is_an_invalid_state(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let payment = authorized(&host, "system").await;
    let id = payment.id.0.clone();
    host.capture_payment(&id, CaptureInput::default(), None)
        .await
        .unwrap();
    match host
        .capture_payment(&id, CaptureInput::default(), None)
        .await
        .unwrap_err()
    {
        EngineError::InvalidTransition(why) => {
            assert_eq!(why, "nothing is left to capture: 1000 of 1000 is captured")
        }
        other => panic!("{other:?}"),
    }
    host.refund_payment(&id, RefundInput::default(), None)
        .await
        .unwrap();
    match host
        .refund_payment(&id, RefundInput::default(), None)
        .await
        .unwrap_err()
    {
        EngineError::InvalidTransition(why) => {
            assert!(why.starts_with("nothing is left to refund"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let p = host.payment(&id).await.unwrap();
    assert_eq!((p.captures.len(), p.refunds.len()), (1, 1));
}

/// An endpoint that names providers gets only their sessions' and payments' events (and no
/// collection's); one that names none gets every event.
async fn an_endpoint_with_providers_gets_only_their_events(backend: Backend) {
    let s = Scratch::new();
    let config = format!(
        "{HOST}\n[[events.endpoints]]\nid = \"all\"\nurl = \"http://127.0.0.1:9/all\"\nsecret = \"whsec_endpoint_secret_1\"\n\n[[events.endpoints]]\nid = \"medusa\"\nurl = \"http://127.0.0.1:9/medusa\"\nsecret = \"whsec_endpoint_secret_2\"\nproviders = [\"sandbox\"]\n"
    );
    let Some(host) = s.host_on(backend, &config).await else {
        return;
    };
    authorized(&host, "system").await;
    authorized(&host, "sandbox").await;
    let events = host.events_page(0, None, 100).await.unwrap();
    let deliveries = host
        .store()
        .deliveries(payhost::events::DeliveryState::Pending, 1000)
        .await
        .unwrap();
    let to = |endpoint: &str| -> Vec<String> {
        let mut ids: Vec<String> = deliveries
            .iter()
            .filter(|d| d.endpoint_id == endpoint)
            .map(|d| d.id.trim_end_matches(&format!(":{endpoint}")).to_owned())
            .collect();
        ids.sort();
        ids
    };
    let mut all: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    all.sort();
    assert_eq!(to("all"), all);
    let sandbox_sessions: Vec<&str> = events
        .iter()
        .filter(|e| e.data["provider_id"] == "sandbox")
        .filter_map(|e| e.payment_session_id.as_deref())
        .collect();
    assert!(!sandbox_sessions.is_empty());
    let mut expected: Vec<String> = events
        .iter()
        .filter(|e| {
            e.payment_session_id
                .as_deref()
                .is_some_and(|s| sandbox_sessions.contains(&s))
        })
        .map(|e| e.id.clone())
        .collect();
    expected.sort();
    assert!(expected.len() >= 2, "{expected:?}");
    assert_eq!(to("medusa"), expected);
}

/// Every scenario above, on SQLite and on PostgreSQL.
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
    writes_sent_together_fail_alone,
    a_retry_with_the_key_of_an_unknown_capture_never_captures_twice,
    a_system_payment_is_authorized_captured_in_parts_and_refunded_in_parts,
    requires_more_returns_the_next_action_and_the_next_authorize_completes,
    a_pending_authorization_completes_by_webhook_and_a_late_pending_changes_nothing,
    a_decline_leaves_the_session_in_error_for_good,
    bad_inputs_give_clear_errors_and_change_nothing,
    an_idempotency_key_replays_its_result_and_refuses_another_request,
    concurrent_authorizes_of_one_session_call_the_provider_once,
    an_unknown_outcome_blocks_money_operations_until_reconciled,
    a_capture_that_times_out_is_recorded_once_after_reconciling,
    an_operator_lists_and_resolves_an_open_attempt_from_the_command_line,
    cancel_voids_a_payment_and_the_database_refuses_captures_after_it,
    one_session_is_selected_per_cart_and_placeholders_initiate_on_selection,
    everything_survives_reopening_the_store,
    a_session_without_a_collection_brings_its_own_in_one_write,
    nothing_left_to_capture_or_refund_is_an_invalid_state,
    an_endpoint_with_providers_gets_only_their_events,
);
