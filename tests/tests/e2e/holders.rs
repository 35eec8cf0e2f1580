//! Account holders and saved payment methods through the library API, on both stores, with the
//! sandbox plugin: a method saved once pays later sessions without card input; deleting the
//! holder detaches its methods; an unknown save blocks its holder until the reconciler asks.

use payhost::domain::{AttemptState, HolderStatus, MethodStatus, SessionStatus};
use payhost::engine::*;
use payhost::events::Cursor;
use payhost::{EngineError, Host};
use payhost_e2e::{Backend, HOST, Scratch};
use serde_json::{Value, json};

const CARD: &str = "4242424242424242";

fn customer(id: &str) -> payhost_provider_api::Customer {
    payhost_provider_api::Customer {
        id: id.into(),
        email: Some(format!("{id}@example.com")),
        ..Default::default()
    }
}

async fn holder(host: &Host, customer_id: &str) -> payhost::domain::AccountHolder {
    host.create_account_holder(
        NewAccountHolder {
            provider_id: "sandbox".into(),
            customer: customer(customer_id),
            data: Value::Null,
        },
        None,
    )
    .await
    .unwrap()
}

async fn save(
    host: &Host,
    holder: &str,
    input: Value,
) -> Result<payhost::domain::PaymentMethod, EngineError> {
    host.save_payment_method(holder, NewPaymentMethod { data: input }, None)
        .await
}

/// A 1000 EUR session of `holder` at the sandbox (its own collection), initiated.
async fn session_of(
    host: &Host,
    holder: &str,
) -> Result<payhost::domain::PaymentSession, EngineError> {
    host.create_session(
        NewSession {
            payment_collection_id: None,
            provider_id: "sandbox".into(),
            cart_id: None,
            cart: Value::Null,
            context: Value::Null,
            data: Value::Null,
            amount: Some(1000),
            currency_code: Some("eur".into()),
            metadata: Value::Null,
            reference: None,
            account_holder_id: Some(holder.into()),
            initiate: true,
        },
        None,
    )
    .await
}

/// Authorizes `session` with the saved `method`, and nothing else: no card input.
async fn pay_with(
    host: &Host,
    session: &str,
    method: &str,
) -> Result<AuthorizeResult, EngineError> {
    host.authorize_session(
        session,
        AuthorizeInput {
            payment_method_id: Some(method.into()),
            ..Default::default()
        },
        None,
    )
    .await
}

