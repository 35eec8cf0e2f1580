//! API keys, scopes, the two listeners, the safe default and TLS, over real HTTP against a
//! spawned `payhost serve`.

use std::time::Duration;

use payhost_e2e::{HOST, Scratch, Server, payhost, text};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A key made by `payhost keys new`: (secret, its `[[api_keys]]` table).
fn new_key(id: &str, scopes: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["keys", "new", "--id", id, "--scope", scopes];
    args.extend_from_slice(extra);
    let out = payhost(&args, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let secret = stdout.lines().next().unwrap().to_owned();
    assert!(secret.starts_with(&format!("phk_{id}_")), "{stdout}");
    let table: String = stdout
        .lines()
        .skip_while(|l| !l.starts_with("[[api_keys]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        !table.contains(&secret),
        "the config table never holds the key"
    );
    (secret, table)
}

struct Keyed {
    server: Server,
    scratch: Scratch,
    client: reqwest::Client,
    /// Where the API is mounted: `""` on `payhost serve`, `/payments` in the embedder's server.
    prefix: &'static str,
    /// One key per scope, and one with all three.
    read: String,
    payments: String,
    operator: String,
    all: String,
    log: std::path::PathBuf,
}

impl Keyed {
    fn start(extra_config: &str) -> Keyed {
        Keyed::start_in(extra_config, false)
    }

    /// The API nested under `/payments` in `examples/embed`'s own axum server, with the keys.
    fn start_embedded() -> Keyed {
        Keyed::start_in("", true)
    }

    fn start_in(extra_config: &str, embedded: bool) -> Keyed {
        let (read, t1) = new_key("reader", "read", &[]);
        let (payments, t2) = new_key("shop", "payments", &[]);
        let (operator, t3) = new_key("ops", "operator", &[]);
        let (all, t4) = new_key("all", "read,payments,operator", &[]);
        let scratch = Scratch::new();
        let text = format!("{extra_config}\n{HOST}\n{t1}{t2}{t3}{t4}")
            .replace("{dir}", &scratch.dir.path().display().to_string());
        let config = scratch.config(&text);
        let log = scratch.dir.path().join("server.log");
        let server = if embedded {
            Server::start_program(
                &payhost_e2e::artifacts().join("embed"),
                &["--config", config.to_str().unwrap()],
            )
        } else {
            Server::start_logging(&config, &log)
        };
        Keyed {
            server,
            scratch,
            client: reqwest::Client::new(),
            prefix: if embedded { "/payments" } else { "" },
            read,
            payments,
            operator,
            all,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{path}", self.server.base, self.prefix)
    }

    async fn send(
        &self,
        r: reqwest::RequestBuilder,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let r = r.send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn scope_of(op: &Value) -> Option<String> {
    op["security"].as_array()?.iter().find_map(|req| {
        req["api_key"]
            .as_array()
            .and_then(|scopes| scopes.first())
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_refuses_a_missing_key_and_a_key_without_its_scope() {
    every_operation_needs_its_scope(&Keyed::start("")).await;
}

/// Nesting is how an embedder mounts the API: under any prefix, each route still carries its
/// own rule (a route template that no longer matches a table can never leave a route open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_an_embedders_prefix_every_operation_still_needs_its_scope() {
    let k = Keyed::start_embedded();
    every_operation_needs_its_scope(&k).await;
    // The hole this closes: a collection created with no key under the prefix.
    let (status, _, body) = k
        .send(
            k.client
                .post(k.url("/v1/payment-collections"))
                .json(&json!({"amount": 100, "currency_code": "eur"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, body) = k
        .send(
            k.client
                .post(k.url("/v1/payments/pay_1/capture"))
                .bearer_auth(&k.read)
                .json(&json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

async fn every_operation_needs_its_scope(k: &Keyed) {
    let doc: Value = k
        .client
        .get(k.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"], "bearer",
        "{}",
        doc["components"]
    );
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let url = k.url(
                &path
                    .replace("{id}", "x_1")
                    .replace("{provider_id}", "sandbox"),
            );
            let request = |key: Option<&str>| {
                let mut r = k
                    .client
                    .request(method.to_uppercase().parse().unwrap(), &url)
                    .header("content-type", "application/json")
                    .body("{}");
                if let Some(key) = key {
                    r = r.bearer_auth(key);
                }
                r
            };
            let Some(scope) = scope_of(op) else {
                // Open: /health, /openapi.json and the webhooks (whose signature is the key).
                assert!(
                    ["/health", "/openapi.json", "/hooks/{provider_id}"].contains(&path.as_str()),
                    "{method} {path} declares no scope"
                );
                continue;
            };
            let (status, headers, body) = k.send(request(None)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
            assert!(
                headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer")
            );
            assert_eq!(body["error"]["code"], "api_key_missing");
            let (wrong, right) = match scope.as_str() {
                "read" => (&k.payments, &k.read),
                "payments" => (&k.read, &k.payments),
                "operator" => (&k.payments, &k.operator),
                other => panic!("unknown scope {other}"),
            };
            let (status, _, body) = k.send(request(Some(wrong))).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert!(
                body["error"]["message"].as_str().unwrap().contains(&scope),
                "names the scope: {body}"
            );
            let (status, _, body) = k.send(request(Some(right))).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{method} {path} with its scope: {status} {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 17, "only {checked} operations checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_clearly_and_no_secret_is_ever_shown() {
    let k = Keyed::start("");
    let url = k.url("/v1/payment-collections");
    let body = json!({"amount": 100, "currency_code": "eur"});
    let mut almost = k.payments.clone();
    almost.pop();
    almost.push(if k.payments.ends_with('0') { '1' } else { '0' });
    for (auth, code) in [
        ("Bearer".to_owned(), "authorization_malformed"),
        ("Bearer ".to_owned(), "authorization_malformed"),
        ("Basic dXNlcjpwYXNz".to_owned(), "authorization_malformed"),
        (k.payments.clone(), "authorization_malformed"),
        (format!("Bearer {almost}"), "api_key_invalid"),
        (
            "Bearer phk_nobody_0123456789abcdef".to_owned(),
            "api_key_invalid",
        ),
        (
            format!("Bearer {}", "x".repeat(5000)),
            "authorization_malformed",
        ),
    ] {
        let (status, _, e) = k
            .send(
                k.client
                    .post(&url)
                    .header("authorization", &auth)
                    .json(&body),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:.40}: {e}");
        assert_eq!(e["error"]["code"], code, "{e}");
        assert!(!e.to_string().contains(&almost[10..]), "{e}");
    }
    // A header past the server's limits.
    let (status, _, _) = k
        .send(
            k.client
                .post(&url)
                .header("authorization", format!("Bearer {}", "y".repeat(200_000)))
                .json(&body),
        )
        .await;
    assert!(status.is_client_error(), "{status}");
    // A key in the URL is refused, with or without a header.
    let (status, _, e) = k
        .send(
            k.client
                .get(k.url(&format!(
                    "/v1/payment-sessions?cart_id=c&api_key={}",
                    k.read
                )))
                .bearer_auth(&k.read),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"]["code"], "api_key_in_url");
    // Nothing changed.
    let (status, _, _) = k
        .send(
            k.client
                .get(k.url("/v1/payment-sessions?cart_id=c"))
                .bearer_auth(&k.read),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, metrics) = k
        .send(k.client.get(k.url("/metrics")).bearer_auth(&k.operator))
        .await;
    let metrics = metrics.as_str().unwrap().to_owned();
    let check = payhost(
        &[
            "check",
            "--config",
            k.scratch.dir.path().join("payhost.toml").to_str().unwrap(),
        ],
        &[],
    );
    let check = format!("{}{}", text(&check.stdout), text(&check.stderr));
    assert!(check.contains("key shop scopes payments"), "{check}");
    // The log holds the refusals (so it is written and read), and no key.
    let started = std::time::Instant::now();
    let logs = loop {
        let logs = std::fs::read_to_string(&k.log).unwrap();
        if logs.contains("authentication failed") && logs.contains("api_key_invalid") {
            break logs;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the refusals are logged: {logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for secret in [&k.read, &k.payments, &k.operator, &k.all] {
        let random = &secret[secret.rfind('_').unwrap() + 1..];
        for (what, haystack) in [("log", &logs), ("metrics", &metrics), ("check", &check)] {
            assert!(!haystack.contains(random), "a key is in the {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_belong_to_their_api_key() {
    let (shop, t1) = new_key("shop", "payments,read", &[]);
    let (rival, t2) = new_key("rival", "payments,read", &[]);
    let scratch = Scratch::new();
    let config = scratch.config(
        &format!("{HOST}\n{t1}{t2}").replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let server = Server::start(&config);
    let client = reqwest::Client::new();
    let create = |key: &str, amount: i64| {
        client
            .post(format!("{}/v1/payment-collections", server.base))
            .bearer_auth(key)
            .header("Idempotency-Key", "order-1001")
            .json(&json!({"amount": amount, "currency_code": "eur"}))
            .send()
    };
    let first = create(&shop, 1000).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let mine: Value = first.json().await.unwrap();
    assert!(
        mine["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("paycol_")),
        "{mine}"
    );
    // The rival guesses the key: it neither sees the shop's answer nor blocks it.
    let r = create(&rival, 1000).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let theirs: Value = r.json().await.unwrap();
    assert_ne!(
        mine["id"], theirs["id"],
        "a replay of another client's request"
    );
    let replayed = create(&shop, 1000).await.unwrap();
    assert_eq!(
        replayed.status(),
        StatusCode::CREATED,
        "a replay answers as the first did"
    );
    let again: Value = replayed.json().await.unwrap();
    assert_eq!(again["id"], mine["id"], "the shop's own retry replays");
    let other_body = create(&rival, 5).await.unwrap();
    assert_eq!(other_body.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_operations_and_resolutions_record_the_key_that_asked() {
    let k = Keyed::start("[reconcile]\nlanding_margin_ms = 0\nmax_checks = 1\n");
    let post = |path: &str, key: &str, body: Value| {
        k.client.post(k.url(path)).bearer_auth(key).json(&body)
    };
    let (_, _, col) = k
        .send(post(
            "/v1/payment-collections",
            &k.payments,
            json!({"amount": 800, "currency_code": "eur"}),
        ))
        .await;
    let (_, _, s) = k
        .send(post(
            "/v1/payment-sessions",
            &k.payments,
            // The answer is lost and the processor cannot be asked in time: only an operator
            // can settle it, so the resolution below always happens.
            json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": {"card_number": "4000000000000119", "sandbox": {"retrieve": {"delay_ms": 60000}}}}),
        ))
        .await;
    let sid = s["id"].as_str().unwrap();
    let (status, _, _) = k
        .send(post(
            &format!("/v1/payment-sessions/{sid}/authorize"),
            &k.payments,
            json!({}),
        ))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let (_, _, list) = k
        .send(k.client.get(k.url("/v1/attempts")).bearer_auth(&k.operator))
        .await;
    let attempt = &list["attempts"][0];
    assert_eq!(attempt["requested_by"], "shop", "{attempt}");
    let id = attempt["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The operator is the key, never a name the body claims.
    let (status, _, e) = k
        .send(post(
            &format!("/v1/attempts/{id}/resolve"),
            &k.operator,
            json!({"as": "succeeded", "note": "seen in the dashboard", "by": "someone else"}),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    // Refused while the call may still land (409), then resolved, by the key that asked.
    let started = std::time::Instant::now();
    let resolved = loop {
        let (status, _, resolved) = k
            .send(post(
                &format!("/v1/attempts/{id}/resolve"),
                &k.operator,
                json!({"as": "succeeded", "note": "seen in the dashboard"}),
            ))
            .await;
        if status == StatusCode::OK {
            break resolved;
        }
        assert_eq!(status, StatusCode::CONFLICT, "{resolved}");
        assert!(started.elapsed() < Duration::from_secs(20), "{resolved}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(resolved["resolution"]["by"], "key:ops", "{resolved}");
    let logs = std::fs::read_to_string(&k.log).unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains("key=shop") && l.contains("/v1/payment-collections")),
        "every mutating request is logged with its key id: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_rate_gets_429_while_another_key_is_served() {
    let (slow, t1) = new_key("slow", "read", &["--rate-per-second", "2"]);
    let (fast, t2) = new_key("fast", "read", &[]);
    let scratch = Scratch::new();
    let config = scratch.config(
        &format!("{HOST}\n{t1}{t2}").replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let server = Server::start(&config);
    let client = reqwest::Client::new();
    let get = |key: &str| {
        client
            .get(format!("{}/v1/payment-sessions?cart_id=c", server.base))
            .bearer_auth(key)
            .send()
    };
    let mut limited = None;
    for _ in 0..10 {
        let r = get(&slow).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the slow key is limited within 10 requests (burst 4)");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    for _ in 0..20 {
        assert_eq!(get(&fast).await.unwrap().status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(&slow).await.unwrap().status(),
        StatusCode::OK,
        "refilled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_serve_stays_on_loopback_unless_told_otherwise() {
    let scratch = Scratch::new();
    let config = scratch.config(&HOST.replace("{dir}", &scratch.dir.path().display().to_string()));
    let out = std::process::Command::new(payhost_e2e::payhost_bin())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("without API keys") && err.contains("auth = \"none\""),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Told otherwise: it serves.
    let open = scratch.config(
        &format!("[server]\nauth = \"none\"\n{HOST}")
            .replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let mut child = std::process::Command::new(payhost_e2e::payhost_bin())
        .args([
            "serve",
            "--config",
            open.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let line = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    assert!(line.starts_with("listening on http://0.0.0.0:"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_takes_operations_off_the_public_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let k = Keyed::start(&format!("[server]\nadmin_listen = \"127.0.0.1:{port}\"\n"));
    let admin = format!("http://127.0.0.1:{port}");
    for path in ["/ready", "/metrics", "/v1/attempts", "/v1/providers"] {
        let r = k
            .client
            .get(k.url(path))
            .bearer_auth(&k.all)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "{path} on the public port"
        );
    }
    // Probes and scrapes need no key on the admin listener; operator routes do. (Ready once
    // start-up reconciliation is done, which a busy machine may take a moment for.)
    let started = std::time::Instant::now();
    while k
        .client
        .get(format!("{admin}/ready"))
        .send()
        .await
        .unwrap()
        .status()
        == StatusCode::SERVICE_UNAVAILABLE
        && started.elapsed() < std::time::Duration::from_secs(10)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for path in ["/health", "/ready", "/metrics"] {
        let r = k.client.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path} on the admin listener");
    }
    let r = k
        .client
        .get(format!("{admin}/v1/attempts"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = k
        .client
        .get(format!("{admin}/v1/attempts"))
        .bearer_auth(&k.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The API stays on the public port; webhooks need no key.
    let r = k
        .client
        .get(k.url("/v1/payment-sessions?cart_id=c"))
        .bearer_auth(&k.read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = k
        .client
        .post(k.url("/hooks/sandbox"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a webhook without a signature"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unverified", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_and_a_certificate_that_does_not_load_is_named() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let config = scratch.config(
        &format!("[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n{HOST}")
            .replace("{dir}", &dir.display().to_string()),
    );
    let server = Server::start(&config);
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let port = server.base.rsplit(':').next().unwrap();
    let r = client
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "no plain HTTP on a TLS port"
    );
    drop(server);

    std::fs::write(dir.join("broken.pem"), "not a certificate").unwrap();
    let broken = scratch.config(
        &format!("[server.tls]\ncert = \"broken.pem\"\nkey = \"key.pem\"\n{HOST}")
            .replace("{dir}", &dir.display().to_string()),
    );
    let out = std::process::Command::new(payhost_e2e::payhost_bin())
        .args([
            "serve",
            "--config",
            broken.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("broken.pem") && err.contains("tls.invalid"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_webhook_paths_and_methods_do_not_grow_the_metrics() {
    let k = Keyed::start("");
    for i in 0..30 {
        let _ = k
            .client
            .post(k.url(&format!("/hooks/nope{i}")))
            .body("{}")
            .send()
            .await;
        let _ = k
            .client
            .request(
                reqwest::Method::from_bytes(format!("BREW{i}").as_bytes()).unwrap(),
                k.url("/health"),
            )
            .send()
            .await;
    }
    let metrics = k
        .client
        .get(k.url("/metrics"))
        .bearer_auth(&k.operator)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("nope"), "{metrics}");
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_password_never_reaches_the_log() {
    let Some(url) = payhost_e2e::fresh_postgres_database().await else {
        return;
    };
    let with_password = url.replacen("://root@", "://root:hunter2-secret@", 1);
    assert_ne!(with_password, url, "the test URL names its user");
    let scratch = Scratch::new();
    let config = scratch.config(&HOST.replace(
        "url = \"sqlite://{dir}/payhost.db\"",
        &format!("url = \"{with_password}\""),
    ));
    let log = scratch.dir.path().join("server.log");
    let server = Server::start_logging(&config, &log);
    let mut ready = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        ready = reqwest::get(format!("{}/ready", server.base))
            .await
            .unwrap()
            .status();
        if ready == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, StatusCode::OK);
    drop(server);
    let check = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("root:***@"), "{logs}");
    for haystack in [logs, text(&check.stdout), text(&check.stderr)] {
        assert!(!haystack.contains("hunter2"), "{haystack}");
    }
    payhost_e2e::drop_postgres_database(&url);
}

#[test]
fn check_fails_on_a_placeholder_webhook_secret_naming_the_key() {
    let scratch = Scratch::new();
    let config = scratch.config(
        "[plugins]\ndir = \"{plugins}\"\n\n[providers.stripe]\nlibrary = \"payhost_provider_stripe\"\n\n[providers.stripe.options]\napi_key = \"sk_test_real\"\nwebhook_secret = \"${STRIPE_WEBHOOK_SECRET:-whsec_replace_me}\"\n",
    );
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let report = text(&out.stdout);
    assert!(
        report.contains("webhook_secret is a placeholder")
            && report.contains("providers.stripe.options.webhook_secret")
            && report.contains("payhost.toml:9"),
        "{report}"
    );
    // The example config keeps working: Stripe is disabled there.
    let example = payhost_e2e::workspace().join("config/payhost.toml");
    let out = payhost(&["check", "--config", example.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One raw HTTP/1.1 request on its own connection; the status and the body.
fn raw(base: &str, head: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The admin listener follows the same rule as the API's: without keys, never on a network
/// address (it serves resolve and redeliver, which can free a payment for a second capture).
/// `check` says what each listener exposes and fails where `serve` would refuse.
#[test]
fn a_keyless_admin_listener_on_a_network_is_refused_and_check_says_what_is_open() {
    let scratch = Scratch::new();
    let port = free_port();
    let config = scratch.config(
        &format!("[server]\nadmin_listen = \"0.0.0.0:{port}\"\n{HOST}")
            .replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let out = payhost(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("auth.required") && err.contains(&format!("0.0.0.0:{port} (admin)")),
        "{err}"
    );
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{report}");
    assert!(
        report.contains("ERROR   serve refuses these listeners [auth.required]"),
        "{report}"
    );
    // A loopback pair: check shows each listener, what it serves and who may call it.
    let local = scratch.config(
        &format!("[server]\nadmin_listen = \"127.0.0.1:{port}\"\n{HOST}")
            .replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let out = payhost(
        &["check", "--config", local.to_str().unwrap(), "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listeners = report["server"]["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 2, "{report}");
    assert_eq!(listeners[1]["name"], "admin");
    assert_eq!(listeners[1]["network"], false);
    assert!(
        listeners[1]["serves"]
            .as_str()
            .unwrap()
            .contains("operator routes"),
        "{report}"
    );
}

/// With `[server.tls]`, the admin listener serves TLS too: operator keys never cross in clear
/// text, unless the operator says so. On a network address without any TLS, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_tls_and_never_carries_operator_keys_in_clear() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let (operator, table) = new_key("ops", "operator", &[]);
    let port = free_port();
    let config = scratch.config(
        &format!(
            "[server]\nadmin_listen = \"127.0.0.1:{port}\"\n[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n{HOST}\n{table}"
        )
        .replace("{dir}", &dir.display().to_string()),
    );
    let _server = Server::start(&config);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = client
        .get(format!("https://localhost:{port}/v1/attempts"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the admin listener speaks TLS");
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/attempts"))
        .bearer_auth(&operator)
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "no plain HTTP on the admin listener"
    );
    // No TLS at all and a network address: refused, unless `admin_plaintext = true`.
    let bare = scratch.config(
        &format!("[server]\nadmin_listen = \"0.0.0.0:{port}\"\n{HOST}\n{table}")
            .replace("{dir}", &dir.display().to_string()),
    );
    let out = payhost(&["serve", "--config", bare.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("tls.admin_plaintext"),
        "{}",
        text(&out.stderr)
    );
}

/// The default config runs without keys on loopback, where a web page in the operator's own
/// browser is the neighbour: it can send CORS-simple requests (no preflight: form types, no
/// body) and can rebind its own name to 127.0.0.1. None of that may reach the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_a_keyless_server() {
    let scratch = Scratch::new();
    let config = scratch.config(&HOST.replace("{dir}", &scratch.dir.path().display().to_string()));
    let server = Server::start(&config);
    let base = server.base.clone();
    let host = base.strip_prefix("http://").unwrap().to_owned();
    let client = reqwest::Client::new();
    // A "simple" content type that merely mentions JSON.
    let (status, body) = raw(
        &base,
        &format!(
            "POST /v1/payment-collections HTTP/1.1\r\nhost: {host}\r\ncontent-type: text/plain; x=+json"
        ),
        r#"{"amount": 100, "currency_code": "eur"}"#,
    );
    assert_eq!(status, 415, "{body}");
    // An authorized payment, then POSTs with no body and no content type.
    let col: Value = client
        .post(format!("{base}/v1/payment-collections"))
        .json(&json!({"amount": 1000, "currency_code": "eur"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s: Value = client
        .post(format!("{base}/v1/payment-sessions"))
        .json(&json!({"payment_collection_id": col["id"], "provider_id": "system"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (status, body) = raw(
        &base,
        &format!(
            "POST /v1/payment-sessions/{}/authorize HTTP/1.1\r\nhost: {host}",
            s["id"].as_str().unwrap()
        ),
        "",
    );
    assert_eq!(status, 415, "authorize without a type: {body}");
    let authorized: Value = client
        .post(format!(
            "{base}/v1/payment-sessions/{}/authorize",
            s["id"].as_str().unwrap()
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pay = authorized["payment"]["id"].as_str().unwrap().to_owned();
    for action in ["capture", "refund", "cancel"] {
        let (status, body) = raw(
            &base,
            &format!("POST /v1/payments/{pay}/{action} HTTP/1.1\r\nhost: {host}"),
            "",
        );
        assert_eq!(status, 415, "{action} without a body or a type: {body}");
        let (status, body) = raw(
            &base,
            &format!(
                "POST /v1/payments/{pay}/{action} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/x-www-form-urlencoded"
            ),
            "amount=1000",
        );
        assert_eq!(status, 415, "{action} as a form: {body}");
    }
    let payment: Value = client
        .get(format!("{base}/v1/payments/{pay}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(payment["captured_amount"], 0, "{payment}");
    assert_eq!(payment["status"], "authorized", "{payment}");
    // DNS rebinding: the page's own name in `Host`.
    for path in [
        format!("GET /v1/payments/{pay}"),
        "GET /v1/attempts".to_owned(),
        "GET /metrics".to_owned(),
    ] {
        let (status, body) = raw(
            &base,
            &format!(
                "{path} HTTP/1.1\r\nhost: attacker.example:{}",
                host.rsplit(':').next().unwrap()
            ),
            "",
        );
        assert_eq!(status, 421, "{path}: {body}");
        assert!(body.contains("host_not_allowed"), "{body}");
    }
    let (status, body) = raw(
        &base,
        &format!(
            "POST /v1/payments/{pay}/capture HTTP/1.1\r\nhost: attacker.example\r\ncontent-type: application/json"
        ),
        "{}",
    );
    assert_eq!(status, 421, "{body}");
    // Loopback names are served; health and webhooks do not depend on the name.
    for name in ["localhost", "127.0.0.1", "[::1]"] {
        let (status, body) = raw(
            &base,
            &format!("GET /v1/payments/{pay} HTTP/1.1\r\nhost: {name}"),
            "",
        );
        assert_eq!(status, 200, "{name}: {body}");
    }
    let (status, _) = raw(&base, "GET /health HTTP/1.1\r\nhost: payhost.example", "");
    assert_eq!(status, 200);
}

/// Failed authentications carry the client's address; every mutating request's line carries
/// the address and the key; a keyless resolution is recorded as unproven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_changes_are_logged_with_the_client_address_and_the_key() {
    let k = Keyed::start("");
    let (status, _, _) = k
        .send(
            k.client
                .post(k.url("/v1/payment-collections"))
                .bearer_auth("phk_nobody_0123456789abcdef")
                .json(&json!({"amount": 100, "currency_code": "eur"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = k
        .send(
            k.client
                .post(k.url("/v1/payment-collections"))
                .bearer_auth(&k.payments)
                .json(&json!({"amount": 100, "currency_code": "eur"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = k
        .send(
            k.client
                .post(k.url("/v1/event-deliveries/all/redeliver"))
                .bearer_auth(&k.operator)
                .json(&json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = std::fs::read_to_string(&k.log).unwrap();
    assert!(
        logs.lines().any(|l| l.contains("authentication failed")
            && l.contains("peer=127.0.0.1:")
            && l.contains("api_key_invalid")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("peer=127.0.0.1:")
            && l.contains("key=shop")
            && l.contains("/v1/payment-collections")
            && l.contains("status=201")),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("key=ops") && l.contains("/redeliver")),
        "{logs}"
    );
    assert!(
        !logs.contains("phk_nobody"),
        "a presented key is never logged"
    );
}

/// Without keys, whoever resolves an attempt or redelivers over HTTP only *says* who they
/// are: that is what is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_an_operators_name_is_recorded_as_unproven() {
    let scratch = Scratch::new();
    let config = scratch.config(
        &format!("[reconcile]\nlanding_margin_ms = 0\nmax_checks = 1\n{HOST}")
            .replace("{dir}", &scratch.dir.path().display().to_string()),
    );
    let server = Server::start(&config);
    let client = reqwest::Client::new();
    let base = &server.base;
    let col: Value = client
        .post(format!("{base}/v1/payment-collections"))
        .json(&json!({"amount": 800, "currency_code": "eur"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s: Value = client
        .post(format!("{base}/v1/payment-sessions"))
        // The answer is lost, and the processor cannot be asked in time: only an operator can
        // settle it.
        .json(&json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": {"card_number": "4000000000000119", "sandbox": {"retrieve": {"delay_ms": 60000}}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = client
        .post(format!(
            "{base}/v1/payment-sessions/{}/authorize",
            s["id"].as_str().unwrap()
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let list: Value = client
        .get(format!("{base}/v1/attempts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = list["attempts"][0]["id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    loop {
        let r = client
            .post(format!("{base}/v1/attempts/{id}/resolve"))
            .json(&json!({"as": "failed", "note": "not in the dashboard", "by": "alice"}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        if status == StatusCode::OK {
            assert_eq!(body["resolution"]["by"], "unauthenticated:alice", "{body}");
            break;
        }
        // Refused while the call may still land: wait for its horizon.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = client
        .post(format!("{base}/v1/event-deliveries/all/redeliver"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "say who asks");
}
