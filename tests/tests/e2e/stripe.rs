//! The Stripe provider against localstripe, a stateful fake Stripe server on a loopback port
//! (see shared PEERS.md for where it differs from Stripe).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use payhost::EngineError;
use payhost::domain::{AttemptState, SessionStatus};
use payhost::engine::*;
use payhost_e2e::{LocalStripe, Scratch, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(api_base: &str, timeout_ms: u64) -> String {
    format!(
        r#"
[storage]
url = "sqlite://{{dir}}/payhost.db"

[plugins]
dir = "{{plugins}}"

[providers.stripe]
library = "payhost_provider_stripe"
timeout_ms = {timeout_ms}
# localstripe ignores Idempotency-Key: never send a call again, only ask retrieve.
resend_unknown = false

[providers.stripe.options]
api_key = "sk_test_payhost"
api_base = "{api_base}"
webhook_secret = "whsec_localstripe"
# localstripe refuses `off_session` on confirm.
off_session = false
"#
    )
}

fn card(number: &str) -> Value {
    json!({"card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}})
}

async fn session(host: &payhost::Host, amount: i64, data: Value) -> String {
    let col = host
        .create_collection(
            NewCollection {
                amount,
                currency_code: "eur".into(),
                metadata: Value::Null,
            },
            None,
        )
        .await
        .unwrap();
    host.create_session(
        NewSession {
            payment_collection_id: Some(col.id.0),
            provider_id: "stripe".into(),
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
        },
        None,
    )
    .await
    .unwrap()
    .id
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_flow_with_partial_capture_refunds_and_cancel() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let host = s.host(&config(&stripe.base(), 10_000)).await;
    let sid = session(&host, 1000, card("4242424242424242")).await;
    let initiated = host.session(&sid).await.unwrap();
    assert!(
        initiated.data["payment_intent_id"]
            .as_str()
            .unwrap()
            .starts_with("pi_")
    );

    let result = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(result.payment_session.status, SessionStatus::Authorized);
    let payment = result.payment.unwrap();
    let p = host
        .capture_payment(&payment.id.0, CaptureInput { amount: Some(600) }, None)
        .await
        .unwrap();
    assert_eq!(p.captured_amount(), 600);
    let second = host
        .capture_payment(&payment.id.0, CaptureInput { amount: Some(100) }, None)
        .await
        .unwrap_err();
    assert_eq!(
        second.code(),
        "unsupported",
        "one capture per intent, as in Stripe: {second}"
    );
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
                amount: Some(150),
                reason: None,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(p.refunded_amount(), 350);

    let other = session(&host, 500, card("4242424242424242")).await;
    let payment = host
        .authorize_session(&other, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    let p = host.cancel_payment(&payment.id.0, None).await.unwrap();
    assert!(p.canceled_at.is_some());
    assert!(host.open_attempts().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_3ds_card_requires_more_and_authorizes_after_the_customer_acts() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let host = s.host(&config(&stripe.base(), 10_000)).await;
    let sid = session(&host, 1000, card("4000002500003155")).await;
    let first = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(first.payment_session.status, SessionStatus::RequiresMore);
    assert!(first.next_action.unwrap()["type"].is_string());
    // Unchanged until the customer acts.
    let again = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(again.payment_session.status, SessionStatus::RequiresMore);

    // The customer passes 3-D Secure (localstripe's own endpoint plays their side).
    let data = host.session(&sid).await.unwrap().data;
    let intent = data["payment_intent_id"].as_str().unwrap();
    let secret = data["client_secret"].as_str().unwrap();
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/payment_intents/{intent}/_authenticate",
            stripe.base()
        ))
        .basic_auth("sk_test_payhost", Some(""))
        .form(&[("client_secret", secret), ("success", "true")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let done = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(done.payment_session.status, SessionStatus::Authorized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_declining_card_is_declined() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let host = s.host(&config(&stripe.base(), 10_000)).await;
    // 4000000000000002 is declined by Stripe but not by localstripe's PaymentIntents (PEERS.md);
    // 4000000000000341 is the card localstripe declines at confirmation.
    let sid = session(&host, 1000, card("4000000000000341")).await;
    let r = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Error);
    assert_eq!(r.decline.unwrap().code.as_deref(), Some("card_declined"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stripe_is_not_attempted() {
    let Some(mut stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let host = s.host(&config(&stripe.base(), 10_000)).await;
    let sid = session(&host, 1000, card("4242424242424242")).await;
    stripe.stop();
    let e = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "not_attempted", "{e}");
    let attempts = host.attempts_of(&sid).await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].state, AttemptState::Failed, "nothing left open");
    assert_eq!(
        host.session(&sid).await.unwrap().status,
        SessionStatus::Pending
    );
}

/// A loopback proxy to localstripe that can lose answers: after a request whose line contains
/// `/confirm`, it still forwards it but never returns the answer on that connection.
struct Proxy {
    address: SocketAddr,
    lose_confirm_answers: Arc<AtomicBool>,
    /// Forward a refund request but never return its answer.
    lose_refund_answers: Arc<AtomicBool>,
    /// Hold a refund request this long before forwarding it (a slow network, a busy
    /// processor): it lands after the client gave up.
    hold_refunds_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Accept connections and never answer, forwarding nothing.
    black_hole: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let lose = Arc::new(AtomicBool::new(false));
        let lose_confirm_answers = lose.clone();
        let hole = Arc::new(AtomicBool::new(false));
        let black_hole = hole.clone();
        let lose_refunds = Arc::new(AtomicBool::new(false));
        let lose_refund_answers = lose_refunds.clone();
        let hold = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hold_refunds_ms = hold.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let lose = lose.clone();
                let lose_refunds = lose_refunds.clone();
                let hold = hold.clone();
                let hole_now = hole.clone();
                if hole.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        let _held = client;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let swallowing = Arc::new(AtomicBool::new(false));
                    let flag = swallowing.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut holding = false;
                        while let Ok(n) = client_rx.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            // A pooled connection falls into the black hole too: nothing more
                            // is forwarded on it, and nothing comes back.
                            holding = holding || hole_now.load(Ordering::SeqCst);
                            if holding {
                                continue;
                            }
                            if lose.load(Ordering::SeqCst)
                                && buf[..n].windows(8).any(|w| w == b"/confirm")
                            {
                                flag.store(true, Ordering::SeqCst);
                            }
                            let refund = buf[..n].starts_with(b"POST /v1/refunds");
                            if refund && lose_refunds.load(Ordering::SeqCst) {
                                flag.store(true, Ordering::SeqCst);
                            }
                            let held = hold.load(Ordering::SeqCst);
                            if refund && held > 0 {
                                tokio::time::sleep(Duration::from_millis(held)).await;
                            }
                            if server_tx.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_rx.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if swallowing.load(Ordering::SeqCst) {
                            continue;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Keep the client's connection open and silent: the answer is lost.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        Proxy {
            address,
            lose_confirm_answers,
            lose_refund_answers,
            hold_refunds_ms,
            black_hole,
        }
    }
}

/// localstripe behind a [`Proxy`], a host whose Stripe calls time out at 1.5 s, and an initiated
/// 10.00 EUR session paying with a card that authorizes.
struct Proxied {
    _stripe: LocalStripe,
    proxy: Proxy,
    _scratch: Scratch,
    host: Arc<payhost::Host>,
    sid: String,
}

impl Proxied {
    async fn start() -> Option<Proxied> {
        let stripe = LocalStripe::start()?;
        let proxy = Proxy::start(stripe.port()).await;
        let scratch = Scratch::new();
        let host = scratch
            .host(&config(&format!("http://{}", proxy.address), 1500))
            .await;
        let sid = session(&host, 1000, card("4242424242424242")).await;
        Some(Proxied {
            _stripe: stripe,
            proxy,
            _scratch: scratch,
            host,
            sid,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_on_the_way_back_is_unknown_then_reconciled() {
    let Some(Proxied {
        _stripe,
        proxy,
        _scratch,
        host,
        sid,
    }) = Proxied::start().await
    else {
        return;
    };

    proxy.lose_confirm_answers.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let e = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::OutcomeUnknown { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(1500 + 1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        host.session(&sid).await.unwrap().status,
        SessionStatus::Pending
    );

    // Stripe did confirm; once answers come back, the reconciler learns it.
    proxy.lose_confirm_answers.store(false, Ordering::SeqCst);
    let report = host.reconcile_due().await.unwrap();
    assert_eq!(report.settled, 1, "{report:?}");
    assert_eq!(
        host.session(&sid).await.unwrap().status,
        SessionStatus::Authorized
    );
    assert!(host.open_attempts().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_localstripe_delivers_is_verified_and_applied() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let text = config(&stripe.base(), 10_000).replace("{dir}", &s.dir.path().display().to_string());
    let server = Server::start(&s.config(&text));
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/_config/webhooks/payhost", stripe.base()))
        .basic_auth("sk_test_payhost", Some(""))
        .form(&[
            ("url", format!("{}/hooks/stripe", server.base)),
            ("secret", "whsec_localstripe".to_owned()),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    let post = |path: String, body: Value| {
        let client = client.clone();
        async move {
            let r = client.post(path).json(&body).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (_, col) = post(
        format!("{}/v1/payment-collections", server.base),
        json!({"amount": 800, "currency_code": "eur"}),
    )
    .await;
    let (status, session) = post(
        format!("{}/v1/payment-sessions", server.base),
        json!({"payment_collection_id": col["id"], "provider_id": "stripe", "data": card("4242424242424242")}),
    )
    .await;
    assert_eq!(status, 201, "{session}");
    let sid = session["id"].as_str().unwrap();
    let (status, auth) = post(
        format!("{}/v1/payment-sessions/{sid}/authorize", server.base),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{auth}");
    let pay = auth["payment"]["id"].as_str().unwrap();
    let (status, _) = post(
        format!("{}/v1/payments/{pay}/capture", server.base),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);

    // localstripe posts payment_intent.succeeded about a second later, signed.
    let started = Instant::now();
    loop {
        let metrics = client
            .get(format!("{}/metrics", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("payhost_webhooks_total{provider=\"stripe\",result=\"applied\"}") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no webhook applied:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The captured session stays as it is; a forged event is refused.
    let s = client
        .get(format!("{}/v1/payment-sessions/{sid}", server.base))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(s["status"], "authorized");
    let forged = client
        .post(format!("{}/hooks/stripe", server.base))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_unknown_then_reconciled_when_stripe_is_back() {
    let Some(Proxied {
        _stripe,
        proxy,
        _scratch,
        host,
        sid,
    }) = Proxied::start().await
    else {
        return;
    };

    proxy.black_hole.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let e = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::OutcomeUnknown { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(1500 + 1000),
        "{:?}",
        started.elapsed()
    );

    // Stripe reachable again: it never saw the authorization, so the attempt failed safely and a
    // new authorize goes through.
    // (The call's thread may still be returning from its cut request for a moment: until it
    // has, the call counts as one that may land, and the attempt stays open.)
    proxy.black_hole.store(false, Ordering::SeqCst);
    payhost_e2e::reconcile_until_settled(&host, Duration::from_secs(5)).await;
    let attempts = host.attempts_of(&sid).await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].state, AttemptState::Failed);
    let r = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Authorized);
}

/// A host whose reconciler checks at once, with a landing margin for requests still on the wire.
fn reconciling(host: Arc<payhost::Host>, landing_margin_ms: i64) -> Arc<payhost::Host> {
    Arc::new(
        Arc::try_unwrap(host)
            .unwrap_or_else(|_| panic!("the test holds the only reference"))
            .with_reconcile(ReconcileSettings {
                first_check_ms: 0,
                base_backoff_ms: 0,
                max_checks: 5,
                landing_margin_ms,
                ..Default::default()
            }),
    )
}

async fn captured_payment(host: &payhost::Host, sid: &str) -> String {
    let payment = host
        .authorize_session(sid, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    host.capture_payment(&payment.id.0, CaptureInput::default(), None)
        .await
        .unwrap();
    payment.id.0
}

/// The refunds localstripe holds for the session's intent.
async fn refunds_at_stripe(stripe: &LocalStripe, host: &payhost::Host, sid: &str) -> Vec<Value> {
    let data = host.session(sid).await.unwrap().data;
    let intent = data["payment_intent_id"].as_str().unwrap();
    let list: Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/refunds?payment_intent={intent}&limit=1000",
            stripe.base()
        ))
        .basic_auth("sk_test_payhost", Some(""))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_held_on_the_wire_past_the_deadline_is_never_settled_as_failed() {
    let Some(Proxied {
        _stripe,
        proxy,
        _scratch,
        host,
        sid,
    }) = Proxied::start().await
    else {
        return;
    };
    // Requests may still land 4 s after the 1.5 s deadline.
    let host = reconciling(host, 4_000);
    let payment = captured_payment(&host, &sid).await;

    // The refund reaches Stripe a second after payhost stopped waiting for it.
    proxy.hold_refunds_ms.store(2_500, Ordering::SeqCst);
    let e = host
        .refund_payment(
            &payment,
            RefundInput {
                amount: Some(400),
                reason: None,
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::OutcomeUnknown { .. }), "{e}");
    // Stripe has no such refund yet: that proves nothing while the request may still land.
    let report = host.reconcile_due().await.unwrap();
    assert_eq!(report.settled, 0, "{report:?}");
    let attempt = host.attempts_of(&payment).await.unwrap().pop().unwrap();
    assert_eq!(attempt.state, AttemptState::Unknown, "{attempt:?}");
    let blocked = host
        .refund_payment(&payment, RefundInput::default(), None)
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), "attempt_unresolved", "{blocked}");

    // It lands; the reconciler learns it.
    payhost_e2e::reconcile_until_settled(&host, Duration::from_secs(10)).await;
    let attempt = host.attempts_of(&payment).await.unwrap().pop().unwrap();
    assert_eq!(attempt.state, AttemptState::Succeeded, "{attempt:?}");
    assert_eq!(host.payment(&payment).await.unwrap().refunded_amount(), 400);
    let refunds = refunds_at_stripe(&_stripe, &host, &sid).await;
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["amount"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_behind_a_hundred_newer_ones_is_still_found() {
    let Some(Proxied {
        _stripe,
        proxy,
        _scratch,
        host,
        sid,
    }) = Proxied::start().await
    else {
        return;
    };
    let host = reconciling(host, 0);
    let payment = captured_payment(&host, &sid).await;
    proxy.lose_refund_answers.store(true, Ordering::SeqCst);
    let e = host
        .refund_payment(
            &payment,
            RefundInput {
                amount: Some(300),
                reason: None,
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::OutcomeUnknown { .. }), "{e}");
    proxy.lose_refund_answers.store(false, Ordering::SeqCst);
    // A hundred newer refunds on the same intent (made in Stripe's dashboard, say).
    let intent = host.session(&sid).await.unwrap().data["payment_intent_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    for i in 0..100 {
        let r = client
            .post(format!("{}/v1/refunds", _stripe.base()))
            .basic_auth("sk_test_payhost", Some(""))
            .form(&[
                ("payment_intent", intent.as_str()),
                ("amount", "1"),
                ("metadata[payhost_key]", &format!("elsewhere-{i}")),
            ])
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    payhost_e2e::reconcile_until_settled(&host, Duration::from_secs(10)).await;
    let attempt = host.attempts_of(&payment).await.unwrap().pop().unwrap();
    assert_eq!(attempt.state, AttemptState::Succeeded, "{attempt:?}");
    assert_eq!(host.payment(&payment).await.unwrap().refunded_amount(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_cannot_point_a_session_at_another_authorized_intent() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let host = s.host(&config(&stripe.base(), 10_000)).await;
    // An old 1.00 EUR payment, authorized.
    let cheap = session(&host, 100, card("4242424242424242")).await;
    host.authorize_session(&cheap, AuthorizeInput::default(), None)
        .await
        .unwrap();
    let cheap_intent = host.session(&cheap).await.unwrap().data["payment_intent_id"].clone();
    // A 1,000.00 EUR session whose customer sends the old intent's id as "data".
    let dear = session(&host, 100_000, Value::Null).await;
    let own_intent = host.session(&dear).await.unwrap().data["payment_intent_id"].clone();
    let e = host
        .update_session(
            &dear,
            SessionUpdate {
                data: Some(json!({"payment_intent_id": cheap_intent})),
                ..Default::default()
            },
            None,
        )
        .await;
    assert!(e.is_ok(), "{e:?}");
    assert_eq!(
        host.session(&dear).await.unwrap().data["payment_intent_id"],
        own_intent,
        "the provider's data is not the caller's to change"
    );
    let r = host
        .authorize_session(
            &dear,
            AuthorizeInput {
                data: Some(
                    json!({"payment_intent_id": cheap_intent, "payment_method": "pm_card_visa"}),
                ),
                ..Default::default()
            },
            None,
        )
        .await;
    let session_now = host.session(&dear).await.unwrap();
    assert_eq!(session_now.data["payment_intent_id"], own_intent);
    // Authorized on its own intent, for its own amount; the old intent is untouched.
    let payment = r
        .unwrap_or_else(|e| panic!("the session authorizes on its own intent: {e}"))
        .payment
        .expect("authorized");
    assert_eq!(payment.amount, 100_000);
    assert_eq!(payment.data["payment_intent_id"], own_intent);
    let old = host.session(&cheap).await.unwrap();
    assert_eq!(old.data["payment_intent_id"], cheap_intent);
    assert_eq!(old.status, SessionStatus::Authorized);
}

/// The Stripe provider passes `payhost provider test` against localstripe; the checks not run
/// are a second capture (not declared) and the repeated capture, which localstripe cannot replay (it ignores Idempotency-Key).
#[test]
fn the_stripe_provider_passes_provider_test() {
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let options = scratch.path().join("options.toml");
    std::fs::write(
        &options,
        format!(
            "api_key = \"sk_test_payhost\"\napi_base = \"{}\"\nwebhook_secret = \"whsec_localstripe\"\noff_session = false\n",
            stripe.base()
        ),
    )
    .unwrap();
    let library = payhost_e2e::library("payhost_provider_stripe");
    let scenario = payhost_e2e::workspace().join("providers/stripe/scenario.toml");
    let out = payhost_e2e::payhost(
        &[
            "provider",
            "test",
            &library.display().to_string(),
            "--options",
            &options.display().to_string(),
            "--scenario",
            &scenario.display().to_string(),
        ],
        &[],
    );
    let report = payhost_e2e::text(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        payhost_e2e::text(&out.stderr)
    );
    // Skipped besides: a second capture, which Stripe's manual capture does not offer.
    assert!(report.contains("0 failed, 2 skipped"), "{report}");
    assert!(report.contains("SKIP  flow.capture_again"), "{report}");
    assert!(report.contains("SKIP  idempotency.capture"), "{report}");
}

/// A new session of `holder`, authorized with the saved `method` and no card input.
async fn charge_saved(
    p: &payhost::Provider,
    session: &str,
    holder: &payhost_provider_api::AccountHolderRef,
    method: &payhost_provider_api::PaymentMethodRef,
) -> payhost_provider_api::ProviderResponse {
    use payhost_provider_api::{AuthorizeRequest, InitiateRequest};
    let init = p
        .call(InitiateRequest {
            session_id: session.into(),
            idempotency_key: format!("{session}:init"),
            amount: 1500,
            currency_code: "eur".into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    p.call(AuthorizeRequest {
        session_id: session.into(),
        idempotency_key: format!("{session}:auth"),
        amount: 1500,
        currency_code: "eur".into(),
        context: Value::Null,
        data: init.data.unwrap(),
        input: Value::Null,
        account_holder: Some(holder.clone()),
        payment_method: Some(method.clone()),
        deadline_unix_ms: None,
    })
    .await
    .unwrap()
}

/// A Stripe customer through the host's call path: a card saved to it pays a later session
/// without card input; a declining card is refused at attach; an unknown save is found by its
/// key; deleting the customer detaches its cards, and a charge with one is then declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_card_pays_a_later_session_and_is_refused_once_its_customer_is_deleted() {
    use payhost_provider_api::*;
    let Some(stripe) = LocalStripe::start() else {
        return;
    };
    let s = Scratch::new();
    let (_config, report) = s.load(&config(&stripe.base(), 10_000));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let p = report.providers.get("stripe").unwrap();
    assert!(p.supports(Operation::SavePaymentMethod));

    let created = p
        .call(CreateAccountHolderRequest {
            account_holder_id: "ach_ada".into(),
            idempotency_key: "ach_ada:create".into(),
            customer: Customer {
                id: "cus_medusa_ada".into(),
                email: Some("ada@example.com".into()),
                first_name: Some("Ada".into()),
                last_name: Some("Lovelace".into()),
                ..Default::default()
            },
            input: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(created.outcome, Outcome::Processed);
    let holder = AccountHolderRef {
        id: "ach_ada".into(),
        reference: created.reference.clone(),
        data: created.data.clone().unwrap(),
    };
    assert!(holder.reference.as_deref().unwrap().starts_with("cus_"));

    let save = |method: &str, number: &str| SavePaymentMethodRequest {
        account_holder: holder.clone(),
        payment_method_id: method.into(),
        idempotency_key: format!("{method}:save"),
        input: card(number),
        deadline_unix_ms: None,
    };
    let saved = p
        .call(save("pm_ada_visa", "4242424242424242"))
        .await
        .unwrap();
    assert_eq!(saved.outcome, Outcome::Processed);
    let data = saved.data.clone().unwrap();
    assert_eq!(data["card"]["last4"], "4242");
    assert!(!data.to_string().contains("4242424242424242"), "{data}");
    let method = PaymentMethodRef {
        id: "pm_ada_visa".into(),
        reference: saved.reference.clone(),
        data,
    };
    let declined = p
        .call(save("pm_ada_declined", "4000000000000002"))
        .await
        .unwrap();
    assert!(
        matches!(&declined.outcome, Outcome::Declined { code: Some(c), .. } if c == "card_declined"),
        "{declined:?}"
    );
    let listed = p
        .call(ListPaymentMethodsRequest {
            account_holder: holder.clone(),
            idempotency_key: "ach_ada:list".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    let refs: Vec<_> = listed
        .methods
        .iter()
        .map(|m| Some(m.reference.clone()))
        .collect();
    assert_eq!(
        refs,
        vec![method.reference.clone()],
        "the declined card is not attached"
    );

    // The save's key finds what it made, as retrieve must answer for an unknown save.
    let told = p
        .call(RetrieveAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: "ach_ada:retrieve".into(),
            attempt: Some(AttemptRef {
                operation: Operation::SavePaymentMethod,
                idempotency_key: "pm_ada_visa:save".into(),
                amount: 0,
            }),
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(told.status, HolderStatus::Active);
    assert_eq!(told.attempt, Some(Outcome::Processed));
    assert_eq!(told.attempt_reference, method.reference);
    let never = p
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
    assert!(
        matches!(never.attempt, Some(Outcome::NotAttempted { .. })),
        "{never:?}"
    );

    // A later session of the customer, paid with the saved card and no card input (the intent
    // is created without the customer: charging sets it).
    let paid = charge_saved(p, "ps_ada_1", &holder, &method).await;
    assert_eq!(paid.outcome, Outcome::Processed, "{paid:?}");

    let deleted = p
        .call(DeleteAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: "ach_ada:delete".into(),
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Processed);
    let refused = charge_saved(p, "ps_ada_2", &holder, &method).await;
    assert!(
        matches!(&refused.outcome, Outcome::Declined { code: Some(c), .. } if c == "payment_method_unavailable"),
        "{refused:?}"
    );
    let gone = p
        .call(RetrieveAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: "ach_ada:retrieve2".into(),
            attempt: None,
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert!(
        matches!(gone.status, HolderStatus::Deleted | HolderStatus::NotFound),
        "{gone:?}"
    );
}