async fn sandbox_ledger(host: &Host, id: &str) -> Vec<Value> {
    host.providers()
        .get("sandbox")
        .unwrap()
        .call_custom("ledger", json!({ "session_id": id }))
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

async fn event_types(host: &Host) -> Vec<String> {
    host.events_page(Cursor::START.seq(), None, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect()
}

async fn a_method_saved_in_one_session_pays_a_later_session_without_card_input(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let h = holder(&host, "cus_ada").await;
    assert_eq!(h.status, HolderStatus::Active);
    assert!(
        h.reference.is_some(),
        "the sandbox's id for the customer: {h:?}"
    );
    // One live holder per customer and provider: asking again returns it.
    assert_eq!(holder(&host, "cus_ada").await.id, h.id);

    let m = save(&host, h.id.as_str(), json!({"card_number": CARD}))
        .await
        .unwrap();
    assert_eq!(m.status, MethodStatus::Saved);
    assert!(m.reference.is_some(), "{m:?}");
    assert_eq!(m.data["card"]["last4"], "4242", "{m:?}");

    for n in 0..2 {
        let session = session_of(&host, h.id.as_str()).await.unwrap();
        assert_eq!(session.account_holder_id.as_ref(), Some(&h.id));
        let paid = pay_with(&host, session.id.as_str(), m.id.as_str())
            .await
            .unwrap();
        assert_eq!(
            paid.payment_session.status,
            SessionStatus::Authorized,
            "session {n}: {paid:?}"
        );
        assert!(paid.payment.is_some());
        // The processor charged the saved method: it got the holder and the method, no card.
        let ledger = sandbox_ledger(&host, session.id.as_str()).await;
        let authorize = ledger
            .iter()
            .find(|e| e["op"] == "authorize")
            .unwrap_or_else(|| panic!("no authorize in {ledger:?}"));
        assert_eq!(authorize["method"], json!(m.reference), "{authorize}");
    }

    // The card number is nowhere: not in the holder, the methods, the events.
    let view = host.account_holder(h.id.as_str()).await.unwrap();
    assert_eq!(view.payment_methods.len(), 1);
    let everything = format!(
        "{}{}",
        serde_json::to_string(&view).unwrap(),
        serde_json::to_string(
            &host
                .events_page(Cursor::START.seq(), None, 1000)
                .await
                .unwrap()
        )
        .unwrap()
    );
    assert!(!everything.contains(CARD), "{everything}");
    let types = event_types(&host).await;
    for t in ["account_holder.created", "payment_method.saved"] {
        assert_eq!(
            types.iter().filter(|x| *x == t).count(),
            1,
            "{t}: {types:?}"
        );
    }
    // Listed by customer.
    let listed = host.account_holders_of_customer("cus_ada").await.unwrap();
    assert_eq!(listed.len(), 1);
}

async fn deleting_a_holder_detaches_its_methods_and_a_later_charge_is_refused(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let h = holder(&host, "cus_cy").await;
    let m = save(&host, h.id.as_str(), json!({"card_number": CARD}))
        .await
        .unwrap();
    let kept = save(
        &host,
        h.id.as_str(),
        json!({"card_number": "5555555555554444"}),
    )
    .await
    .unwrap();
    // One method deleted alone first.
    let gone = host
        .delete_payment_method(h.id.as_str(), kept.id.as_str(), None)
        .await
        .unwrap();
    assert_eq!(gone.status, MethodStatus::Deleted);
    assert_eq!(host.payment_methods(h.id.as_str()).await.unwrap().len(), 1);

    let session = session_of(&host, h.id.as_str()).await.unwrap();
    let deleted = host
        .delete_account_holder(h.id.as_str(), None)
        .await
        .unwrap();
    assert_eq!(deleted.status, HolderStatus::Deleted);
    let view = host.account_holder(h.id.as_str()).await.unwrap();
    assert!(view.payment_methods.is_empty(), "{view:?}");
    // At the processor the customer and its cards are gone too.
    let ledger = sandbox_ledger(&host, h.id.as_str()).await;
    assert!(
        ledger.iter().any(|e| e["op"] == "delete_account_holder"
            && e["response"]["outcome"]["status"] == "processed"),
        "{ledger:?}"
    );

    // A later charge with the method is refused, and moves nothing.
    let refused = pay_with(&host, session.id.as_str(), m.id.as_str())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "invalid_transition", "{refused}");
    assert!(refused.to_string().contains("deleted"), "{refused}");
    assert!(
        sandbox_ledger(&host, session.id.as_str())
            .await
            .iter()
            .all(|e| e["op"] != "authorize")
    );
    // A new session cannot name the deleted holder; a new holder for the customer can be made.
    let err = session_of(&host, h.id.as_str()).await.unwrap_err();
    assert_eq!(err.code(), "invalid_transition", "{err}");
    let again = holder(&host, "cus_cy").await;
    assert_ne!(again.id, h.id);
    // Deleting again answers the deleted holder.
    assert_eq!(
        host.delete_account_holder(h.id.as_str(), None)
            .await
            .unwrap()
            .status,
        HolderStatus::Deleted
    );
    let types = event_types(&host).await;
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "payment_method.deleted")
            .count(),
        2,
        "{types:?}"
    );
    assert!(types.contains(&"account_holder.deleted".to_owned()));
}

