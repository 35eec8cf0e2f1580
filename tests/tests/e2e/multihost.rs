//! Two real `payhost serve` processes on one PostgreSQL database, sharing the sandbox's ledger
//! (the simulated processor): racing operations on the same objects through both hosts happen at
//! the processor once, and a host killed mid-call is reconciled by the other.

use std::time::{Duration, Instant};

use payhost_e2e::{Backend, HOST, Scratch, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Cluster {
    a: Server,
    b: Server,
    client: reqwest::Client,
    scratch: Scratch,
}

async fn cluster(timeout_ms: u64) -> Option<Cluster> {
    let scratch = Scratch::new();
    let url = scratch.storage_url(Backend::Postgres).await?;
    let text = HOST
        .replace(
            "url = \"sqlite://{dir}/payhost.db\"",
            &format!("url = \"{url}\""),
        )
        .replace("timeout_ms = 400", &format!("timeout_ms = {timeout_ms}"))
        .replace(
            "library = \"payhost_provider_system\"",
            &format!("library = \"payhost_provider_system\"\ntimeout_ms = {timeout_ms}"),
        );
    let path = scratch.config(&text);
    let a = Server::start(&path);
    let b = Server::start(&path);
    Some(Cluster {
        a,
        b,
        client: reqwest::Client::new(),
        scratch,
    })
}

impl Cluster {
    async fn post(&self, base: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, base: &str, path: &str) -> Value {
        self.client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    /// What the sandbox did for a session, from its ledger file.
    fn ledger(&self, session: &str, op: &str) -> Vec<i64> {
        let text =
            std::fs::read_to_string(self.scratch.dir.path().join("state/sandbox.ledger.jsonl"))
                .unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| {
                e["session_id"] == session
                    && e["op"] == op
                    && e["response"]["outcome"]["status"] == "processed"
            })
            .map(|e| e["amount"].as_i64().unwrap())
            .collect()
    }

    async fn authorized_payment(&self, data: Value) -> (String, String) {
        let (_, col) = self
            .post(
                &self.a.base,
                "/v1/payment-collections",
                json!({"amount": 1000, "currency_code": "eur"}),
            )
            .await;
        let (_, s) = self
            .post(
                &self.b.base,
                "/v1/payment-sessions",
                json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": data}),
            )
            .await;
        let sid = s["id"].as_str().unwrap().to_owned();
        let (status, auth) = self
            .post(
                &self.a.base,
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{auth}");
        (sid, auth["payment"]["id"].as_str().unwrap().to_owned())
    }
}

/// Sends the same request through both hosts at once, `n` times each.
async fn race(c: &Cluster, path: &str, body: Value, n: usize) -> Vec<StatusCode> {
    let mut tasks = Vec::new();
    for i in 0..2 * n {
        let base = if i % 2 == 0 {
            c.a.base.clone()
        } else {
            c.b.base.clone()
        };
        let (client, path, body) = (c.client.clone(), path.to_owned(), body.clone());
        tasks.push(tokio::spawn(async move {
            client
                .post(format!("{base}{path}"))
                .json(&body)
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().expect("answered"));
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_hosts_move_money_at_the_processor_once() {
    let Some(c) = cluster(2000).await else { return };

    // Authorize the same session through both hosts at once: one provider call.
    let (_, col) = c
        .post(
            &c.a.base,
            "/v1/payment-collections",
            json!({"amount": 1000, "currency_code": "eur"}),
        )
        .await;
    let (_, s) = c
        .post(
            &c.a.base,
            "/v1/payment-sessions",
            json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": {"sandbox": {"delay_ms": 50}}}),
        )
        .await;
    let sid = s["id"].as_str().unwrap().to_owned();
    let statuses = race(
        &c,
        &format!("/v1/payment-sessions/{sid}/authorize"),
        json!({}),
        4,
    )
    .await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::OK));
    assert_eq!(
        c.ledger(&sid, "authorize").len(),
        1,
        "one authorization at the processor"
    );
    let session = c
        .get(&c.b.base, &format!("/v1/payment-sessions/{sid}"))
        .await;
    assert_eq!(session["status"], "authorized");
    let view = c
        .get(
            &c.b.base,
            &format!("/v1/payment-collections/{}", col["id"].as_str().unwrap()),
        )
        .await;
    let payment = view["payments"][0]["id"].as_str().unwrap().to_owned();

    // Captures and refunds racing through both hosts: each client is told what happened (done,
    // in progress, or refused past the amount), and the books match the processor's and what
    // the clients were told.
    let allowed = [
        StatusCode::OK,
        StatusCode::CONFLICT,
        StatusCode::UNPROCESSABLE_ENTITY,
    ];
    let mut captures_done = 0;
    for _ in 0..3 {
        let statuses = race(
            &c,
            &format!("/v1/payments/{payment}/capture"),
            json!({"amount": 300}),
            1,
        )
        .await;
        assert!(statuses.iter().all(|s| allowed.contains(s)), "{statuses:?}");
        captures_done += statuses.iter().filter(|s| **s == StatusCode::OK).count() as i64;
    }
    let mut refunds_done = 0;
    for _ in 0..2 {
        let statuses = race(
            &c,
            &format!("/v1/payments/{payment}/refund"),
            json!({"amount": 200}),
            1,
        )
        .await;
        assert!(statuses.iter().all(|s| allowed.contains(s)), "{statuses:?}");
        refunds_done += statuses.iter().filter(|s| **s == StatusCode::OK).count() as i64;
    }
    let p = c.get(&c.a.base, &format!("/v1/payments/{payment}")).await;
    let captured = p["captured_amount"].as_i64().unwrap();
    let refunded = p["refunded_amount"].as_i64().unwrap();
    assert!(captured <= 1000 && refunded <= captured, "{p}");
    assert_eq!(
        captured,
        captures_done * 300,
        "what the clients were told: {p}"
    );
    assert_eq!(
        refunded,
        refunds_done * 200,
        "what the clients were told: {p}"
    );
    assert_eq!(c.ledger(&sid, "capture").iter().sum::<i64>(), captured);
    assert_eq!(c.ledger(&sid, "refund").iter().sum::<i64>(), refunded);
    assert!(
        captured >= 300 && refunded >= 200,
        "some of the racing calls went through: {p}"
    );

    // A cancel racing through both hosts happens once.
    let (sid2, payment2) = c
        .authorized_payment(json!({"sandbox": {"delay_ms": 30}}))
        .await;
    let statuses = race(&c, &format!("/v1/payments/{payment2}/cancel"), json!({}), 3).await;
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    assert_eq!(c.ledger(&sid2, "cancel").len(), 1);
    let p = c.get(&c.b.base, &format!("/v1/payments/{payment2}")).await;
    assert_eq!(p["status"], "canceled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_call_is_reconciled_by_the_other() {
    let Some(mut c) = cluster(1500).await else {
        return;
    };
    let (sid, payment) = c
        .authorized_payment(json!({"sandbox": {"capture": {"delay_ms": 1000}}}))
        .await;
    // A capture on host A, which dies while the processor works on it.
    let request = c
        .client
        .post(format!("{}/v1/payments/{payment}/capture", c.a.base))
        .json(&json!({"amount": 400}))
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.a.kill();
    assert!(
        in_flight.await.unwrap().is_err(),
        "host A died before answering"
    );

    // Meanwhile B refuses new money operations on that payment: the outcome is open.
    let (status, e) = c
        .post(
            &c.b.base,
            &format!("/v1/payments/{payment}/capture"),
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["type"], "outcome_pending");

    // B's reconciler takes the abandoned attempt once it is stale (2 × timeout + 10 s).
    let started = Instant::now();
    loop {
        let open = c.get(&c.b.base, "/v1/attempts").await;
        if open["attempts"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "not reconciled: {open}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The sandbox runs inside A and was still in its 1 s delay: nothing reached the processor.
    // B takes the unknown capture over and, as the processor replays keys, sends it again with
    // the same key: it is captured once, at the processor and in the books.
    let p = c.get(&c.b.base, &format!("/v1/payments/{payment}")).await;
    assert_eq!(p["captured_amount"], 400, "{p}");
    assert_eq!(
        c.ledger(&sid, "capture"),
        vec![400],
        "captured once at the processor"
    );
    let metrics = c
        .client
        .get(format!("{}/metrics", c.b.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_attempt_takeovers_total 1"),
        "B took A's attempt over: {metrics}"
    );
    let (status, p) = c
        .post(
            &c.b.base,
            &format!("/v1/payments/{payment}/capture"),
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_on_one_host_for_a_session_authorizing_on_the_other_ends_consistent() {
    let Some(c) = cluster(3000).await else { return };
    let (_, col) = c
        .post(
            &c.a.base,
            "/v1/payment-collections",
            json!({"amount": 700, "currency_code": "eur"}),
        )
        .await;
    let (_, s) = c
        .post(
            &c.a.base,
            "/v1/payment-sessions",
            json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": {"sandbox": {"authorize": {"delay_ms": 1200}}}}),
        )
        .await;
    let sid = s["id"].as_str().unwrap().to_owned();
    // Host B authorizes (slowly) ...
    let authorizing = {
        let (client, url) = (
            c.client.clone(),
            format!("{}/v1/payment-sessions/{sid}/authorize", c.b.base),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... while the processor's "authorized" webhook reaches host A.
    let body = json!({"id": "evt_cross", "type": "payment.authorized", "session_id": sid, "amount": 700, "currency_code": "eur", "created": 0}).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signature = payhost_provider_sandbox::sign("whsec_test_secret", &body, now);
    let deliver = || {
        c.client
            .post(format!("{}/hooks/sandbox", c.a.base))
            .header("sandbox-signature", signature.clone())
            .body(body.clone())
            .send()
    };
    let first = deliver().await.unwrap();
    assert_eq!(
        first.status(),
        StatusCode::CONFLICT,
        "the webhook waits for the authorize in flight"
    );
    assert_eq!(authorizing.await.unwrap().unwrap(), StatusCode::OK);
    // The processor redelivers: applied once, no second payment, nothing moves back.
    let again = deliver().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let view = c
        .get(
            &c.a.base,
            &format!("/v1/payment-collections/{}", col["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(view["payments"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(view["payment_sessions"][0]["status"], "authorized");
    assert_eq!(c.ledger(&sid, "authorize").len(), 1);
}
