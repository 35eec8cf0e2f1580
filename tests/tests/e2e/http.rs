//! The HTTP API over real HTTP against a spawned `payhost serve`.

use std::time::Duration;

use payhost_e2e::{HOST, Scratch, Server, artifacts};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    server: Server,
    client: reqwest::Client,
    _scratch: Scratch,
}

impl Api {
    fn start() -> Api {
        Api::start_with(HOST)
    }

    fn start_with(config: &str) -> Api {
        let scratch = Scratch::new();
        let text = config.replace("{dir}", &scratch.dir.path().display().to_string());
        let path = scratch.config(&text);
        Api {
            server: Server::start(&path),
            client: reqwest::Client::new(),
            _scratch: scratch,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    async fn post_key(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            self.client
                .post(self.url(path))
                .header("Idempotency-Key", key)
                .json(&body),
        )
        .await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.get(self.url(path))).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn collection(&self, amount: i64) -> String {
        let (status, c) = self
            .post(
                "/v1/payment-collections",
                json!({"amount": amount, "currency_code": "eur"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{c}");
        c["id"].as_str().unwrap().to_owned()
    }

    async fn session(&self, collection: &str, provider: &str, data: Value) -> String {
        let (status, s) = self
            .post(
                "/v1/payment-sessions",
                json!({"payment_collection_id": collection, "provider_id": provider, "cart_id": "cart_http", "data": data}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{s}");
        s["id"].as_str().unwrap().to_owned()
    }
}

fn assert_error(body: &Value, kind: &str) {
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(
        !body["error"]["message"].as_str().unwrap().is_empty(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_flow_with_partial_captures_and_refunds() {
    let api = Api::start();
    let col = api.collection(3000).await;
    let sid = api.session(&col, "system", Value::Null).await;
    let (status, auth) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{auth}");
    assert_eq!(auth["payment_session"]["status"], "authorized");
    let pay = auth["payment"]["id"].as_str().unwrap().to_owned();

    let (status, p) = api
        .post(
            &format!("/v1/payments/{pay}/capture"),
            json!({"amount": 1000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["status"], "partially_captured");
    let (_, p) = api
        .post(
            &format!("/v1/payments/{pay}/capture"),
            json!({"amount": 2000}),
        )
        .await;
    assert_eq!(p["status"], "captured");
    assert_eq!(p["captured_amount"], 3000);
    let (status, p) = api
        .post(
            &format!("/v1/payments/{pay}/refund"),
            json!({"amount": 500, "reason": "damaged"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["refunded_amount"], 500);
    let (status, over) = api
        .post(
            &format!("/v1/payments/{pay}/refund"),
            json!({"amount": 2501}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{over}");
    assert_error(&over, "invalid_state");
    let (_, p) = api.get(&format!("/v1/payments/{pay}")).await;
    assert_eq!(p["refunded_amount"], 500, "the over-refund changed nothing");

    let (status, list) = api.get("/v1/payment-sessions?cart_id=cart_http").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["payment_sessions"].as_array().unwrap().len(), 1);
    let (_, view) = api.get(&format!("/v1/payment-collections/{col}")).await;
    assert_eq!(view["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requires_more_then_authorize_and_a_decline_is_402() {
    let api = Api::start();
    let col = api.collection(1000).await;
    let sid = api
        .session(&col, "sandbox", json!({"card_number": "4000002500003155"}))
        .await;
    let (status, first) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["payment_session"]["status"], "requires_more");
    assert_eq!(first["next_action"]["type"], "redirect");
    let (_, second) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(second["payment_session"]["status"], "authorized");

    let col = api.collection(1000).await;
    let sid = api
        .session(&col, "sandbox", json!({"card_number": "4000000000000002"}))
        .await;
    let (status, declined) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{declined}");
    assert_error(&declined, "payment_declined");
    let (_, s) = api.get(&format!("/v1/payment-sessions/{sid}")).await;
    assert_eq!(s["status"], "error");
}

fn signed(secret: &str, event: Value) -> (String, String) {
    let body = event.to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signature = payhost_provider_sandbox::sign(secret, &body, now);
    (body, signature)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_then_webhook_with_duplicates_forgeries_and_out_of_order_events() {
    let api = Api::start();
    let col = api.collection(1500).await;
    let sid = api
        .session(
            &col,
            "sandbox",
            json!({"sandbox": {"authorize": "pending"}}),
        )
        .await;
    let (status, r) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["payment_session"]["status"], "pending");

    let hook = |body: String, signature: String| {
        api.client
            .post(api.url("/hooks/sandbox"))
            .header("content-type", "application/json")
            .header("sandbox-signature", signature)
            .body(body)
    };
    let event = json!({"id": "evt_1", "type": "payment.authorized", "session_id": sid, "amount": 1500, "currency_code": "eur", "created": 0});
    let (body, sig) = signed("whsec_test_secret", event.clone());

    // Forged: signed with another secret. Refused, nothing changes.
    let (bad_body, bad_sig) = signed("whsec_not_the_secret", event.clone());
    let (status, forged) = api.send(hook(bad_body, bad_sig)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{forged}");
    assert_error(&forged, "unauthorized");
    let (status, _) = api
        .send(hook(body.replace("1500", "9999"), sig.clone()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, s) = api.get(&format!("/v1/payment-sessions/{sid}")).await;
    assert_eq!(s["status"], "pending");

    let (status, receipt) = api.send(hook(body.clone(), sig.clone())).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["duplicate"], false);
    let (_, s) = api.get(&format!("/v1/payment-sessions/{sid}")).await;
    assert_eq!(s["status"], "authorized");

    let (status, receipt) = api.send(hook(body, sig)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(receipt["duplicate"], true, "acknowledged, applied once");
    let (_, view) = api.get(&format!("/v1/payment-collections/{col}")).await;
    assert_eq!(view["payments"].as_array().unwrap().len(), 1);

    // Out of order: a late "failed" and a late "pending" change nothing.
    for (id, kind) in [("evt_2", "payment.failed"), ("evt_3", "payment.pending")] {
        let (b, s) = signed(
            "whsec_test_secret",
            json!({"id": id, "type": kind, "session_id": sid, "created": 0}),
        );
        let (status, _) = api.send(hook(b, s)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, s) = api.get(&format!("/v1/payment-sessions/{sid}")).await;
    assert_eq!(s["status"], "authorized");

    let (status, e) = api
        .send(api.client.post(api.url("/hooks/nope")).body("{}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
    let (status, _) = api
        .send(api.client.post(api.url("/hooks/system")).body("{}"))
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "the system provider takes no webhooks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_with_a_clear_message_and_change_nothing() {
    let api = Api::start();
    let send_raw = |path: &str, body: &'static str, content_type: &str| {
        api.client
            .post(api.url(path))
            .header("content-type", content_type)
            .body(body)
    };
    let (status, e) = api
        .send(send_raw(
            "/v1/payment-collections",
            "{\"amount\": 10",
            "application/json",
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_error(&e, "invalid_request_error");
    let (status, e) = api
        .post(
            "/v1/payment-collections",
            json!({"amount": "ten", "currency_code": "eur"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "amount", "{e}");
    let (status, e) = api
        .post("/v1/payment-collections", json!({"amount": 10}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("currency_code"),
        "{e}"
    );
    let (status, e) = api
        .post(
            "/v1/payment-collections",
            json!({"amount": 10, "currency_code": "eur", "colour": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("colour"),
        "{e}"
    );
    let (status, e) = api
        .post(
            "/v1/payment-collections",
            json!({"amount": -5, "currency_code": "eur"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "amount");
    let (status, e) = api
        .post(
            "/v1/payment-collections",
            json!({"amount": 5, "currency_code": "bitcoin"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["param"], "currency_code");
    let (status, _) = api
        .send(send_raw(
            "/v1/payment-collections",
            "amount=5",
            "application/x-www-form-urlencoded",
        ))
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let (status, e) = api
        .send(
            api.client
                .post(api.url("/v1/payment-collections"))
                .header("content-type", "application/json")
                .body(deep),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    let huge = format!(
        "{{\"amount\": 5, \"currency_code\": \"eur\", \"metadata\": \"{}\"}}",
        "x".repeat(200_000)
    );
    let (status, e) = api
        .send(
            api.client
                .post(api.url("/v1/payment-collections"))
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{e}");

    for path in [
        "/v1/payment-sessions/ps_nope",
        "/v1/payments/pay_nope",
        "/v1/payment-collections/paycol_nope",
        "/nowhere",
    ] {
        let (status, e) = api.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_error(&e, "not_found");
    }
    let (status, _) = api.post("/v1/payments/pay_nope/capture", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, e) = api.get("/v1/payment-sessions").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    let col = api.collection(100).await;
    let (status, e) = api
        .post(
            "/v1/payment-sessions",
            json!({"payment_collection_id": col, "provider_id": "stripe"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["error"]["param"], "provider_id");
    let (_, view) = api.get(&format!("/v1/payment-collections/{col}")).await;
    assert!(
        view["payment_sessions"].as_array().unwrap().is_empty(),
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_replays_and_refuses_a_different_body() {
    let api = Api::start();
    let body = json!({"amount": 700, "currency_code": "usd"});
    let (s1, first) = api
        .post_key("/v1/payment-collections", "k-1", body.clone())
        .await;
    let (s2, again) = api.post_key("/v1/payment-collections", "k-1", body).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(first, again);
    let (status, e) = api
        .post_key(
            "/v1/payment-collections",
            "k-1",
            json!({"amount": 701, "currency_code": "usd"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&e, "idempotency_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints_answer() {
    let api = Api::start();
    let (status, h) = api.get("/health").await;
    assert_eq!((status, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    // Ready once start-up reconciliation is done: soon after it listens, later on a busy machine.
    let started = std::time::Instant::now();
    let (status, r) = loop {
        let (status, r) = api.get("/ready").await;
        if status == StatusCode::OK || started.elapsed() > Duration::from_secs(10) {
            break (status, r);
        }
        assert_eq!(r["recovered"], false, "only start-up keeps it unready: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["providers_loaded"], 2);
    let col = api.collection(100).await;
    let sid = api.session(&col, "system", Value::Null).await;
    api.post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    let (status, metrics) = api.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("payhost_provider_call_duration_seconds_count{operation=\"authorize\",outcome=\"processed\",provider=\"system\"} 1"), "{text}");
    assert!(text.contains("payhost_http_requests_total{method=\"POST\",route=\"/v1/payment-collections\",status=\"201\"} 1"), "{text}");
    assert!(
        text.contains("payhost_attempts_open{state=\"unknown\"} 0"),
        "{text}"
    );
    let (status, doc) = api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/v1/payments/{id}/capture"]["post"].is_object());
    let (_, providers) = api.get("/v1/providers").await;
    let list = providers["providers"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|p| p["health"] == "loaded" && p["sha256"].as_str().unwrap().len() == 64)
    );
    let (status, attempts) = api.get("/v1/attempts").await;
    assert_eq!(status, StatusCode::OK);
    assert!(attempts["attempts"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_slow_it_down_but_never_crash_it() {
    let _ = rlimit::increase_nofile_limit(65_536);
    let api = Api::start();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let url = api.url("/v1/payment-collections");
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"amount": 100 + i, "currency_code": "eur"}))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        if let Ok(Ok(status)) = t.await {
            assert!(!status.is_server_error(), "{status}");
            if status == StatusCode::CREATED {
                created += 1;
            }
        }
    }
    assert!(created > 900, "only {created} of 1000 succeeded");
    let (status, _) = api.get("/health").await;
    assert_eq!(status, StatusCode::OK, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_provider_call_in_flight_finish() {
    let mut api = Api::start();
    let col = api.collection(100).await;
    let sid = api
        .session(
            &col,
            "sandbox",
            json!({"sandbox": {"authorize": {"delay_ms": 300}}}),
        )
        .await;
    let request = api
        .client
        .post(api.url(&format!("/v1/payment-sessions/{sid}/authorize")))
        .json(&json!({}));
    let in_flight = tokio::spawn(request.send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &api.server.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(response.status(), StatusCode::OK);
    let status = api
        .server
        .wait(Duration::from_secs(15))
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedder_mounts_the_api_beside_its_own_routes() {
    let scratch = Scratch::new();
    let text = HOST.replace("{dir}", &scratch.dir.path().display().to_string());
    let path = scratch.config(&text);
    payhost_e2e::ensure_built();
    let server = Server::start_program(
        &artifacts().join("embed"),
        &["--config", path.to_str().unwrap()],
    );
    let client = reqwest::Client::new();
    let hello = client
        .get(format!("{}/store/hello", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(hello, "hello from the storefront");
    let col: Value = client
        .get(format!("{}/store/checkout", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = col["id"].as_str().unwrap();
    let view = client
        .get(format!(
            "{}/payments/v1/payment-collections/{id}",
            server.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), StatusCode::OK, "one Host behind both");
    let health = client
        .get(format!("{}/payments/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The storefront learns of the payment from payhost's events, not by polling payhost.
    let order = |id: String| {
        let (client, url) = (client.clone(), format!("{}/store/orders/{id}", server.base));
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(order(id.to_owned()).await["status"], "awaiting_payment");
    let session: Value = client
        .post(format!("{}/payments/v1/payment-sessions", server.base))
        .json(&json!({"payment_collection_id": id, "provider_id": "system"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let authorized = client
        .post(format!(
            "{}/payments/v1/payment-sessions/{}/authorize",
            server.base,
            session["id"].as_str().unwrap()
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let paid = loop {
        let o = order(id.to_owned()).await;
        if o["status"] == "paid" || started.elapsed() > Duration::from_secs(10) {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(paid["status"], "paid", "{paid}");
    assert!(paid["paid_by_event"].as_str().unwrap().starts_with("evt_"));
    let books = std::fs::read(scratch.dir.path().join("orders.json")).unwrap_or_else(|e| {
        panic!(
            "the storefront's books beside the config: {e}; {:?}",
            std::fs::read_dir(scratch.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        )
    });
    let books: Value = serde_json::from_slice(&books).unwrap();
    assert!(books["cursor"].as_i64().unwrap() >= 3, "{books}");
}

/// Every file under `dir`, read as bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_numbers_and_cvcs_reach_the_provider_and_nothing_else() {
    const PAN: &str = "4000002500003155"; // 3-D Secure: two authorize calls carry the card
    const CVC: &str = "cvc";
    let scratch = Scratch::new();
    let text = format!("[log]\nlevel = \"debug\"\n{HOST}")
        .replace("{dir}", &scratch.dir.path().display().to_string());
    let config = scratch.config(&text);
    let log = scratch.dir.path().join("server.log");
    let server = Server::start_logging(&config, &log);
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    let mut send = async |r: reqwest::RequestBuilder| -> Value {
        let r = r.send().await.unwrap();
        let text = r.text().await.unwrap();
        answers.push(text.clone());
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    let url = |p: &str| format!("{}{p}", server.base);
    let card = json!({"card_number": PAN, "cvc": "737", "exp_month": 12, "exp_year": 2034});
    let col = send(
        client
            .post(url("/v1/payment-collections"))
            .json(&json!({"amount": 1000, "currency_code": "eur"})),
    )
    .await;
    let sid = send(
        client
            .post(url("/v1/payment-sessions"))
            .header("Idempotency-Key", "pan-session")
            .json(&json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": card})),
    )
    .await["id"]
    .as_str()
    .unwrap()
    .to_owned();
    let first = send(
        client
            .post(url(&format!("/v1/payment-sessions/{sid}/authorize")))
            .header("Idempotency-Key", "pan-authorize")
            .json(&json!({ "data": card })),
    )
    .await;
    assert_eq!(
        first["payment_session"]["status"], "requires_more",
        "{first}"
    );
    let second = send(
        client
            .post(url(&format!("/v1/payment-sessions/{sid}/authorize")))
            .json(&json!({ "data": card })),
    )
    .await;
    assert_eq!(
        second["payment_session"]["status"], "authorized",
        "{second}"
    );
    // The provider used the card: its kept data knows the card's kind and last four digits.
    assert_eq!(second["payment_session"]["data"]["card"]["last4"], "3155");
    let pay = second["payment"]["id"].as_str().unwrap().to_owned();
    for path in [
        format!("/v1/payment-sessions/{sid}"),
        format!("/v1/payments/{pay}"),
        format!("/v1/payment-collections/{}", col["id"].as_str().unwrap()),
        format!(
            "/v1/payment-sessions?payment_collection_id={}",
            col["id"].as_str().unwrap()
        ),
        "/v1/attempts".to_owned(),
    ] {
        send(client.get(url(&path))).await;
    }
    // A replay of the keyed requests answers from what was stored.
    send(
        client
            .post(url(&format!("/v1/payment-sessions/{sid}/authorize")))
            .header("Idempotency-Key", "pan-authorize")
            .json(&json!({ "data": card })),
    )
    .await;
    drop(server);

    for answer in &answers {
        assert!(
            !answer.contains(PAN),
            "a response holds the card number: {answer}"
        );
        // As a JSON value: bare digits turn up in hex ids and timestamps.
        assert!(
            !answer.contains("\"737\"") && !answer.contains(":737"),
            "a response holds the CVC: {answer}"
        );
        assert!(
            !answer.to_ascii_lowercase().contains(CVC),
            "a response names a CVC: {answer}"
        );
    }
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("provider call"), "debug logs were written");
    assert!(!logs.contains(PAN), "the log holds the card number");
    assert!(
        !logs.to_ascii_lowercase().contains("\"cvc\""),
        "the log names a CVC"
    );
    // The database (and its WAL), and everything else the host or the sandbox wrote.
    let pan = PAN.as_bytes();
    for (path, bytes) in files_under(scratch.dir.path()) {
        if path == log || path == config {
            continue;
        }
        assert!(
            !bytes.windows(pan.len()).any(|w| w == pan),
            "{} holds the card number",
            path.display()
        );
        assert!(
            !bytes.windows(5).any(|w| w.eq_ignore_ascii_case(b"\"cvc\"")),
            "{} names a CVC",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_on_one_sqlite_file_refuses_to_start_and_names_the_first() {
    let scratch = Scratch::new();
    let text = HOST.replace("{dir}", &scratch.dir.path().display().to_string());
    let config = scratch.config(&text);
    let first = Server::start(&config);
    let out = std::process::Command::new(payhost_e2e::payhost_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second host started on the same file"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another payhost process") && err.contains(&first.pid().to_string()),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    // The first one is untouched.
    let r = reqwest::get(format!("{}/ready", first.base)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_host_listens_at_once_and_is_ready_once_it_has_reconciled() {
    let scratch = Scratch::new();
    let text = format!("{HOST}\n[reconcile]\nlanding_margin_ms = 0\n")
        .replace("timeout_ms = 400", "timeout_ms = 2000")
        .replace("{dir}", &scratch.dir.path().display().to_string());
    let config = scratch.config(&text);
    let mut first = Server::start(&config);
    let client = reqwest::Client::new();
    let api = |base: &str, p: &str| format!("{base}{p}");
    // Six captures the processor is still working on when the host is killed; asking about
    // each one takes the sandbox a second.
    let mut payments = Vec::new();
    for _ in 0..6 {
        let col: Value = client
            .post(api(&first.base, "/v1/payment-collections"))
            .json(&json!({"amount": 1000, "currency_code": "eur"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let s: Value = client
            .post(api(&first.base, "/v1/payment-sessions"))
            .json(&json!({"payment_collection_id": col["id"], "provider_id": "sandbox",
                "data": {"sandbox": {"capture": {"delay_ms": 20000}, "retrieve": {"delay_ms": 1000}}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let a: Value = client
            .post(api(
                &first.base,
                &format!(
                    "/v1/payment-sessions/{}/authorize",
                    s["id"].as_str().unwrap()
                ),
            ))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        payments.push(a["payment"]["id"].as_str().unwrap().to_owned());
    }
    let captures: Vec<_> = payments
        .iter()
        .map(|p| {
            tokio::spawn(
                client
                    .post(api(&first.base, &format!("/v1/payments/{p}/capture")))
                    .json(&json!({}))
                    .send(),
            )
        })
        .collect();
    for c in captures {
        let r = c.await.unwrap().unwrap();
        let status = r.status();
        assert_eq!(
            status,
            StatusCode::GATEWAY_TIMEOUT,
            "{}",
            r.text().await.unwrap()
        );
    }
    first.kill();

    let second = Server::start(&config);
    // Listening already; asking about six attempts (a second each) is not done yet.
    let r = client
        .get(api(&second.base, "/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["recovered"], false, "{body}");
    // Meanwhile a new customer pays.
    let col: Value = client
        .post(api(&second.base, "/v1/payment-collections"))
        .json(&json!({"amount": 500, "currency_code": "eur"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s: Value = client
        .post(api(&second.base, "/v1/payment-sessions"))
        .json(&json!({"payment_collection_id": col["id"], "provider_id": "system"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let a = client
        .post(api(
            &second.base,
            &format!(
                "/v1/payment-sessions/{}/authorize",
                s["id"].as_str().unwrap()
            ),
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    // Then it is ready, with every abandoned capture settled (none reached the processor).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = client
            .get(api(&second.base, "/ready"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open: Value = client
        .get(api(&second.base, "/v1/attempts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(open["attempts"].as_array().unwrap().is_empty(), "{open}");
}

/// Junk sent to a webhook intake spends the budget of the address it came from, never the
/// provider's: while an address floods `/hooks/sandbox` with unsigned bodies (and ends up
/// refused), the processor's signed webhooks from another address are applied. Verified
/// webhooks have their own per-provider budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_junk_never_takes_the_budget_of_the_processors_webhooks() {
    let api = Api::start_with(&HOST.replace(
        "max_concurrency = 16\n",
        "max_concurrency = 16\nwebhook_rate_per_second = 0.5\nwebhook_burst = 5\n",
    ));
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (junk, processor) = (from([127, 0, 0, 2]), from([127, 0, 0, 1]));
    let hook = api.url("/hooks/sandbox");
    let mut statuses = Vec::new();
    for i in 0..60 {
        let r = junk
            .post(&hook)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"id":"evt_junk_{i}","type":"payment.authorized"}}"#
            ))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[21..].iter().all(|s| *s == 429), "{statuses:?}");
    // The processor's own, signed, from its own address: all applied, within its budget.
    for i in 0..5 {
        let (body, signature) = signed(
            "whsec_test_secret",
            json!({"id": format!("evt_real_{i}"), "type": "payment.authorized", "session_id": "ps_none", "amount": 100, "currency_code": "eur", "created": 0}),
        );
        let r = processor
            .post(&hook)
            .header("sandbox-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(status, StatusCode::OK, "{i}: {}", r.text().await.unwrap());
    }
    // Past its own budget (burst 5), the processor is told to slow down.
    let (body, signature) = signed(
        "whsec_test_secret",
        json!({"id": "evt_real_6", "type": "payment.authorized", "session_id": "ps_none", "amount": 100, "currency_code": "eur", "created": 0}),
    );
    let r = processor
        .post(&hook)
        .header("sandbox-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// SIGTERM gives requests and provider calls in flight `shutdown_grace_ms` in all, and the
/// process ends then: a call that would take 15 s does not hold the host for 15 s (it was
/// once ~20 s: the drain, then the calls, each with the whole grace). Its attempt stays open and
/// is reconciled at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_within_its_one_grace_period() {
    let mut api = Api::start_with(
        &HOST
            .replace("timeout_ms = 400", "timeout_ms = 20000")
            .replace("[storage]", "[server]\nshutdown_grace_ms = 2000\n[storage]"),
    );
    let col = api.collection(100).await;
    let sid = api
        .session(
            &col,
            "sandbox",
            json!({"sandbox": {"authorize": {"delay_ms": 15000}}}),
        )
        .await;
    let request = api
        .client
        .post(api.url(&format!("/v1/payment-sessions/{sid}/authorize")))
        .json(&json!({}));
    let in_flight = tokio::spawn(request.send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &api.server.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = api
        .server
        .wait(Duration::from_secs(20))
        .expect("the server exits");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(3500),
        "stopped {took:?} after SIGTERM with a 2000 ms grace and a call still running"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the connection of the unfinished call was closed"
    );
}

/// Every answer payhost gives is the envelope, the router's own included: a method a route does
/// not take, a path that does not decode, a query that does not parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_the_envelope() {
    let api = Api::start();
    let col = api.collection(100).await;
    for (method, path, status) in [
        ("PUT", "/v1/payment-collections".to_owned(), 405),
        ("DELETE", format!("/v1/payment-collections/{col}"), 405),
        ("GET", "/v1/payment-sessions/%FF%FE".to_owned(), 400),
        ("GET", "/v1/events?limit=many".to_owned(), 400),
        ("GET", "/v1/nothing-here".to_owned(), 404),
    ] {
        let r = api
            .client
            .request(method.parse().unwrap(), api.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{method} {path}: {body}"
        );
    }
}

/// A key in a URL's path is refused like one in its query, and never echoed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_path_is_refused_and_never_echoed() {
    let api = Api::start();
    let secret = "phk_shop_0123456789abcdef0123456789abcdef";
    for path in [
        format!("/v1/payment-sessions/{secret}"),
        format!("/v1/payments/{secret}/capture"),
        "/v1/payment-sessions/PHK%5Fshop_0123456789abcdef".to_owned(),
    ] {
        let r = api.client.get(api.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("api_key_in_url"), "{text}");
        assert!(!text.contains("0123456789abcdef"), "echoed: {text}");
    }
}

/// `Idempotency-Key` replays the first result on every mutating route: a repeated DELETE
/// answers what the first did (it once gave 200, then 422), and so do select and sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_route_replays_its_idempotency_key() {
    let api = Api::start();
    let col = api.collection(100).await;
    let sid = api.session(&col, "system", json!({})).await;
    for (method, path) in [
        ("POST", format!("/v1/payment-sessions/{sid}/select")),
        ("POST", format!("/v1/payment-sessions/{sid}/sync")),
        ("DELETE", format!("/v1/payment-sessions/{sid}")),
    ] {
        let send = || {
            api.send(
                api.client
                    .request(method.parse().unwrap(), api.url(&path))
                    .header("Idempotency-Key", format!("k-{path}"))
                    .header("content-type", "application/json")
                    .body("{}"),
            )
        };
        let (first, a) = send().await;
        let (again, b) = send().await;
        assert_eq!(first, StatusCode::OK, "{method} {path}: {a}");
        assert_eq!((again, &b), (first, &a), "{method} {path} replays");
    }
    // A new key on the deleted session is a new request: refused, as it should be.
    let (status, e) = api
        .send(
            api.client
                .delete(api.url(&format!("/v1/payment-sessions/{sid}")))
                .header("Idempotency-Key", "another"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
}

/// What a commerce platform's bridge relies on: a session created with its amount and currency
/// in one request (its collection made with it), found by the platform's own id, and "capture
/// what is left" on a payment with nothing left answered 422 `invalid_state`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_creates_a_session_in_one_request_and_finds_it_by_its_own_id() {
    let api = Api::start();
    let (status, s) = api
        .post(
            "/v1/payment-sessions",
            json!({"provider_id": "system", "amount": 1500, "currency_code": "jpy", "reference": "payses_01"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{s}");
    assert_eq!(s["reference"], "payses_01");
    let col = s["payment_collection_id"].as_str().unwrap();
    let (_, view) = api.get(&format!("/v1/payment-collections/{col}")).await;
    assert_eq!(
        (view["amount"].as_i64(), view["currency_code"].as_str()),
        (Some(1500), Some("jpy")),
        "{view}"
    );
    let (status, list) = api.get("/v1/payment-sessions?reference=payses_01").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["payment_sessions"][0]["id"], s["id"]);
    let (status, none) = api.get("/v1/payment-sessions?reference=payses_02").await;
    assert_eq!(
        (status, none["payment_sessions"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
    let (status, both) = api
        .get(&format!(
            "/v1/payment-sessions?reference=payses_01&payment_collection_id={col}"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{both}");

    let (status, missing) = api
        .post(
            "/v1/payment-sessions",
            json!({"provider_id": "system", "amount": 1500}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{missing}");
    assert_eq!(missing["error"]["param"], "currency_code", "{missing}");

    let sid = s["id"].as_str().unwrap();
    let (_, auth) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    let pay = auth["payment"]["id"].as_str().unwrap().to_owned();
    let (status, p) = api
        .post(&format!("/v1/payments/{pay}/capture"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let (status, again) = api
        .post(&format!("/v1/payments/{pay}/capture"), json!({}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{again}");
    assert_error(&again, "invalid_state");
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing is left to capture"),
        "{again}"
    );
}

/// A customer's card saved over HTTP pays a later session with no card in any request after
/// the save; the card number never comes back; deleting the holder refuses the next charge.
#[tokio::test]
async fn a_card_saved_over_http_pays_a_later_session_and_not_after_its_holder_is_deleted() {
    let api = Api::start();
    let (status, h) = api
        .post(
            "/v1/account-holders",
            json!({"provider_id": "sandbox", "customer": {"id": "cus_http", "email": "h@example.com"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{h}");
    assert_eq!(h["status"], "active", "{h}");
    let id = h["id"].as_str().unwrap().to_owned();
    let (status, m) = api
        .post_key(
            &format!("/v1/account-holders/{id}/payment-methods"),
            "save-1",
            json!({"data": {"card_number": "4242424242424242"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{m}");
    assert!(!m.to_string().contains("4242424242424242"), "{m}");
    // The same key replays the save (no second attach).
    let (status, again) = api
        .post_key(
            &format!("/v1/account-holders/{id}/payment-methods"),
            "save-1",
            json!({"data": {"card_number": "4242424242424242"}}),
        )
        .await;
    assert_eq!((status, &again["id"]), (StatusCode::CREATED, &m["id"]));
    let (status, list) = api
        .get(&format!("/v1/account-holders/{id}/payment-methods"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["payment_methods"].as_array().map(Vec::len), Some(1));
    let (status, by_customer) = api.get("/v1/account-holders?customer_id=cus_http").await;
    assert_eq!(status, StatusCode::OK, "{by_customer}");
    assert_eq!(by_customer["account_holders"][0]["id"], h["id"]);

    let method = m["id"].as_str().unwrap();
    let mut session_ids = Vec::new();
    for _ in 0..2 {
        let (status, s) = api
            .post(
                "/v1/payment-sessions",
                json!({"provider_id": "sandbox", "amount": 1200, "currency_code": "eur", "account_holder_id": id}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{s}");
        let sid = s["id"].as_str().unwrap().to_owned();
        let (status, r) = api
            .post(
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({"payment_method_id": method}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["payment_session"]["status"], "authorized", "{r}");
        session_ids.push(sid);
    }

    let (status, third) = api
        .post(
            "/v1/payment-sessions",
            json!({"provider_id": "sandbox", "amount": 1200, "currency_code": "eur", "account_holder_id": id}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{third}");
    let (status, deleted) = api
        .send(
            api.client
                .delete(api.url(&format!("/v1/account-holders/{id}"))),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["status"], "deleted");
    let (status, refused) = api
        .post(
            &format!(
                "/v1/payment-sessions/{}/authorize",
                third["id"].as_str().unwrap()
            ),
            json!({"payment_method_id": method}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let (status, bad) = api.get("/v1/account-holders").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(bad["error"]["param"], "customer_id", "{bad}");
    let (status, _) = api.get("/v1/account-holders/ach_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
