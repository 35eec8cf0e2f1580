//! Changing a running `payhost serve`'s config without a restart: `payhost reload`,
//! `POST /v1/admin/reload` and `SIGHUP`; keys and event endpoints applied at once, an invalid
//! file or one that needs a restart changing nothing.

use std::time::Duration;

use payhost_e2e::receiver::Receiver;
use payhost_e2e::{HOST, Scratch, Server, payhost, text};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SECRET: &str = "whsec_reload_old_0123456789";
const NEW_SECRET: &str = "whsec_reload_new_0123456789";

/// A key made by `payhost keys new`: (secret, its `[[api_keys]]` table).
fn new_key(id: &str, scopes: &str) -> (String, String) {
    let out = payhost(&["keys", "new", "--id", id, "--scope", scopes], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let secret = stdout.lines().next().unwrap().to_owned();
    let table: String = stdout
        .lines()
        .skip_while(|l| !l.starts_with("[[api_keys]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    (secret, table)
}

fn endpoint(url: &str, secret: &str) -> String {
    format!(
        "[[events.endpoints]]\nid = \"shop\"\nurl = \"{url}\"\nsecret = \"{secret}\"\ntypes = [\"*\"]\nretry_base_ms = 50\n"
    )
}

struct Running {
    server: Server,
    scratch: Scratch,
    client: reqwest::Client,
}

impl Running {
    fn write(&self, text: &str) -> std::path::PathBuf {
        let text = text.replace("{dir}", &self.scratch.dir.path().display().to_string());
        self.scratch.config(&text)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.server.base))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    async fn collection(&self, key: &str) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::POST,
            "/v1/payment-collections",
            key,
            Some(json!({"amount": 500, "currency_code": "eur"})),
        )
        .await
    }

    /// `payhost reload` against this server, with `key` as the operator key.
    fn reload_cli(&self, key: &str) -> std::process::Output {
        let config = self.scratch.config_path();
        payhost(
            &[
                "reload",
                "--config",
                config.to_str().unwrap(),
                "--url",
                &self.server.base,
            ],
            &[("PAYHOST_API_KEY", key)],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_revokes_a_key_adds_an_endpoint_and_an_invalid_or_restart_needing_file_changes_nothing()
 {
    let (ops, ops_table) = new_key("ops", "read,payments,operator");
    let (shop, shop_table) = new_key("shop", "read,payments");
    let scratch = Scratch::new();
    let first = format!("{HOST}\n{ops_table}{shop_table}")
        .replace("{dir}", &scratch.dir.path().display().to_string());
    let path = scratch.config(&first);
    let server = Server::start(&path);
    let r = Running {
        server,
        scratch,
        client: reqwest::Client::new(),
    };
    assert_eq!(r.collection(&shop).await.0, StatusCode::CREATED);
    let (_, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
    assert_eq!(ready["config_generation"], 0, "{ready}");
    let started_digest = ready["config_digest"].as_str().unwrap().to_owned();
    // `check` names the same file by the same digest.
    let checked = payhost(
        &["check", "--json", "--config", path.to_str().unwrap()],
        &[],
    );
    let checked: Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(
        checked["config_sha256"],
        started_digest.as_str(),
        "{checked}"
    );

    // Revoke `shop`, add an endpoint: applied from the next request on.
    let receiver = Receiver::start(SECRET).await;
    let second = format!("{HOST}\n{ops_table}\n{}", endpoint(&receiver.url, SECRET));
    r.write(&second);
    let out = r.reload_cli(&ops);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("changed: api_keys, events"),
        "{}",
        text(&out.stdout)
    );
    let (status, refused) = r.collection(&shop).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a revoked key: {refused}");
    let (status, made) = r.collection(&ops).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let id = made["id"].as_str().unwrap().to_owned();
    receiver
        .wait_until(Duration::from_secs(10), |got| {
            got.iter()
                .any(|e| e.body["data"]["id"] == id.as_str() && e.verified)
        })
        .await;
    let (_, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
    assert_eq!(ready["config_generation"], 1, "{ready}");
    assert_ne!(
        ready["config_digest"].as_str(),
        Some(started_digest.as_str())
    );

    // An invalid file: refused here with its line, and by the server; nothing changes.
    r.write(&format!("{second}\n[providers.extra]\nlibrary = 5\n"));
    let out = r.reload_cli(&ops);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("payhost.toml:") && err.contains("nothing was sent"),
        "{err}"
    );
    let (status, answer) = r
        .call(
            reqwest::Method::POST,
            "/v1/admin/reload",
            &ops,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "config.invalid");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("payhost.toml:") && message.contains("unchanged"),
        "{message}"
    );

    // A change that needs a restart: named, and nothing else of the file applied.
    let restart = format!(
        "[reconcile]\nmax_checks = 7\n{HOST}\n{ops_table}{shop_table}\n{}",
        endpoint(&receiver.url, SECRET)
    );
    r.write(&restart);
    let (status, answer) = r
        .call(
            reqwest::Method::POST,
            "/v1/admin/reload",
            &ops,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "config.restart_needed");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[reconcile]"),
        "{answer}"
    );
    assert_eq!(
        r.collection(&shop).await.0,
        StatusCode::UNAUTHORIZED,
        "the key in the refused file was not applied"
    );
    let (_, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
    assert_eq!(ready["config_generation"], 1, "{ready}");

    // SIGHUP: the key comes back.
    r.write(&format!("{second}{shop_table}"));
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &r.server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = std::time::Instant::now();
    while r.collection(&shop).await.0 != StatusCode::CREATED {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGHUP did not bring the key back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = r
        .client
        .get(format!("{}/metrics", r.server.base))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (result, n) in [("applied", 2), ("invalid", 1), ("restart_needed", 1)] {
        let line = format!("payhost_config_reloads_total{{result=\"{result}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

/// A rotated endpoint secret: deliveries after the reload still verify with the old secret
/// (the overlap), so a receiver that has not switched yet loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_endpoint_secret_keeps_signing_beside_the_new_one() {
    let (ops, ops_table) = new_key("ops", "read,payments,operator");
    let old = Receiver::start(SECRET).await;
    // Knows only the new secret, and its endpoint keeps the old one: what a receiver sees
    // when nothing signs with its secret (so `verified` can be false).
    let other = Receiver::start(NEW_SECRET).await;
    let scratch = Scratch::new();
    let other_endpoint = endpoint(&other.url, SECRET).replace("id = \"shop\"", "id = \"other\"");
    let text0 = format!(
        "{HOST}\n{ops_table}\n{}\n{other_endpoint}",
        endpoint(&old.url, SECRET)
    )
    .replace("{dir}", &scratch.dir.path().display().to_string());
    let path = scratch.config(&text0);
    let r = Running {
        server: Server::start(&path),
        scratch,
        client: reqwest::Client::new(),
    };
    r.write(&format!(
        "{HOST}\n{ops_table}\n{}\n{other_endpoint}",
        endpoint(&old.url, NEW_SECRET)
    ));
    let out = r.reload_cli(&ops);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("changed: events"),
        "{}",
        text(&out.stdout)
    );
    let (status, made) = r.collection(&ops).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = made["id"].as_str().unwrap().to_owned();
    for receiver in [&old, &other] {
        receiver
            .wait_until(Duration::from_secs(10), |got| {
                got.iter().any(|e| e.body["data"]["id"] == id.as_str())
            })
            .await;
    }
    let verified = |receiver: &Receiver| {
        receiver
            .received()
            .into_iter()
            .filter(|e| e.body["data"]["id"] == id.as_str())
            .map(|e| e.verified)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        verified(&old),
        vec![true],
        "the replaced secret still signs"
    );
    assert_eq!(
        verified(&other),
        vec![false],
        "a secret nobody signs with verifies nothing"
    );
}

/// A provider reloaded: new options (its webhook secret rotated) on a new instance, a new
/// library file under a new `sha256` pin for an in-process and an isolated provider (visible in
/// `/v1/providers`), and a provider disabled: it takes no new session but finishes what it has
/// open (a capture of its payment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_reload_with_new_options_a_new_library_and_disabled_keep_their_open_work() {
    let (ops, ops_table) = new_key("ops", "read,payments,operator");
    let scratch = Scratch::new();
    let dir = scratch.dir.path().display().to_string();
    let iso = "[providers.sandbox_iso]\nlibrary = \"payhost_provider_sandbox\"\nisolation = \"process\"\ntimeout_ms = 2000\n[providers.sandbox_iso.options]\nstate_dir = \"{dir}/iso\"\nwebhook_secret = \"whsec_iso\"\n";
    // A provider whose options it refuses: failed at start, it keeps `/ready` false until a
    // reload drops it.
    let broken = "[providers.broken]\nlibrary = \"payhost_provider_sandbox\"\n";
    let first = format!("{HOST}\n{iso}\n{broken}\n{ops_table}").replace("{dir}", &dir);
    let path = scratch.config(&first);
    let r = Running {
        server: Server::start(&path),
        scratch,
        client: reqwest::Client::new(),
    };
    let sha = |providers: &Value, id: &str| {
        providers["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| {
                (
                    p["sha256"].as_str().unwrap_or("").to_owned(),
                    p["health"].as_str().unwrap_or("").to_owned(),
                )
            })
            .unwrap()
    };
    let (_, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
    assert_eq!(ready["providers_failed"], json!(["broken"]), "{ready}");
    let (_, before) = r
        .call(reqwest::Method::GET, "/v1/providers", &ops, None)
        .await;
    let (old_sha, _) = sha(&before, "sandbox");
    // An authorized sandbox payment, to capture once the provider is disabled.
    let pay = |provider: &'static str| {
        let r = &r;
        let ops = ops.clone();
        async move {
            let (status, s) = r
                .call(
                    reqwest::Method::POST,
                    "/v1/payment-sessions",
                    &ops,
                    Some(json!({"provider_id": provider, "amount": 700, "currency_code": "eur"})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{s}");
            let sid = s["id"].as_str().unwrap().to_owned();
            let (status, a) = r
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/payment-sessions/{sid}/authorize"),
                    &ops,
                    Some(json!({})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{a}");
            a["payment"]["id"].as_str().unwrap().to_owned()
        }
    };
    let payment = pay("sandbox").await;

    // A new library file (the same plugin, its bytes changed: a new digest) under a pin, for
    // both; and the sandbox's webhook secret rotated.
    let upgraded = r
        .scratch
        .dir
        .path()
        .join("libpayhost_provider_sandbox_next.so");
    let mut bytes = std::fs::read(payhost_e2e::library("payhost_provider_sandbox")).unwrap();
    bytes.extend_from_slice(b"payhost-reload-test");
    std::fs::write(&upgraded, &bytes).unwrap();
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let pinned = format!("path = \"{}\"\nsha256 = \"{digest}\"", upgraded.display());
    let second = format!("{HOST}\n{iso}\n{ops_table}")
        .replace("library = \"payhost_provider_sandbox\"", &pinned)
        .replace("whsec_test_secret", "whsec_rotated_secret")
        .replace("{dir}", &dir);
    r.write(&second);
    let out = r.reload_cli(&ops);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("providers.sandbox") && said.contains("providers.sandbox_iso"),
        "{said}"
    );
    let (_, after) = r
        .call(reqwest::Method::GET, "/v1/providers", &ops, None)
        .await;
    for id in ["sandbox", "sandbox_iso"] {
        let (now_sha, health) = sha(&after, id);
        assert_eq!(
            (now_sha.as_str(), health.as_str()),
            (digest.as_str(), "loaded"),
            "{id}: {after}"
        );
    }
    assert_ne!(old_sha, digest);
    let (status, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
    assert_eq!(
        (status, &ready["providers_failed"]),
        (StatusCode::OK, &json!([])),
        "a failed provider the file no longer has is no longer failing: {ready}"
    );
    // Both instances work; the rotated secret verifies webhooks, the old one no longer does.
    pay("sandbox").await;
    pay("sandbox_iso").await;
    let hook = |secret: &str| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let body = json!({"id": format!("evt_{secret}"), "type": "ping", "session_id": "ps_none", "created": now}).to_string();
        (
            body.clone(),
            payhost_provider_sandbox::sign(secret, &body, now),
        )
    };
    for (secret, expected) in [("whsec_test_secret", 401), ("whsec_rotated_secret", 200)] {
        let (body, signature) = hook(secret);
        let status = r
            .client
            .post(format!("{}/hooks/sandbox", r.server.base))
            .header("content-type", "application/json")
            .header("sandbox-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), expected, "a webhook signed with {secret}");
    }
    // A pin that does not match refuses the whole reload: nothing changes.
    r.write(&second.replace(&digest, &"0".repeat(64)));
    let (status, answer) = r
        .call(
            reqwest::Method::POST,
            "/v1/admin/reload",
            &ops,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(
        answer["error"]["code"], "config.provider_failed",
        "{answer}"
    );
    pay("sandbox").await;

    // Disabled: no new session; what it has open goes on.
    r.write(&second.replace(
        "[providers.sandbox]\n",
        "[providers.sandbox]\nenabled = false\n",
    ));
    let out = r.reload_cli(&ops);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let (status, refused) = r
        .call(
            reqwest::Method::POST,
            "/v1/payment-sessions",
            &ops,
            Some(json!({"provider_id": "sandbox", "amount": 700, "currency_code": "eur"})),
        )
        .await;
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disabled"),
        "{refused}"
    );
    let (status, captured) = r
        .call(
            reqwest::Method::POST,
            &format!("/v1/payments/{payment}/capture"),
            &ops,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{captured}");
    let (_, listed) = r
        .call(reqwest::Method::GET, "/v1/providers", &ops, None)
        .await;
    assert_eq!(sha(&listed, "sandbox").1, "disabled", "{listed}");
}

/// What the load test's config holds at one reload.
#[derive(Clone)]
struct Shape {
    ops: String,
    steady: String,
    temp: Option<String>,
    endpoint: Option<(String, String)>,
    sandbox_secret: String,
    sandbox_lib: Option<(std::path::PathBuf, String)>,
    iso_lib: Option<(std::path::PathBuf, String)>,
    extra: Option<bool>,
    reconcile_max_checks: Option<u32>,
}

impl Shape {
    fn text(&self, dir: &str) -> String {
        let lib = |l: &Option<(std::path::PathBuf, String)>| match l {
            None => "library = \"payhost_provider_sandbox\"".to_owned(),
            Some((path, sha)) => format!("path = \"{}\"\nsha256 = \"{sha}\"", path.display()),
        };
        let mut t = String::new();
        if let Some(n) = self.reconcile_max_checks {
            t.push_str(&format!("[reconcile]\nmax_checks = {n}\n"));
        }
        t.push_str(&format!(
            "[storage]\nurl = \"sqlite://{dir}/payhost.db\"\n\n[plugins]\ndir = \"{{plugins}}\"\n\n\
             [providers.system]\nlibrary = \"payhost_provider_system\"\n\n\
             [providers.sandbox]\n{}\ntimeout_ms = 2000\nmax_concurrency = 16\n\
             [providers.sandbox.options]\nstate_dir = \"{dir}/state\"\nwebhook_secret = \"{}\"\n\n\
             [providers.sandbox_iso]\n{}\nisolation = \"process\"\ntimeout_ms = 2000\n\
             [providers.sandbox_iso.options]\nstate_dir = \"{dir}/iso\"\nwebhook_secret = \"whsec_iso\"\n\n",
            lib(&self.sandbox_lib),
            self.sandbox_secret,
            lib(&self.iso_lib),
        ));
        if let Some(enabled) = self.extra {
            t.push_str(&format!(
                "[providers.extra]\nlibrary = \"payhost_provider_sandbox\"\nenabled = {enabled}\ntimeout_ms = 2000\n\
                 [providers.extra.options]\nstate_dir = \"{dir}/extra\"\nwebhook_secret = \"whsec_extra\"\n\n"
            ));
        }
        if let Some((url, secret)) = &self.endpoint {
            t.push_str(&endpoint(url, secret));
        }
        t.push_str(&self.ops);
        t.push_str(&self.steady);
        if let Some(temp) = &self.temp {
            t.push_str(temp);
        }
        t
    }
}

/// One request of the load, as the client saw it.
struct Seen {
    ok: bool,
    took: Duration,
    what: String,
}

/// A copy of the sandbox library with `tag` appended: the same plugin as a new file with a new
/// digest (a vendor's fixed release, as far as loading and pinning go).
fn release(dir: &std::path::Path, tag: &str) -> (std::path::PathBuf, String) {
    use sha2::Digest as _;
    let path = dir.join(format!("libpayhost_provider_sandbox_{tag}.so"));
    let mut bytes = std::fs::read(payhost_e2e::library("payhost_provider_sandbox")).unwrap();
    bytes.extend_from_slice(tag.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    (path, hex::encode(sha2::Sha256::digest(&bytes)))
}

/// Twenty reloads of every kind while two clients run payment flows without pause: no request
/// fails but those a change meant to refuse, every money movement payhost recorded is in the
/// processors' ledgers exactly once, no attempt is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_keyed_load_fail_no_request_and_lose_or_double_no_money() {
    let (ops, ops_table) = new_key("ops", "read,payments,operator");
    let (steady, steady_table) = new_key("steady", "read,payments");
    let (temp, temp_table) = new_key("temp", "read");
    let temp_rated = temp_table.replace("scopes", "rate_per_second = 50\nscopes");
    let scratch = Scratch::new();
    let dir = scratch.dir.path().display().to_string();
    let mut shape = Shape {
        ops: ops_table,
        steady: steady_table,
        temp: None,
        endpoint: None,
        sandbox_secret: "whsec_s0".into(),
        sandbox_lib: None,
        iso_lib: None,
        extra: None,
        reconcile_max_checks: None,
    };
    let path = scratch.config(&shape.text(&dir));
    let r = std::sync::Arc::new(Running {
        server: Server::start(&path),
        scratch,
        client: reqwest::Client::new(),
    });
    let receiver = Receiver::start("whsec_endpoint_a").await;

    // The load: two clients, each a loop of collection+session, authorize, capture, refund.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..2 {
        let (r, stop, key) = (r.clone(), stop.clone(), steady.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut payments = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let provider = if (n + c) % 2 == 0 { "sandbox" } else { "sandbox_iso" };
                let mut step = |what: &str, status: StatusCode, body: &Value, took: Duration| {
                    let ok = status.is_success();
                    seen.push(Seen {
                        ok,
                        took,
                        what: format!("{what} on {provider}: {status} {body}"),
                    });
                    ok
                };
                let t = std::time::Instant::now();
                let (status, s) = r
                    .call(
                        reqwest::Method::POST,
                        "/v1/payment-sessions",
                        &key,
                        Some(json!({"provider_id": provider, "amount": 1000 + n, "currency_code": "eur"})),
                    )
                    .await;
                if !step("create", status, &s, t.elapsed()) {
                    continue;
                }
                let sid = s["id"].as_str().unwrap().to_owned();
                let t = std::time::Instant::now();
                let (status, a) = r
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/payment-sessions/{sid}/authorize"),
                        &key,
                        Some(json!({})),
                    )
                    .await;
                if !step("authorize", status, &a, t.elapsed()) {
                    continue;
                }
                let pid = a["payment"]["id"].as_str().unwrap().to_owned();
                payments.push((pid.clone(), sid));
                for (what, path, body) in [
                    ("capture", format!("/v1/payments/{pid}/capture"), json!({})),
                    ("refund", format!("/v1/payments/{pid}/refund"), json!({"amount": 100})),
                ] {
                    let t = std::time::Instant::now();
                    let (status, b) = r.call(reqwest::Method::POST, &path, &key, Some(body)).await;
                    if !step(what, status, &b, t.elapsed()) {
                        break;
                    }
                }
            }
            (seen, payments)
        }));
    }

    let generation = |r: std::sync::Arc<Running>, ops: String| async move {
        let (_, ready) = r.call(reqwest::Method::GET, "/ready", &ops, None).await;
        ready["config_generation"].as_u64().unwrap()
    };
    let sha_of = |providers: &Value, id: &str| {
        providers["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| {
                (
                    p["sha256"].as_str().unwrap_or("").to_owned(),
                    p["health"].as_str().unwrap_or("").to_owned(),
                )
            })
            .unwrap()
    };
    let mut reloads = 0;
    let via_cli = |r: &Running, shape: &Shape| {
        r.write(&shape.text(&dir));
        let out = r.reload_cli(&ops);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    };
    let post = |r: std::sync::Arc<Running>, ops: String| async move {
        r.call(
            reqwest::Method::POST,
            "/v1/admin/reload",
            &ops,
            Some(json!({})),
        )
        .await
    };
    let scratch_dir = r.scratch.dir.path().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1: a key added.
    shape.temp = Some(temp_table.clone());
    via_cli(&r, &shape);
    reloads += 1;
    assert_eq!(
        r.call(reqwest::Method::GET, "/v1/events", &temp, None)
            .await
            .0,
        StatusCode::OK
    );
    // 2: an endpoint added.
    shape.endpoint = Some((receiver.url.clone(), "whsec_endpoint_a".into()));
    via_cli(&r, &shape);
    reloads += 1;
    // 3: a provider secret rotated.
    shape.sandbox_secret = "whsec_s1".into();
    via_cli(&r, &shape);
    reloads += 1;
    // 4: the key removed: refused from its next request on.
    shape.temp = None;
    via_cli(&r, &shape);
    reloads += 1;
    assert_eq!(
        r.call(reqwest::Method::GET, "/v1/events", &temp, None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // 5, 6: a plugin upgrade, in-process and isolated.
    let v2 = release(&scratch_dir, "v2");
    shape.sandbox_lib = Some(v2.clone());
    via_cli(&r, &shape);
    reloads += 1;
    shape.iso_lib = Some(v2.clone());
    via_cli(&r, &shape);
    reloads += 1;
    let (_, listed) = r
        .call(reqwest::Method::GET, "/v1/providers", &ops, None)
        .await;
    for id in ["sandbox", "sandbox_iso"] {
        assert_eq!(
            sha_of(&listed, id),
            (v2.1.clone(), "loaded".to_owned()),
            "{id}: {listed}"
        );
    }
    // 7: an invalid file mid-way changes nothing.
    let before = generation(r.clone(), ops.clone()).await;
    r.write(&format!(
        "{}\n[providers.sandbox.bogus]\n",
        shape.text(&dir)
    ));
    let (status, answer) = post(r.clone(), ops.clone()).await;
    reloads += 1;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(generation(r.clone(), ops.clone()).await, before);
    // 8: a provider added; 9: the endpoint's secret rotated; 10: the provider disabled.
    shape.extra = Some(true);
    via_cli(&r, &shape);
    reloads += 1;
    let (status, s) = r
        .call(
            reqwest::Method::POST,
            "/v1/payment-sessions",
            &ops,
            Some(json!({"provider_id": "extra", "amount": 500, "currency_code": "eur"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{s}");
    shape.endpoint = Some((receiver.url.clone(), "whsec_endpoint_b".into()));
    via_cli(&r, &shape);
    reloads += 1;
    shape.extra = Some(false);
    via_cli(&r, &shape);
    reloads += 1;
    let (status, refused) = r
        .call(
            reqwest::Method::POST,
            "/v1/payment-sessions",
            &ops,
            Some(json!({"provider_id": "extra", "amount": 500, "currency_code": "eur"})),
        )
        .await;
    assert!(
        !status.is_success(),
        "a disabled provider takes no session: {refused}"
    );
    // 11: a setting only a restart applies: refused, nothing applied.
    shape.reconcile_max_checks = Some(9);
    r.write(&shape.text(&dir));
    let (status, answer) = post(r.clone(), ops.clone()).await;
    reloads += 1;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    shape.reconcile_max_checks = None;
    // 12: the key back, with a rate; 13: the provider secret again; 14: the endpoint removed.
    shape.temp = Some(temp_rated.clone());
    via_cli(&r, &shape);
    reloads += 1;
    assert_eq!(
        r.call(reqwest::Method::GET, "/v1/events", &temp, None)
            .await
            .0,
        StatusCode::OK
    );
    shape.sandbox_secret = "whsec_s2".into();
    via_cli(&r, &shape);
    reloads += 1;
    shape.endpoint = None;
    via_cli(&r, &shape);
    reloads += 1;
    // 15, 16: another release of both.
    let v3 = release(&scratch_dir, "v3");
    shape.sandbox_lib = Some(v3.clone());
    via_cli(&r, &shape);
    reloads += 1;
    shape.iso_lib = Some(v3.clone());
    via_cli(&r, &shape);
    reloads += 1;
    // 17: the disabled provider enabled again; 18: an endpoint again; 19: the key removed.
    shape.extra = Some(true);
    via_cli(&r, &shape);
    reloads += 1;
    shape.endpoint = Some((receiver.url.clone(), "whsec_endpoint_a".into()));
    via_cli(&r, &shape);
    reloads += 1;
    shape.temp = None;
    via_cli(&r, &shape);
    reloads += 1;
    // 20: SIGHUP, with the provider secret rotated once more.
    shape.sandbox_secret = "whsec_s3".into();
    r.write(&shape.text(&dir));
    let before = generation(r.clone(), ops.clone()).await;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &r.server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    reloads += 1;
    let started = std::time::Instant::now();
    while generation(r.clone(), ops.clone()).await == before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGHUP applied nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reloads, 20);
    let (_, listed) = r
        .call(reqwest::Method::GET, "/v1/providers", &ops, None)
        .await;
    for id in ["sandbox", "sandbox_iso"] {
        assert_eq!(
            sha_of(&listed, id),
            (v3.1.clone(), "loaded".to_owned()),
            "{id}: {listed}"
        );
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut seen = Vec::new();
    let mut payments = Vec::new();
    for c in clients {
        let (s, p) = c.await.unwrap();
        seen.extend(s);
        payments.extend(p);
    }
    let failed: Vec<&Seen> = seen.iter().filter(|s| !s.ok).collect();
    let longest = seen.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "reload under load: {} reloads, {} requests served, {} failed, longest request {:?}, {} payments",
        reloads,
        seen.len(),
        failed.len(),
        longest,
        payments.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed: {:?}",
        failed.iter().map(|s| &s.what).collect::<Vec<_>>()
    );
    assert!(
        payments.len() >= 10,
        "the load ran: {} payments",
        payments.len()
    );

    // No attempt open, and the processors' ledgers agree with payhost's books.
    let (status, open) = r
        .call(reqwest::Method::GET, "/v1/attempts", &ops, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{open}");
    assert_eq!(open["attempts"].as_array().map(Vec::len), Some(0), "{open}");
    let mut ledger: Vec<Value> = Vec::new();
    for sub in ["state", "iso"] {
        for entry in std::fs::read_dir(scratch_dir.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(".ledger.jsonl") {
                for line in std::fs::read_to_string(&path).unwrap().lines() {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        ledger.push(v);
                    }
                }
            }
        }
    }
    for (pid, sid) in &payments {
        let (_, p) = r
            .call(
                reqwest::Method::GET,
                &format!("/v1/payments/{pid}"),
                &ops,
                None,
            )
            .await;
        let sum = |op: &str| -> (usize, i64) {
            let hits: Vec<&Value> = ledger
                .iter()
                .filter(|e| {
                    e["session_id"] == sid.as_str()
                        && e["op"] == op
                        && e["response"]["outcome"]["status"] == "processed"
                })
                .collect();
            (
                hits.len(),
                hits.iter().map(|e| e["amount"].as_i64().unwrap_or(0)).sum(),
            )
        };
        let (authorized, _) = sum("authorize");
        assert_eq!(
            authorized, 1,
            "payment {pid}: authorized once at its processor"
        );
        let captured: i64 = p["captures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["amount"].as_i64().unwrap())
            .sum();
        let refunded: i64 = p["refunds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["amount"].as_i64().unwrap())
            .sum();
        assert_eq!(
            sum("capture").1,
            captured,
            "payment {pid}: captures agree: {p}"
        );
        assert_eq!(
            sum("refund").1,
            refunded,
            "payment {pid}: refunds agree: {p}"
        );
    }
}

/// A request runs on the generation it pinned: a swap meanwhile is seen by the next request,
/// never half-way through this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_keeps_the_generation_it_pinned_across_a_swap() {
    let s = Scratch::new();
    let host = s.host(HOST).await;
    let (pinned, ()) = host.pin(|| ());
    host.swapping(|| {
        host.swap_providers(payhost::Providers::default());
        host.swap_event_settings(payhost::events::EventSettings::default());
    });
    payhost::Host::with_pinned(pinned, async {
        assert!(
            host.providers().get("sandbox").is_some(),
            "the pinned providers"
        );
    })
    .await;
    assert!(
        host.providers().get("sandbox").is_none(),
        "the swapped ones after it"
    );
}

/// A reload asked from inside a request (which pinned the generation it was admitted with)
/// starts from the current generation: a provider instance another reload replaced meanwhile
/// never comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_from_a_pinned_request_builds_on_the_current_generation() {
    let s = Scratch::new();
    let host = s.host(HOST).await;
    let config = payhost::Config::from_file(s.config_path()).unwrap();
    let state = payhost::http::AppState::new(host.clone(), vec![]).reloading(config);
    let reloader = state.reloader().unwrap();
    let (pinned, ()) = host.pin(|| ());
    // Another reload replaces the sandbox (its timeout changed).
    let text = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(
        s.config_path(),
        text.replace("timeout_ms = 400", "timeout_ms = 450"),
    )
    .unwrap();
    reloader.reload().await.unwrap();
    let replaced = host.providers().get("sandbox").unwrap().clone();
    assert_eq!(replaced.timeout(), Duration::from_millis(450));
    // Then, from inside the old request, a reload that adds a provider.
    let text = std::fs::read_to_string(s.config_path()).unwrap();
    std::fs::write(
        s.config_path(),
        format!("{text}\n[providers.system2]\nlibrary = \"payhost_provider_system\"\n"),
    )
    .unwrap();
    let report = payhost::Host::with_pinned(pinned, reloader.reload())
        .await
        .unwrap();
    assert_eq!(report.changed, vec!["providers.system2".to_owned()]);
    let now = host.providers();
    assert!(
        std::sync::Arc::ptr_eq(now.get("sandbox").unwrap(), &replaced),
        "the sandbox is the instance the other reload made, not the pinned one"
    );
}
