//! The HTTP service the host lends providers, exercised across the real plugin boundary (the
//! sandbox's `x.http`): answers come back, a request that never left is `not_sent`, one whose
//! answer is lost (a server that never answers, a 5xx) is `unknown`, always within the deadline.

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use payhost_e2e::{BOTH, Scratch};
use serde_json::{Value, json};

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

fn request(url: &str, deadline_in_ms: i64) -> Value {
    let now = payhost::Clock::now_unix_ms(&payhost::SystemClock);
    json!({
        "method": "POST",
        "url": url,
        "headers": [["authorization", "Bearer sk_test_secret"], ["x-trace", "t1"]],
        "body": "amount=100",
        "deadline_unix_ms": now + deadline_in_ms,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_reach_servers_through_the_host_with_the_failure_modes_kept_apart() {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(|| Capture)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber here");
    let s = Scratch::new();
    let (_config, report) = s.load(BOTH);
    let sandbox = report.providers.get("sandbox").unwrap();

    let echo = serve(Router::new().route(
        "/v1/charges",
        post(|headers: HeaderMap, body: String| async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (
                StatusCode::CREATED,
                [("x-request-id", "req_1")],
                format!("{auth}|{body}"),
            )
        }),
    ))
    .await;
    let answer = sandbox
        .call_custom("http", request(&format!("{echo}/v1/charges?x=1"), 2000))
        .await
        .unwrap();
    assert_eq!(answer["ok"]["status"], 201, "{answer}");
    assert_eq!(answer["ok"]["body"], "Bearer sk_test_secret|amount=100");
    let headers = answer["ok"]["headers"].as_array().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "x-request-id" && h[1] == "req_1")
    );

    // A closed port: nothing was sent.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let answer = sandbox
        .call_custom(
            "http",
            request(&format!("http://{closed}/v1/charges"), 2000),
        )
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "not_sent", "{answer}");

    // A server that accepts and never answers: unknown, promptly at the deadline.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_at = hanging.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
        }
    });
    let started = Instant::now();
    let answer = sandbox
        .call_custom(
            "http",
            request(&format!("http://{hanging_at}/v1/charges"), 400),
        )
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "unknown", "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(400 + 500),
        "{:?}",
        started.elapsed()
    );

    // A 5xx: the processor may have acted; unknown, with the status.
    let failing = serve(Router::new().route(
        "/v1/charges",
        post(|| async { (StatusCode::BAD_GATEWAY, "upstream") }),
    ))
    .await;
    let answer = sandbox
        .call_custom("http", request(&format!("{failing}/v1/charges"), 2000))
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "unknown");
    assert_eq!(answer["error"]["status"], 502);

    // A deadline already past: not sent.
    let answer = sandbox
        .call_custom("http", request(&format!("{echo}/v1/charges"), -1))
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "not_sent");
    let answer = sandbox
        .call_custom("http", json!({"method": "GET", "url": "not a url"}))
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "invalid");

    let metrics = payhost::metrics::global().render();
    assert!(
        metrics.contains(
            "payhost_provider_http_duration_seconds_count{outcome=\"201\",provider=\"sandbox\"} 1"
        ),
        "{metrics}"
    );

    let logs = String::from_utf8(LINES.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("provider HTTP request"), "{logs}");
    assert!(logs.contains("authorization: <redacted>"), "{logs}");
    assert!(
        !logs.contains("sk_test_secret"),
        "a secret reached the logs:\n{logs}"
    );
    assert!(
        !logs.contains("x=1"),
        "query strings stay out of the logs:\n{logs}"
    );
}

