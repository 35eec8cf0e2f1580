//! The HTTP service the host lends providers (`http.request`): the host owns the client, keeps
//! every request within the provider call's deadline, tells "nothing was sent" apart from "sent,
//! answer lost", logs with secrets redacted, and measures latency per provider.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use payhost_provider_api::{HttpFailure, HttpRequest, HttpResponse};

/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Without a deadline in the request, the longest wait for an answer.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Header names whose values never reach a log.
const ALWAYS_SECRET: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "stripe-signature",
];

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .expect("an HTTP client with default TLS settings")
    })
}

/// A runtime for requests made from threads outside the host's runtime (tools, benchmarks).
fn fallback_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for outbound HTTP")
    })
}

/// Sends `request` for `provider`, blocking the calling (provider) thread.
pub(crate) fn send_blocking(
    provider: &str,
    request: HttpRequest,
    now_unix_ms: i64,
) -> Result<HttpResponse, HttpFailure> {
    let future = send(provider, request, now_unix_ms);
    match tokio::runtime::Handle::try_current() {
        // Provider calls run on the runtime's blocking threads, where this is allowed.
        Ok(handle) => handle.block_on(future),
        Err(_) => fallback_runtime().block_on(future),
    }
}

/// The URL without its query string, for logs.
fn loggable(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    let _ = url.set_password(None);
    url.to_string()
}

async fn send(
    provider: &str,
    request: HttpRequest,
    now_unix_ms: i64,
) -> Result<HttpResponse, HttpFailure> {
    let invalid = |message: String| HttpFailure::Invalid { message };
    let url = reqwest::Url::parse(&request.url).map_err(|e| invalid(format!("bad URL: {e}")))?;
    let method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|e| invalid(format!("bad method: {e}")))?;
    let timeout = match request.deadline_unix_ms {
        Some(deadline) if deadline <= now_unix_ms => {
            return Err(HttpFailure::NotSent {
                message: "the call's deadline has passed".into(),
            });
        }
        Some(deadline) => Duration::from_millis((deadline - now_unix_ms) as u64),
        None => DEFAULT_TIMEOUT,
    };
    let secret = |name: &str| {
        ALWAYS_SECRET.iter().any(|s| s.eq_ignore_ascii_case(name))
            || request
                .secret_headers
                .iter()
                .any(|s| s.eq_ignore_ascii_case(name))
    };
    let shown: Vec<String> = request
        .headers
        .iter()
        .map(|(k, v)| {
            if secret(k) {
                format!("{k}: <redacted>")
            } else {
                format!("{k}: {v}")
            }
        })
        .collect();
    let target = loggable(&url);
    let mut builder = client().request(method.clone(), url).timeout(timeout);
    for (k, v) in &request.headers {
        builder = builder.header(k, v);
    }
    if let Some(body) = request.body {
        builder = builder.body(body);
    }
    let started = Instant::now();
    let result = match builder.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            match response.text().await {
                Ok(_) if status >= 500 => Err(HttpFailure::Unknown {
                    message: format!("the server answered {status}"),
                    status: Some(status),
                }),
                Ok(body) => Ok(HttpResponse {
                    status,
                    headers,
                    body,
                }),
                Err(e) => Err(HttpFailure::Unknown {
                    message: format!("the answer was cut off: {e}"),
                    status: Some(status),
                }),
            }
        }
        // Refused, DNS, TLS handshake, connect timeout: the request never left.
        Err(e) if e.is_connect() => Err(HttpFailure::NotSent {
            message: e.to_string(),
        }),
        Err(e) if e.is_builder() => Err(invalid(e.to_string())),
        // Sent (or maybe sent): a timeout or a reset afterwards leaves the outcome open.
        Err(e) => Err(HttpFailure::Unknown {
            message: e.to_string(),
            status: None,
        }),
    };
    let elapsed = started.elapsed();
    let outcome = match &result {
        Ok(r) => format!("{}", r.status),
        Err(HttpFailure::NotSent { .. }) => "not_sent".into(),
        Err(HttpFailure::Unknown {
            status: Some(s), ..
        }) => format!("{s}"),
        Err(HttpFailure::Unknown { .. }) => "unknown".into(),
        Err(_) => "invalid".into(),
    };
    crate::metrics::global()
        .provider_http
        .with_label_values(&[provider, &outcome])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        target: "payhost::provider::http",
        provider,
        %method,
        url = %target,
        outcome = %outcome,
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "provider HTTP request"
    );
    tracing::debug!(target: "payhost::provider::http", provider, headers = ?shown, "provider HTTP request headers");
    result
}
