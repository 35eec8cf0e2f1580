//! Providers in worker processes: a fixture plugin whose authorize segfaults, aborts, exits,
//! overflows its stack, allocates without bound, never returns or floods stdout. Isolated, each
//! costs only its own call: the host lives, the other providers (in-process and isolated) keep
//! serving, the call is unknown and then settled by the reconciler in agreement with the
//! fixture's own ledger, and the worker is back within a second or two. In-process, the same
//! faults take the host down — which is why isolation exists.

use std::time::{Duration, Instant};

use payhost_e2e::{HOST, Scratch, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ISOLATED: &str = r#"
[providers.faulty]
library = "payhost_fixture_faulty"
isolation = "process"
timeout_ms = 1000
kill_after_ms = 500
max_memory_mb = 512

[providers.faulty.options]
state_dir = "{state}"

[providers.isolated_sandbox]
library = "payhost_provider_sandbox"
isolation = "process"
timeout_ms = 1000

[providers.isolated_sandbox.options]
state_dir = "{state}/isolated"
webhook_secret = "whsec_test_secret"

[reconcile]
landing_margin_ms = 0
interval_ms = 200
first_check_ms = 0
"#;

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        match self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
        {
            Ok(r) => {
                let s = r.status();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => panic!("the host did not answer {path}: {e}"),
        }
    }

    async fn get(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("the host answers")
            .json()
            .await
            .unwrap()
    }

    async fn session(&self, provider: &str) -> String {
        let (_, col) = self
            .post(
                "/v1/payment-collections",
                json!({"amount": 1000, "currency_code": "eur"}),
            )
            .await;
        let (s, ses) = self
            .post(
                "/v1/payment-sessions",
                json!({"payment_collection_id": col["id"], "provider_id": provider}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ses}");
        ses["id"].as_str().unwrap().to_owned()
    }

    /// A whole flow on `provider`: authorize and capture.
    async fn flow(&self, provider: &str) {
        let sid = self.session(provider).await;
        let (s, a) = self
            .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{provider}: {a}");
        let pay = a["payment"]["id"].as_str().unwrap();
        let (s, p) = self
            .post(&format!("/v1/payments/{pay}/capture"), json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{provider}: {p}");
    }

    async fn health(&self, id: &str) -> String {
        let list = self.get("/v1/providers").await;
        list["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| p["health"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

fn ledger(scratch: &Scratch) -> String {
    std::fs::read_to_string(scratch.dir.path().join("state/faulty.ledger")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_native_fault_of_an_isolated_provider_costs_only_its_own_call() {
    let scratch = Scratch::new();
    let config = scratch.config(
        &format!("{HOST}{ISOLATED}").replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let server = Server::start(&config);
    let api = Api {
        base: server.base.clone(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    };
    let providers = api.get("/v1/providers").await;
    assert!(
        providers.to_string().contains("\"isolation\":\"process\""),
        "{providers}"
    );
    api.flow("isolated_sandbox").await;
    let mut restarts = Vec::new();
    for fault in [
        "segfault",
        "abort",
        "exit",
        "stack_overflow",
        "alloc",
        "hang",
        "flood",
    ] {
        let sid = api.session("faulty").await;
        let started = Instant::now();
        let authorize = {
            let (client, url) = (
                api.client.clone(),
                format!("{}/v1/payment-sessions/{sid}/authorize", api.base),
            );
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"data": {"fault": fault}}))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        };
        // Meanwhile the other providers serve, in-process and isolated.
        api.flow("sandbox").await;
        api.flow("isolated_sandbox").await;
        let status = authorize.await.unwrap().expect("the host answered");
        if fault == "flood" {
            assert_eq!(status, StatusCode::OK, "a flood of stdout is harmless");
        } else {
            assert_eq!(
                status,
                StatusCode::GATEWAY_TIMEOUT,
                "{fault}: the outcome is unknown"
            );
        }
        // The worker is back, and the call settles in agreement with the fixture's ledger.
        let back = loop {
            let health = api.health("faulty").await;
            if health == "loaded" || health == "unhealthy" {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{fault}: the worker is not back ({health})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if fault != "flood" {
            restarts.push(back);
        }
        let settle_by = Instant::now() + Duration::from_secs(10);
        let session = loop {
            let s = api.get(&format!("/v1/payment-sessions/{sid}")).await;
            let open = api.get("/v1/attempts").await;
            if open["attempts"].as_array().unwrap().is_empty() {
                break s;
            }
            assert!(Instant::now() < settle_by, "{fault}: never settled: {open}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let acted = ledger(&scratch)
            .lines()
            .any(|l| l.contains(&sid) && l.ends_with("authorize"));
        assert_eq!(
            session["status"] == "authorized",
            acted,
            "{fault}: payhost and the fixture agree: {session}"
        );
        assert_eq!(acted, fault == "flood", "{fault}");
        // The host is alive.
        assert_eq!(api.get("/health").await["status"], "ok");
    }
    // Six deaths within a minute: a crash loop, reported while the others go on.
    assert_eq!(api.health("faulty").await, "unhealthy");
    let ready = api
        .client
        .get(format!("{}/ready", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["providers_unhealthy"][0], "faulty", "{body}");
    api.flow("sandbox").await;
    api.flow("isolated_sandbox").await;
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_worker_restarts_total{provider=\"faulty\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("payhost_worker_kills_total{provider=\"faulty\"} 1"),
        "the hung call's worker was killed"
    );
    assert!(
        metrics.contains("payhost_provider_healthy{provider=\"faulty\"} 0"),
        "{metrics}"
    );
    restarts.sort();
    eprintln!(
        "fault to worker back (includes detecting the death; the hang includes its 1 s deadline and 0.5 s kill margin): {restarts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_faults_in_process_take_the_host_down() {
    for fault in ["segfault", "abort", "exit"] {
        let scratch = Scratch::new();
        let config = scratch.config(
            &format!(
                "{HOST}\n[providers.faulty]\nlibrary = \"payhost_fixture_faulty\"\ntimeout_ms = 1000\n[providers.faulty.options]\nstate_dir = \"{{state}}\"\n"
            )
            .replace("{dir}", &scratch.dir.path().display().to_string()),
        );
        let mut server = Server::start(&config);
        let api = Api {
            base: server.base.clone(),
            client: reqwest::Client::new(),
        };
        let sid = api.session("faulty").await;
        let answered = api
            .client
            .post(format!("{}/v1/payment-sessions/{sid}/authorize", api.base))
            .json(&json!({"data": {"fault": fault}}))
            .send()
            .await;
        assert!(answered.is_err(), "{fault}: the host answered");
        let status = server
            .wait(Duration::from_secs(5))
            .expect("the host is gone");
        eprintln!("in-process {fault}: the host exited ({status:?})");
        assert!(
            reqwest::get(format!("{}/health", api.base)).await.is_err(),
            "{fault}: every provider and session went with it"
        );
    }
}

/// A resident-set figure of a process, in KiB, from `/proc/<pid>/status` (`VmHWM`: its peak).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// What a worker writes to stderr reaches the host's log bounded: 256 MiB without a newline
/// costs the host one line's buffer (it once grew the host by the whole flood), and bytes
/// that are not UTF-8 never stop the draining (which once left the worker blocked on a full
/// pipe, its call lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_stderr_cannot_grow_the_host_or_block_the_worker() {
    let scratch = Scratch::new();
    let text = format!("{ISOLATED}\n{HOST}")
        .replace("{dir}", &scratch.dir.path().display().to_string())
        .replace(
            "timeout_ms = 1000\nkill_after_ms = 500",
            "timeout_ms = 20000",
        );
    let config = scratch.config(&text);
    let log = scratch.dir.path().join("server.log");
    let server = Server::start_logging(&config, &log);
    let api = Api {
        base: server.base.clone(),
        client: reqwest::Client::new(),
    };
    api.flow("sandbox").await;
    let before = peak_rss_kib(server.pid());
    for fault in ["stderr_flood", "stderr_binary"] {
        let sid = api.session("faulty").await;
        let (status, body) = api
            .post(
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({"data": {"fault": fault}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{fault}: {body}");
    }
    let after = peak_rss_kib(server.pid());
    assert!(
        after < before + 64 * 1024,
        "the host's peak grew from {before} KiB to {after} KiB"
    );
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("payhost_worker_stderr_dropped_bytes_total{provider=\"faulty\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 255 << 20, "dropped {dropped} bytes:\n{metrics}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("not utf-8"),
        "the line after the bad bytes is forwarded"
    );
}

/// Whether this process runs as root; a test that needs it fails saying so, unless the run
/// opted out with `PAYHOST_SKIP=root`.
fn root_or_say_why() -> bool {
    if nix_is_root() {
        return true;
    }
    payhost_e2e::cannot_run(
        "root",
        "this test starts workers as another user, which needs root (CI runs as root)",
    );
    false
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

/// `[plugins] worker_user`: an isolated plugin runs as that user from its first instruction, so
/// the host's environment (every `${ENV}` secret), its config and its database are out of its
/// reach. The same probe in-process (as the host) reads them all: the probe works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dropped_to_its_own_user_cannot_read_the_hosts_secrets() {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_say_why() {
        return;
    }
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    // The operator's layout: a folder others may cross, the worker's state folder its own,
    // the config readable by the host's user only.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let text = r#"
[storage]
url = "sqlite://{dir}/payhost.db"

[plugins]
dir = "{plugins}"
worker_user = "nobody"

[providers.system]
library = "payhost_provider_system"

[providers.sandbox]
library = "payhost_provider_sandbox"

[providers.sandbox.options]
state_dir = "{state}"
webhook_secret = "${SANDBOX_WEBHOOK_SECRET}"

[providers.faulty]
library = "payhost_fixture_faulty"
isolation = "process"

[providers.faulty.options]
state_dir = "{state}"

[providers.faulty_in_process]
library = "payhost_fixture_faulty"

[providers.faulty_in_process.options]
state_dir = "{state}"
"#
    .replace("{dir}", &dir.display().to_string());
    let config = scratch.config(&text);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = std::process::Command::new(payhost_e2e::payhost_bin());
    c.args([
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .env("SANDBOX_WEBHOOK_SECRET", "whsec_the_hosts_secret")
    .stderr(std::process::Stdio::null());
    let server = Server::from_command(c);
    let api = Api {
        base: server.base.clone(),
        client: reqwest::Client::new(),
    };
    let db = dir.join("payhost.db");
    let targets = [
        format!("/proc/{}/environ", server.pid()),
        config.display().to_string(),
        db.display().to_string(),
        format!("{}-wal", db.display()),
    ];
    let snoop = |provider: &'static str| {
        let api = &api;
        let targets = targets.clone();
        async move {
            let sid = api.session(provider).await;
            let (status, a) = api
                .post(
                    &format!("/v1/payment-sessions/{sid}/authorize"),
                    json!({"data": {"snoop": targets}}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{provider}: {a}");
            let snooped = a["payment_session"]["data"]["snoop"].clone();
            assert!(snooped.is_object(), "{a}");
            snooped
        }
    };
    let isolated = snoop("faulty").await;
    for path in &targets {
        let got = isolated[path].as_str().unwrap_or_default();
        assert!(
            got.starts_with("refused"),
            "the isolated plugin read {path}: {got} ({isolated})"
        );
    }
    let in_process = snoop("faulty_in_process").await;
    for path in &targets {
        let got = in_process[path].as_str().unwrap_or_default();
        assert!(got.starts_with("read"), "in-process, {path}: {got}");
    }
    // The worker really is another user.
    let workers = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .is_some_and(|p| p.trim() == server.pid().to_string())
        })
        .map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert!(!workers.is_empty(), "the worker is the host's child");
    for uids in workers {
        assert!(uids.iter().all(|u| u == "65534"), "{uids:?}");
    }
}

/// What a provider answers is bounded before the host keeps it: a frame is read as it arrives
/// (never allocated from the length it announces), an answer over 1 MiB or data over 64 KiB is
/// `provider.answer_too_large`, and since the call ran, its outcome is *unknown* (reconciled),
/// never a failure that would free the payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_is_an_unknown_outcome_not_a_failure() {
    let scratch = Scratch::new();
    // The size decides here, not the clock: a 16 MiB answer on a loaded two-core machine can take
    // longer than the isolated fixture's usual 1 s deadline to be written, and would then be
    // unknown for another reason.
    let isolated = ISOLATED.replacen("timeout_ms = 1000", "timeout_ms = 5000", 1);
    let text = format!(
        "{HOST}{isolated}\n[providers.faulty_in_process]\nlibrary = \"payhost_fixture_faulty\"\n[providers.faulty_in_process.options]\nstate_dir = \"{{state}}/in\"\n"
    )
    .replace("{dir}", &scratch.dir.path().display().to_string());
    let config = scratch.config(&text);
    let server = Server::start(&config);
    let api = Api {
        base: server.base.clone(),
        client: reqwest::Client::new(),
    };
    let before = peak_rss_kib(server.pid());
    let mut sessions = Vec::new();
    for (provider, kb) in [
        ("faulty_in_process", 100),
        ("faulty", 100),
        ("faulty", 2048),
        ("faulty", 16384),
    ] {
        let sid = api.session(provider).await;
        let (status, body) = api
            .post(
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({"data": {"answer_kb": kb}}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::GATEWAY_TIMEOUT,
            "{provider} {kb} KiB: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("provider.answer_too_large"),
            "{body}"
        );
        let session = api.get(&format!("/v1/payment-sessions/{sid}")).await;
        assert_ne!(session["status"], "authorized", "{provider} {kb}");
        assert!(
            session.to_string().len() < 16 * 1024,
            "nothing of it was stored"
        );
        sessions.push(sid);
    }
    // Unknown, so reconciled: the fixture did authorize, and `retrieve` says so.
    let started = Instant::now();
    for sid in &sessions {
        loop {
            let session = api.get(&format!("/v1/payment-sessions/{sid}")).await;
            if session["status"] == "authorized" {
                assert!(session.to_string().len() < 16 * 1024);
                break;
            }
            assert_ne!(
                session["status"], "error",
                "never taken for a failure: {session}"
            );
            assert!(started.elapsed() < Duration::from_secs(20), "{session}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        peak_rss_kib(server.pid()) < before + 96 * 1024,
        "the host read at most its bounds"
    );
    // The worker and its connections go on serving.
    let sid = api.session("faulty").await;
    let (status, body) = api
        .post(&format!("/v1/payment-sessions/{sid}/authorize"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A plugin's log records and error texts reach the log and the attempts redacted like the
/// config's own secrets, and a line break inside them cannot forge a log line, in-process and
/// isolated alike. The operator is told a secret was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_logs_and_errors_are_redacted_and_cannot_forge_a_line() {
    let scratch = Scratch::new();
    let text = format!(
        "{HOST}\n[providers.faulty]\nlibrary = \"payhost_fixture_faulty\"\nisolation = \"process\"\n[providers.faulty.options]\nstate_dir = \"{{state}}\"\napi_key = \"${{FAULTY_KEY}}\"\n[providers.faulty_in_process]\nlibrary = \"payhost_fixture_faulty\"\n[providers.faulty_in_process.options]\nstate_dir = \"{{state}}/in\"\napi_key = \"sk_live_in_process_0123\"\n"
    )
    .replace("{dir}", &scratch.dir.path().display().to_string());
    let config = scratch.config(&text);
    let log = scratch.dir.path().join("server.log");
    let mut c = std::process::Command::new(payhost_e2e::payhost_bin());
    c.args([
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .env("FAULTY_KEY", "sk_live_from_the_env_4567")
    .stderr(std::fs::File::create(&log).unwrap());
    let server = Server::from_command(c);
    let api = Api {
        base: server.base.clone(),
        client: reqwest::Client::new(),
    };
    for (round, (provider, secret)) in [
        ("faulty", "sk_live_from_the_env_4567"),
        ("faulty_in_process", "sk_live_in_process_0123"),
    ]
    .into_iter()
    .enumerate()
    {
        let forged = "2026-12-03T00:00:00.000000Z  INFO payhost: forged by the plugin";
        let sid = api.session(provider).await;
        let (status, _) = api
            .post(
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({"data": {"log": format!("key {secret}\n{forged}")}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let sid = api.session(provider).await;
        let (status, body) = api
            .post(
                &format!("/v1/payment-sessions/{sid}/authorize"),
                json!({"data": {"fail_with": format!("refused for {secret}\r\n{forged}")}}),
            )
            .await;
        assert!(status.is_server_error(), "{body}");
        assert!(!body.to_string().contains(secret), "{body}");
        // Wait for this round's lines (the log record and the failed call) to be written.
        let started = Instant::now();
        let logs = loop {
            let logs = std::fs::read_to_string(&log).unwrap();
            if logs.matches("forged by the plugin").count() >= 2 * (round + 1) {
                break logs;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{provider}: {logs}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            !logs.contains(secret),
            "{provider}: a secret reached the log:\n{logs}"
        );
        assert!(
            !logs.lines().any(|l| l.starts_with("2026-12-03T00:00:00")),
            "{provider}: a plugin forged a log line:\n{logs}"
        );
        assert!(
            logs.contains("the provider logged the value of a secret"),
            "{logs}"
        );
    }
}