static LINES: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LINES.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An isolated provider (`isolation = "process"`) gets the same host services: its HTTP
/// request goes out through the host, over the worker's call connection, and its answer and the
/// host's log line come back as they do in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_provider_uses_the_host_services_through_its_worker() {
    let s = Scratch::new();
    let config = BOTH
        .replace(
            "[plugins]\n",
            &format!(
                "[plugins]\nworker = \"{}\"\n",
                payhost_e2e::payhost_bin().display()
            ),
        )
        .replace(
            "library = \"payhost_provider_sandbox\"\n",
            "library = \"payhost_provider_sandbox\"\nisolation = \"process\"\n",
        );
    let (_config, report) = s.load(&config);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let sandbox = report.providers.get("sandbox").unwrap();
    assert_eq!(sandbox.isolation().0, "process");
    let echo = serve(Router::new().route(
        "/v1/charges",
        post(|body: String| async move { (StatusCode::CREATED, format!("echo {body}")) }),
    ))
    .await;
    // Several at once: each call has its own connection, and its host calls come back on it.
    let url = format!("{echo}/v1/charges");
    let call = || sandbox.call_custom("http", request(&url, 2000));
    let (a, b, c, d) = tokio::join!(call(), call(), call(), call());
    for answer in [a, b, c, d] {
        let answer = answer.unwrap();
        assert_eq!(answer["ok"]["status"], 201, "{answer}");
        assert_eq!(answer["ok"]["body"], "echo amount=100", "{answer}");
    }
    // A request that never left is still told apart from one whose answer was lost.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let answer = sandbox
        .call_custom(
            "http",
            request(&format!("http://{closed}/v1/charges"), 2000),
        )
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "not_sent", "{answer}");
}

/// A server that accepts and never answers; the times (from accept) at which each connection
/// was closed by its client.
async fn hanging_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Duration>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let accepted = Instant::now();
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                seen.lock().unwrap().push(accepted.elapsed());
            });
        }
    });
    (format!("http://{at}"), closed)
}

/// The bounds the host keeps for a provider's requests, in-process and isolated: a request
/// ends with the call that made it whatever deadline the plugin names; no redirect is
/// followed (a 307 would re-send the body and its secret headers to another origin); a body
/// is read up to the provider's bound; an error never repeats a URL's credentials or query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_requests_stay_within_their_call_and_their_bounds() {
    let s = Scratch::new();
    let config = BOTH.replace(
        "[plugins]\n",
        &format!(
            "[plugins]\nworker = \"{}\"\n",
            payhost_e2e::payhost_bin().display()
        ),
    ) + r#"
[providers.isolated]
library = "payhost_provider_sandbox"
isolation = "process"
timeout_ms = 500
http_max_response_bytes = 4096

