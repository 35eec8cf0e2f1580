//! The HTTP service the host lends providers (`http.request`): the host owns the client, keeps
//! every request within the deadline of the provider call that makes it, tells "nothing was
//! sent" apart from "sent, answer lost", logs with secrets redacted, and measures latency per
//! provider.
//!
//! Invariants (a plugin spends only its own budgets):
//! - a request never outlives its call: its timeout is the earlier of the deadline the plugin
//!   names and the call's own (or, from a provider's own thread, its call timeout from now);
//! - no redirect is followed: a 3xx is the plugin's to read, so a capture body and its secret
//!   headers never travel to another origin, and a failure after the first hop is never taken
//!   for "not sent";
//! - a response body is read up to the provider's `http_max_response_bytes`, never whole;
//! - error texts and logs carry no query string and no user or password of the URL.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use payhost_provider_api::{HttpFailure, HttpRequest, HttpResponse};

/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Header names whose values never reach a log.
const ALWAYS_SECRET: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "stripe-signature",
];

/// The bounds of one request, set by the host.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    /// The deadline of the provider call that sends it.
    pub(crate) deadline: Instant,
    /// The largest response body read.
    pub(crate) max_response_bytes: usize,
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
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
    bounds: &Bounds,
) -> Result<HttpResponse, HttpFailure> {
    let future = send(provider, request, now_unix_ms, bounds);
    match tokio::runtime::Handle::try_current() {
        // Provider calls run on the runtime's blocking threads, where this is allowed.
        Ok(handle) => handle.block_on(future),
        Err(_) => fallback_runtime().block_on(future),
    }
}

/// The URL without its query string and credentials, for logs and error texts.
fn loggable(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

async fn send(
    provider: &str,
    request: HttpRequest,
    now_unix_ms: i64,
    bounds: &Bounds,
) -> Result<HttpResponse, HttpFailure> {
    let invalid = |message: String| HttpFailure::Invalid { message };
    let url = reqwest::Url::parse(&request.url).map_err(|e| invalid(format!("bad URL: {e}")))?;
    let method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|e| invalid(format!("bad method: {e}")))?;
    let left = bounds.deadline.saturating_duration_since(Instant::now());
    let asked = match request.deadline_unix_ms {
        Some(deadline) if deadline <= now_unix_ms => Duration::ZERO,
        Some(deadline) => Duration::from_millis((deadline - now_unix_ms) as u64),
        None => left,
    };
    let timeout = asked.min(left);
    if timeout.is_zero() {
        return Err(HttpFailure::NotSent {
            message: "the call's deadline has passed".into(),
        });
    }
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
    // reqwest's errors name the whole URL (query strings, credentials): never pass them on.
    let describe = |e: reqwest::Error| format!("{target}: {}", e.without_url());
    let started = Instant::now();
    let result = match builder.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            match read_capped(response, bounds.max_response_bytes).await {
                Ok(_) if status >= 500 => Err(HttpFailure::Unknown {
                    message: format!("the server answered {status}"),
                    status: Some(status),
                }),
                Ok(body) => Ok(HttpResponse {
                    status,
                    headers,
                    body,
                }),
                Err(Cut::TooLarge) => {
                    crate::metrics::global()
                        .plugin_limits
                        .with_label_values(&[provider, "http_response_bytes"])
                        .inc();
                    Err(HttpFailure::Unknown {
                        message: format!(
                            "the answer's body is over the {} bytes the host reads for this provider (http_max_response_bytes)",
                            bounds.max_response_bytes
                        ),
                        status: Some(status),
                    })
                }
                Err(Cut::Failed(e)) => Err(HttpFailure::Unknown {
                    message: format!("the answer was cut off: {}", describe(e)),
                    status: Some(status),
                }),
            }
        }
        // Refused, DNS, TLS handshake, connect timeout: the request never left.
        Err(e) if e.is_connect() => Err(HttpFailure::NotSent {
            message: describe(e),
        }),
        Err(e) if e.is_builder() => Err(invalid(describe(e))),
        // Sent (or maybe sent): a timeout or a reset afterwards leaves the outcome open.
        Err(e) => Err(HttpFailure::Unknown {
            message: describe(e),
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

/// Why a body was not read whole.
enum Cut {
    TooLarge,
    Failed(reqwest::Error),
}

/// The body as text, read up to `max` bytes.
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<String, Cut> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(Cut::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Cut::Failed)? {
        if body.len() + chunk.len() > max {
            return Err(Cut::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::loggable;

    #[test]
    fn a_loggable_url_has_no_query_and_no_credentials() {
        let url =
            reqwest::Url::parse("https://user:hunter2@api.example/v1/charges?key=sk_live_1#x")
                .unwrap();
        assert_eq!(loggable(&url), "https://api.example/v1/charges");
    }
}