async fn an_unknown_save_blocks_its_holder_until_reconciled_and_is_saved_once(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    let h = holder(&host, "cus_slow").await;
    // The processor attaches the card, then answers after the host stopped waiting (400 ms).
    let err = save(
        &host,
        h.id.as_str(),
        json!({"card_number": CARD, "sandbox": {"save_payment_method": {"delay_after_ms": 1500}}}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "outcome_unknown", "{err}");
    let view = host.account_holder(h.id.as_str()).await.unwrap();
    let open = view
        .open_attempt
        .clone()
        .expect("the save's attempt is open");
    assert_eq!(open.state, AttemptState::Unknown);
    assert!(
        view.payment_methods.is_empty(),
        "a pending method pays nothing"
    );

    // Until it is known, the holder takes no change: another save, a delete, are refused.
    let blocked = save(&host, h.id.as_str(), json!({"card_number": CARD}))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved", "{blocked}");
    let blocked = host
        .delete_account_holder(h.id.as_str(), None)
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved", "{blocked}");
    let session = session_of(&host, h.id.as_str()).await.unwrap();
    let method_id = open.payment_method_id.clone().unwrap();
    let blocked = pay_with(&host, session.id.as_str(), method_id.as_str())
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved", "{blocked}");

    // The reconciler asks the provider, which reports the attach: saved, once.
    let started = std::time::Instant::now();
    loop {
        host.reconcile_due().await.unwrap();
        let attempts = host.holder_attempts(h.id.as_str()).await.unwrap();
        if attempts.iter().all(|t| !t.state.is_open()) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "still open: {attempts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let methods = host.payment_methods(h.id.as_str()).await.unwrap();
    assert_eq!(methods.len(), 1, "{methods:?}");
    assert_eq!(methods[0].id, method_id);
    assert!(methods[0].reference.is_some(), "{methods:?}");
    let saves = sandbox_ledger(&host, h.id.as_str())
        .await
        .into_iter()
        .filter(|e| e["op"] == "save_payment_method")
        .count();
    assert_eq!(saves, 1, "the card was attached once");
    let paid = pay_with(&host, session.id.as_str(), method_id.as_str())
        .await
        .unwrap();
    assert_eq!(paid.payment_session.status, SessionStatus::Authorized);
}

async fn bad_holder_requests_are_named_and_change_nothing(backend: Backend) {
    let s = Scratch::new();
    let Some(host) = s.host_on(backend, HOST).await else {
        return;
    };
    // The system provider's plugin declares no account holders.
    let err = host
        .create_account_holder(
            NewAccountHolder {
                provider_id: "system".into(),
                customer: customer("cus_x"),
                data: Value::Null,
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unsupported", "{err}");
    let err = host
        .create_account_holder(
            NewAccountHolder {
                provider_id: "sandbox".into(),
                customer: customer(""),
                data: Value::Null,
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidInput { field, .. } if field == "customer.id"),
        "{err}"
    );
    assert!(
        host.account_holders_of_customer("cus_x")
            .await
            .unwrap()
            .is_empty()
    );

    let h = holder(&host, "cus_bad").await;
    // The sandbox wants a card: its refusal fails the method, and the holder stays usable.
    let err = save(&host, h.id.as_str(), json!({"token": "tok_1"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "provider_error", "{err}");
    assert!(
        host.payment_methods(h.id.as_str())
            .await
            .unwrap()
            .is_empty()
    );
    let m = save(&host, h.id.as_str(), json!({"card_number": CARD}))
        .await
        .unwrap();

    // A session at another provider cannot name the holder; a method of another holder, or a
    // session without one, cannot be charged.
    let err = host
        .create_session(
            NewSession {
                provider_id: "system".into(),
                amount: Some(100),
                currency_code: Some("eur".into()),
                account_holder_id: Some(h.id.0.clone()),
                ..session_input()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidInput { field, .. } if field == "account_holder_id"),
        "{err}"
    );
    let other = holder(&host, "cus_other").await;
    let theirs = session_of(&host, other.id.as_str()).await.unwrap();
    let err = pay_with(&host, theirs.id.as_str(), m.id.as_str())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidInput { field, .. } if field == "payment_method_id"),
        "{err}"
    );
    let plain = host
        .create_session(
            NewSession {
                provider_id: "sandbox".into(),
                amount: Some(100),
                currency_code: Some("eur".into()),
                ..session_input()
            },
            None,
        )
        .await
        .unwrap();
    let err = pay_with(&host, plain.id.as_str(), m.id.as_str())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidInput { field, .. } if field == "payment_method_id"),
        "{err}"
    );
    // The customer of a holder cannot change.
    let err = host
        .update_account_holder(
            h.id.as_str(),
            AccountHolderUpdate {
                customer: customer("cus_someone_else"),
                data: Value::Null,
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_input", "{err}");
    let mut renamed = customer("cus_bad");
    renamed.email = Some("new@example.com".into());
    let updated = host
        .update_account_holder(
            h.id.as_str(),
            AccountHolderUpdate {
                customer: renamed,
                data: Value::Null,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(updated.customer.email.as_deref(), Some("new@example.com"));
}

/// What a process killed in the middle of a save leaves (the pending method and its attempt in
/// flight, the call long past its deadline) is asked about as the next host opens the file, not
/// once it has gone stale: the processor never saw it, so the method fails and the holder is
/// free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_call_in_flight_when_its_process_died_is_settled_as_the_next_host_opens() {
    use payhost::domain::{AttemptId, HolderAttempt, Operation, PaymentMethod, PaymentMethodId};
    use payhost::store::WriteOp;
    let s = Scratch::new();
    let host = s.host(HOST).await;
    let h = holder(&host, "cus_crash").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let method = PaymentMethod {
        id: PaymentMethodId::generate(),
        account_holder_id: h.id.clone(),
        provider_id: "sandbox".into(),
        reference: None,
        data: Value::Null,
        status: MethodStatus::Pending,
        created_at: now,
        updated_at: now,
        version: 1,
    };
    let id = AttemptId::generate();
    let attempt = HolderAttempt {
        idempotency_key: format!("{}:{id}", h.idempotency_key),
        id: id.clone(),
        account_holder_id: h.id.clone(),
        payment_method_id: Some(method.id.clone()),
        provider_id: "sandbox".into(),
        operation: Operation::SavePaymentMethod,
        state: AttemptState::InFlight,
        detail: Value::Null,
        outcome: None,
        error: None,
        checks: 0,
        next_check_at: None,
        call_deadline_at: now - 60_000,
        created_at: now,
        updated_at: now,
        version: 1,
    };
    host.store()
        .write(vec![
            WriteOp::InsertPaymentMethod(method.clone()),
            WriteOp::InsertHolderAttempt(attempt),
        ])
        .await
        .unwrap();
    drop(host);

    let host = s.host(HOST).await;
    let started = std::time::Instant::now();
    loop {
        host.reconcile_due().await.unwrap();
        let t = host
            .holder_attempts(h.id.as_str())
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.id == id)
            .unwrap();
        if !t.state.is_open() {
            assert_eq!(t.state, AttemptState::Failed, "{t:?}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the dead run's attempt is still open: {t:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let view = host.account_holder(h.id.as_str()).await.unwrap();
    assert!(
        view.open_attempt.is_none() && view.payment_methods.is_empty(),
        "{view:?}"
    );
    // The holder takes a save again.
    let m = save(&host, h.id.as_str(), json!({"card_number": CARD}))
        .await
        .unwrap();
    assert_eq!(m.status, MethodStatus::Saved);
}

fn session_input() -> NewSession {
    NewSession {
        payment_collection_id: None,
        provider_id: String::new(),
        cart_id: None,
        cart: Value::Null,
        context: Value::Null,
        data: Value::Null,
        amount: None,
        currency_code: None,
        metadata: Value::Null,
        reference: None,
        account_holder_id: None,
        initiate: true,
    }
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
    a_method_saved_in_one_session_pays_a_later_session_without_card_input,
    deleting_a_holder_detaches_its_methods_and_a_later_charge_is_refused,
    an_unknown_save_blocks_its_holder_until_reconciled_and_is_saved_once,
    bad_holder_requests_are_named_and_change_nothing,
);