[providers.isolated.options]
state_dir = "{state}/isolated"
webhook_secret = "whsec_test_secret"
"#;
    let (_config, report) = s.load(&config);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    for id in ["sandbox", "isolated"] {
        let provider = report.providers.get(id).unwrap();
        // The plugin names a deadline a minute away; its call has 500 ms.
        let (hanging, closed) = hanging_server().await;
        // Sent and never answered: unknown, whichever ends first (the request or the call).
        match provider
            .call_custom("http", request(&format!("{hanging}/v1/charges"), 60_000))
            .await
        {
            Ok(answer) => assert_eq!(answer["error"]["kind"], "unknown", "{id}: {answer}"),
            Err(e) => assert!(e.outcome_is_unknown(), "{id}: {e}"),
        }
        let started = Instant::now();
        while closed.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held = closed.lock().unwrap().first().copied();
        assert!(
            held.is_some_and(|h| h < Duration::from_millis(1500)),
            "{id}: the host held the request for {held:?}"
        );
    }
    let sandbox = report.providers.get("sandbox").unwrap();
    let isolated = report.providers.get("isolated").unwrap();

    // A redirect to another origin is handed back, not followed.
    let stolen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let thief = {
        let stolen = stolen.clone();
        serve(Router::new().route(
            "/steal",
            post(move || async move {
                stolen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                "ok"
            }),
        ))
        .await
    };
    let redirecting = serve(Router::new().route(
        "/v1/charges",
        post(move || {
            let to = format!("{thief}/steal");
            async move { (StatusCode::TEMPORARY_REDIRECT, [("location", to)], "") }
        }),
    ))
    .await;
    let answer = sandbox
        .call_custom("http", request(&format!("{redirecting}/v1/charges"), 2000))
        .await
        .unwrap();
    assert_eq!(answer["ok"]["status"], 307, "{answer}");
    assert_eq!(stolen.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Bodies: 2 MiB is over the default 1 MiB; the isolated provider takes 4 KiB.
    let big = serve(Router::new().route(
        "/v1/charges",
        post(|body: String| async move {
            let n: usize = body.trim_start_matches("amount=").parse().unwrap_or(0);
            "b".repeat(n)
        }),
    ))
    .await;
    let sized = |n: usize| {
        let mut r = request(&format!("{big}/v1/charges"), 2000);
        r["body"] = json!(format!("amount={n}"));
        r
    };
    let answer = sandbox.call_custom("http", sized(2 << 20)).await.unwrap();
    assert_eq!(answer["error"]["kind"], "unknown", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http_max_response_bytes"),
        "{answer}"
    );
    let answer = sandbox.call_custom("http", sized(512 << 10)).await.unwrap();
    assert_eq!(answer["ok"]["status"], 200, "under the bound");
    let answer = isolated.call_custom("http", sized(8192)).await.unwrap();
    assert_eq!(answer["error"]["kind"], "unknown", "{answer}");
    let answer = isolated.call_custom("http", sized(1024)).await.unwrap();
    assert_eq!(answer["ok"]["status"], 200, "{answer}");

    // An error names the URL without its password or query.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let answer = sandbox
        .call_custom(
            "http",
            request(
                &format!("http://merchant:hunter2@{closed}/v1/charges?api_key=sk_live_zzz"),
                2000,
            ),
        )
        .await
        .unwrap();
    assert_eq!(answer["error"]["kind"], "not_sent", "{answer}");
    let text = answer.to_string();
    assert!(
        !text.contains("hunter2") && !text.contains("sk_live_zzz"),
        "{text}"
    );
}

/// The host's threads per process, from `/proc/self/status`.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A plugin's own threads can ask the host for HTTP requests outside any call; each holds a
/// host thread while it runs. The host serves at most `max_concurrency` of them at once and
/// refuses the rest, counted, instead of starting a thread for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_own_threads_get_a_bounded_number_of_host_requests() {
    let s = Scratch::new();
    let config = format!(
        "[plugins]\ndir = \"{{plugins}}\"\nworker = \"{}\"\n[providers.faulty]\nlibrary = \"payhost_fixture_faulty\"\nisolation = \"process\"\nmax_concurrency = 4\ntimeout_ms = 5000\n[providers.faulty.options]\nstate_dir = \"{{state}}\"\n",
        payhost_e2e::payhost_bin().display()
    );
    let (_config, report) = s.load(&config);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let faulty = report.providers.get("faulty").unwrap();
    let (hanging, _closed) = hanging_server().await;
    let before = threads();
    let response = faulty
        .call(payhost_provider_api::AuthorizeRequest {
            session_id: "ps_storm".into(),
            idempotency_key: "storm-1".into(),
            amount: 100,
            currency_code: "eur".into(),
            context: Value::Null,
            data: Value::Null,
            input: json!({"storm": {"url": format!("{hanging}/slow"), "threads": 64}}),
            account_holder: None,
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await;
    assert!(response.is_ok(), "{response:?}");
    // The storm's requests arrive; give them a moment, then count.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = threads();
    assert!(
        during <= before + 4 + 4,
        "host threads went from {before} to {during}"
    );
    let refused = payhost::metrics::global()
        .plugin_limits
        .with_label_values(&["faulty", "host_calls"])
        .get();
    assert!(refused >= 60, "refused {refused}");
}
