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
            payment_collection_id: col.id.0,
            provider_id: "stripe".into(),
            cart_id: None,
            cart: Value::Null,
            context: Value::Null,
            data,
            amount: None,
            currency_code: None,
            metadata: Value::Null,
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
    assert!(
        attempts.iter().all(|a| a.state == AttemptState::Failed),
        "nothing left open"
    );
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
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let lose = lose.clone();
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
    proxy.black_hole.store(false, Ordering::SeqCst);
    let report = host.reconcile_due().await.unwrap();
    assert_eq!(report.settled, 1, "{report:?}");
    let attempts = host.attempts_of(&sid).await.unwrap();
    assert_eq!(attempts[0].state, AttemptState::Failed);
    let r = host
        .authorize_session(&sid, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Authorized);
}
