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
