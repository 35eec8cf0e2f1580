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
    let first = format!("{HOST}\n{iso}\n{ops_table}").replace("{dir}", &dir);
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
