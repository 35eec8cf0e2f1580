//! Host leases on one PostgreSQL database, with real `payhost serve` processes: a dead host's
//! work is taken over once its lease lapsed and its calls' deadlines passed — seconds, not the
//! old half-minute horizon —, a paused host writes nothing over what another settled, and only
//! the database's clock decides.

use std::time::{Duration, Instant};

use payhost_e2e::{Backend, HOST, Scratch, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Lease 2 s, renewed every 200 ms; the reconciler looks every 200 ms. The sandbox acts inside
/// its call, so a killed host's calls cannot land later: no landing margin.
const LEASE_MS: u64 = 2_000;
const TIMEOUT_MS: u64 = 2_000;

async fn config(scratch: &Scratch) -> Option<std::path::PathBuf> {
    let url = scratch.storage_url(Backend::Postgres).await?;
    let text = format!(
        "{}\n[reconcile]\nlanding_margin_ms = 0\ninterval_ms = 200\nfirst_check_ms = 0\n",
        HOST.replace(
            "url = \"sqlite://{dir}/payhost.db\"",
            &format!("url = \"{url}\"\nlease_ms = {LEASE_MS}\nrenew_ms = 200"),
        )
        .replace("timeout_ms = 400", &format!("timeout_ms = {TIMEOUT_MS}"))
    );
    Some(scratch.config(&text))
}

struct Api {
    client: reqwest::Client,
}

impl Api {
    async fn post(
        &self,
        base: &str,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut r = self.client.post(format!("{base}{path}")).json(&body);
        if let Some(key) = key {
            r = r.header("Idempotency-Key", key);
        }
        match r.send().await {
            Ok(r) => {
                let status = r.status();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (StatusCode::BAD_GATEWAY, Value::Null),
        }
    }

    async fn get(&self, base: &str, path: &str) -> Value {
        self.client
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn authorized_payment(&self, base: &str, data: Value) -> (String, String) {
        let (_, col) = self
            .post(
                base,
                "/v1/payment-collections",
                None,
                json!({"amount": 1000, "currency_code": "eur"}),
            )
            .await;
        let (_, s) = self
            .post(
                base,
                "/v1/payment-sessions",
                None,
                json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": data}),
            )
            .await;
        let sid = s["id"].as_str().unwrap().to_owned();
        let (status, a) = self
            .post(
                base,
                &format!("/v1/payment-sessions/{sid}/authorize"),
                None,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{a}");
        (sid, a["payment"]["id"].as_str().unwrap().to_owned())
    }

    async fn open_attempts(&self, base: &str) -> usize {
        self.get(base, "/v1/attempts").await["attempts"]
            .as_array()
            .unwrap()
            .len()
    }
}

fn ledger(scratch: &Scratch, session: &str, op: &str) -> Vec<i64> {
    std::fs::read_to_string(scratch.dir.path().join("state/sandbox.ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["session_id"] == session
                && e["op"] == op
                && e["response"]["outcome"]["status"] == "processed"
        })
        .map(|e| e["amount"].as_i64().unwrap())
        .collect()
}

fn signal(server: &Server, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_call_is_settled_by_the_survivor_within_lease_and_deadline() {
    let scratch = Scratch::new();
    let Some(path) = config(&scratch).await else {
        return;
    };
    let mut a = Server::start(&path);
    let b = Server::start(&path);
    let api = Api {
        client: reqwest::Client::new(),
    };
    // A capture whose processor takes 800 ms: A dies 300 ms in; the processor never acts.
    let (sid, pay) = api
        .authorized_payment(&a.base, json!({"sandbox": {"capture": {"delay_ms": 800}}}))
        .await;
    let path_capture = format!("/v1/payments/{pay}/capture");
    let in_flight = {
        let (client, url) = (api.client.clone(), format!("{}{path_capture}", a.base));
        tokio::spawn(async move {
            client
                .post(url)
                .header("Idempotency-Key", "cap-1")
                .json(&json!({"amount": 400}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let killed = Instant::now();
    assert!(in_flight.await.unwrap().is_err(), "A died before answering");

    // The client retries on B with its key: blocked while the outcome is open, then the truth.
    let bound = Duration::from_millis(LEASE_MS + TIMEOUT_MS + 1_000);
    let (status, retried) = loop {
        let (status, body) = api
            .post(
                &b.base,
                &path_capture,
                Some("cap-1"),
                json!({"amount": 400}),
            )
            .await;
        if status != StatusCode::CONFLICT {
            break (status, body);
        }
        assert_eq!(body["error"]["code"], "attempt_unresolved", "{body}");
        assert!(
            killed.elapsed() < bound + Duration::from_secs(2),
            "stuck: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settled_after = killed.elapsed();
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["captured_amount"], 400);
    assert!(
        settled_after < bound + Duration::from_millis(800),
        "taken over after {settled_after:?} (lease {LEASE_MS} ms + deadline {TIMEOUT_MS} ms + 1 s)"
    );
    assert_eq!(api.open_attempts(&b.base).await, 0);
    assert_eq!(
        ledger(&scratch, &sid, "capture"),
        vec![400],
        "captured once"
    );
    let metrics = api
        .client
        .get(format!("{}/metrics", b.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_attempt_takeovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("payhost_hosts{state=\"live\"} 1"),
        "{metrics}"
    );
    eprintln!("SIGKILL to the survivor settling: {settled_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claimed_by_a_killed_host_before_it_called_anything_is_released_with_its_lease() {
    let scratch = Scratch::new();
    let Some(path) = config(&scratch).await else {
        return;
    };
    let mut a = Server::start(&path);
    let b = Server::start(&path);
    let api = Api {
        client: reqwest::Client::new(),
    };
    let (_, col) = api
        .post(
            &a.base,
            "/v1/payment-collections",
            None,
            json!({"amount": 1000, "currency_code": "eur"}),
        )
        .await;
    // Creating a session calls the provider's initiate, which is slow: A dies during it, with
    // the key claimed and nothing moved.
    let body = json!({"payment_collection_id": col["id"], "provider_id": "sandbox",
        "data": {"sandbox": {"initiate": {"delay_ms": 1500}}}});
    let first = {
        let (client, url, body) = (
            api.client.clone(),
            format!("{}/v1/payment-sessions", a.base),
            body.clone(),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .header("Idempotency-Key", "sess-1")
                .json(&body)
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let killed = Instant::now();
    assert!(first.await.unwrap().is_err());
    let mut held = 0;
    let created = loop {
        let (status, s) = api
            .post(
                &b.base,
                "/v1/payment-sessions",
                Some("sess-1"),
                body.clone(),
            )
            .await;
        if status == StatusCode::CREATED {
            break s;
        }
        // The dead host's claim holds the key until its lease lapses: in progress.
        assert_eq!(status, StatusCode::CONFLICT, "{s}");
        assert_eq!(s["error"]["code"], "in_progress", "{s}");
        held += 1;
        assert!(
            killed.elapsed() < Duration::from_millis(LEASE_MS + 2_500),
            "the key is stuck: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        held > 0,
        "the key was claimed by the killed host, so it was held until its lease lapsed"
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(LEASE_MS / 2)
            && killed.elapsed() < Duration::from_millis(LEASE_MS + 2_500),
        "{:?}",
        killed.elapsed()
    );
    assert!(created["id"].as_str().unwrap().starts_with("ps_"));
    // One session, initiated once at the processor: the killed host's call never reached it
    // (it slept first), the retry made the only one.
    let view = api
        .get(
            &b.base,
            &format!("/v1/payment-collections/{}", col["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(
        view["payment_sessions"].as_array().unwrap().len(),
        1,
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_writes_nothing_over_what_another_settled_and_comes_back() {
    let scratch = Scratch::new();
    let Some(path) = config(&scratch).await else {
        return;
    };
    let log = scratch.dir.path().join("a.log");
    let a = Server::start_logging(&path, &log);
    let b = Server::start(&path);
    let api = Api {
        client: reqwest::Client::new(),
    };
    // The processor captures at once but answers after 6 s: A is paused meanwhile.
    let (sid, pay) = api
        .authorized_payment(
            &a.base,
            json!({"sandbox": {"capture": {"delay_after_ms": 6000}}}),
        )
        .await;
    let capture = {
        let (client, url) = (
            api.client.clone(),
            format!("{}/v1/payments/{pay}/capture", a.base),
        );
        tokio::spawn(async move { client.post(url).json(&json!({"amount": 300})).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&a, "-STOP");
    // B takes the attempt over once A's lease lapsed and the deadline passed, and learns the
    // truth from the processor.
    let started = Instant::now();
    while api.open_attempts(&b.base).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = api.get(&b.base, &format!("/v1/payments/{pay}")).await;
    assert_eq!(p["captured_amount"], 300, "{p}");
    signal(&a, "-CONT");
    // A's call returns; A may not write its outcome over B's, and says why. Its client is told
    // the truth (captured) or to retry; never that the capture failed.
    let answer = capture.await.unwrap().expect("A answers its client");
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert!(
        (status == StatusCode::OK && body["captured_amount"] == 300)
            || [
                StatusCode::CONFLICT,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT
            ]
            .contains(&status),
        "A told its client {status}: {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        if logs.contains("lease lapsed")
            && logs.contains("registered on the shared store")
            && logs.matches("registered on the shared store").count() >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "A never noticed: {logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = api.get(&b.base, &format!("/v1/payments/{pay}")).await;
    assert_eq!(p["captured_amount"], 300, "one capture, recorded once: {p}");
    assert_eq!(p["captures"].as_array().unwrap().len(), 1);
    assert_eq!(ledger(&scratch, &sid, "capture"), vec![300]);
    // A serves again.
    let mut ready = false;
    for _ in 0..50 {
        if api
            .client
            .get(format!("{}/ready", a.base))
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::OK
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "A is ready again after registering anew");
    let (_, pay2) = api.authorized_payment(&a.base, Value::Null).await;
    let (status, _) = api
        .post(
            &a.base,
            &format!("/v1/payments/{pay2}/capture"),
            None,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_clock_is_an_hour_off_takes_nothing_from_a_live_host() {
    let scratch = Scratch::new();
    let Some(path) = config(&scratch).await else {
        return;
    };
    let a = Server::start(&path);
    // The variable only reaches the child process; its log says it took it.
    let b_log = scratch.dir.path().join("b.log");
    let b = {
        let mut c = std::process::Command::new(payhost_e2e::payhost_bin());
        c.args([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("PAYHOST_TEST_CLOCK_SKEW_MS", "3600000")
        .stderr(std::fs::File::create(&b_log).unwrap());
        Server::from_command(c)
    };
    let logged = std::fs::read_to_string(&b_log).unwrap();
    assert!(
        logged.contains("this host's clock is set off for a test"),
        "B runs with the skewed clock: {logged}"
    );
    let api = Api {
        client: reqwest::Client::new(),
    };
    // A's capture is slow but well within its deadline; by B's clock it is an hour old.
    let (sid, pay) = api
        .authorized_payment(&a.base, json!({"sandbox": {"capture": {"delay_ms": 1500}}}))
        .await;
    let (status, p) = api
        .post(
            &a.base,
            &format!("/v1/payments/{pay}/capture"),
            None,
            json!({"amount": 200}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    let attempts = api.get(&b.base, &format!("/v1/payments/{pay}")).await;
    assert_eq!(attempts["captured_amount"], 200);
    assert_eq!(ledger(&scratch, &sid, "capture"), vec![200]);
    let metrics = api
        .client
        .get(format!("{}/metrics", b.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_attempt_takeovers_total 0"),
        "{metrics}"
    );
    // And B, an hour ahead, works normally.
    let (_, pay2) = api.authorized_payment(&b.base, Value::Null).await;
    let (status, _) = api
        .post(
            &b.base,
            &format!("/v1/payments/{pay2}/capture"),
            None,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_and_restarted_twenty_times_under_keyed_load_loses_nothing() {
    let scratch = Scratch::new();
    let Some(path) = config(&scratch).await else {
        return;
    };
    let api = Api {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    };
    let mut server = Server::start(&path);
    let mut confirmed: Vec<(String, String, i64)> = Vec::new(); // (session, payment, captured)
    let mut takeover = Vec::new();
    for round in 0..20 {
        // A keyed capture is in flight when the host dies, every round: on even rounds before
        // the processor acted (it waits 1.5 s first), on odd rounds after it acted and before
        // it answered (the answer is lost with the host).
        let acted_first = round % 2 == 1;
        let base = server.base.clone();
        let switches = if acted_first {
            json!({"sandbox": {"capture": {"delay_after_ms": 1500}}})
        } else {
            json!({"sandbox": {"capture": {"delay_ms": 1500}}})
        };
        let (sid, pay) = api.authorized_payment(&base, switches).await;
        let key = format!("cap-{round}");
        let body = json!({"amount": 250});
        let url = format!("{base}/v1/payments/{pay}/capture");
        let (client, k, b) = (api.client.clone(), key.clone(), body.clone());
        let in_flight = tokio::spawn(async move {
            client
                .post(url)
                .header("Idempotency-Key", k)
                .json(&b)
                .send()
                .await
        });
        let sent = Instant::now();
        if acted_first {
            while ledger(&scratch, &sid, "capture").is_empty() {
                assert!(
                    sent.elapsed() < Duration::from_secs(1),
                    "round {round}: the processor never acted"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            !in_flight.is_finished(),
            "round {round}: answered before the kill"
        );
        let at_kill = ledger(&scratch, &sid, "capture");
        server.kill();
        let killed = Instant::now();
        assert_eq!(
            at_kill,
            if acted_first { vec![250] } else { vec![] },
            "round {round}: the kill landed mid-call"
        );
        let first = in_flight.await.unwrap();
        assert!(
            first.is_err(),
            "round {round}: a killed host answered the capture: {:?}",
            first.map(|r| r.status())
        );
        server = Server::start(&path);
        // The client retries with its key until it gets an answer.
        let bound = Duration::from_millis(LEASE_MS + TIMEOUT_MS + 2_000);
        loop {
            let (status, p) = api
                .post(
                    &server.base,
                    &format!("/v1/payments/{pay}/capture"),
                    Some(&key),
                    body.clone(),
                )
                .await;
            if status == StatusCode::OK {
                assert_eq!(p["captured_amount"], 250, "round {round}: {p}");
                break;
            }
            // In progress, or its earlier outcome not known yet (or no answer at all while the
            // host starts): nothing else is acceptable.
            let transport = status == StatusCode::BAD_GATEWAY && p.is_null();
            assert!(
                status == StatusCode::CONFLICT
                    || status == StatusCode::SERVICE_UNAVAILABLE
                    || transport,
                "round {round}: retry answered {status}: {p}"
            );
            assert!(
                killed.elapsed() < bound,
                "round {round}: retry still {status} after {:?}: {p}",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        takeover.push(killed.elapsed());
        assert_eq!(
            ledger(&scratch, &sid, "capture"),
            vec![250],
            "round {round}: captured once at the processor"
        );
        confirmed.push((sid, pay, 250));
    }
    for (sid, pay, captured) in &confirmed {
        let p = api.get(&server.base, &format!("/v1/payments/{pay}")).await;
        assert_eq!(p["captured_amount"], *captured, "{p}");
        assert_eq!(ledger(&scratch, sid, "capture"), vec![*captured], "{sid}");
    }
    takeover.sort();
    eprintln!(
        "SIGKILL to the retried capture's answer over 20 restarts: p50 {:?}, max {:?}",
        takeover[takeover.len() / 2],
        takeover[takeover.len() - 1]
    );
}
