//! Services the host lends a provider: logging, a clock, and whatever later hosts add.
//!
//! Every service is one named call with a JSON payload over the frozen envelope, so a new service
//! is a new name, never a layout change: an older host answers `unsupported` and the SDK falls back
//! (the clock to the system clock, logs to nowhere).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};

/// The service names and payloads on the wire. Frozen once released; add, never change.
pub mod ops {
    /// A log record: [`super::LogRecord`] in, nothing out.
    pub const LOG: &str = "log";
    /// The host's clock: `{}` in, `{"unix_ms": i64}` out.
    pub const CLOCK_NOW: &str = "clock.now";
    /// An HTTP request sent by the host: [`super::HttpRequest`] in, [`super::HttpResponse`] out,
    /// or a [`super::HttpFailure`] as the error (since provider-api 1.2).
    pub const HTTP: &str = "http.request";
}

/// An HTTP request a provider asks the host to send. The host owns the client: timeouts within
/// the call's deadline, logs with secrets redacted, latency in the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The full URL.
    pub url: String,
    /// Request headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    #[serde(default)]
    pub body: Option<String>,
    /// The provider call's deadline (Unix ms), from its request; the host never waits past it
    /// (nor more than 5 s for a connection).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
    /// Header names whose values are secrets (beyond `authorization`, `cookie` and friends,
    /// which are always redacted in logs).
    #[serde(default)]
    pub secret_headers: Vec<String>,
}

/// The processor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// The status code (below 500; a 5xx is an [`HttpFailure::Unknown`]).
    pub status: u16,
    /// Response headers, names in lower case.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body as text.
    #[serde(default)]
    pub body: String,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why an HTTP request gave no usable answer. The split is the one money needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HttpFailure {
    /// Nothing was sent (refused, DNS, TLS, no time left): the call is `not_attempted`.
    #[error("not sent: {message}")]
    NotSent {
        /// Why.
        message: String,
    },
    /// Sent, but the answer was lost or was a 5xx: the call's outcome is `unknown`.
    #[error("sent, answer unknown: {message}")]
    Unknown {
        /// Why.
        message: String,
        /// The status, for a 5xx.
        #[serde(default)]
        status: Option<u16>,
    },
    /// The request itself was malformed (a bad URL or method).
    #[error("invalid request: {message}")]
    Invalid {
        /// Why.
        message: String,
    },
    /// The host predates the HTTP service.
    #[error("the host has no HTTP service: {message}")]
    Unsupported {
        /// The host's words.
        message: String,
    },
}

/// Something that answers service calls: the real host across the boundary, or a test host.
pub(crate) trait HostBackend: Send + Sync {
    fn call(&self, op: &str, request: &str) -> Result<String, String>;
}

/// A log record as it crosses to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// The module path or target the event came from inside the plugin.
    pub target: String,
    /// The event's message.
    pub message: String,
    /// The event's other fields.
    #[serde(default)]
    pub fields: Map<String, Value>,
}

/// A handle on the host's services. Cheap to clone; give it to whatever in your provider logs.
#[derive(Clone)]
pub struct HostServices {
    backend: Arc<dyn HostBackend>,
}

impl HostServices {
    pub(crate) fn new(backend: Arc<dyn HostBackend>) -> Self {
        HostServices { backend }
    }

    /// Calls a host service by name; `Err` carries the host's message (`unsupported` for a name
    /// an older host does not know).
    pub fn call(&self, op: &str, request: &Value) -> Result<Value, String> {
        let answer = self.backend.call(op, &request.to_string())?;
        serde_json::from_str(&answer).map_err(|e| format!("host answered unreadable JSON: {e}"))
    }

    /// The host's clock in Unix milliseconds (tests can stop it); the system clock if the host
    /// has none.
    pub fn now_unix_ms(&self) -> i64 {
        self.call(ops::CLOCK_NOW, &Value::Object(Map::new()))
            .ok()
            .and_then(|v| v.get("unix_ms").and_then(Value::as_i64))
            .unwrap_or_else(system_now_unix_ms)
    }

    /// Has the host send an HTTP request. Map [`HttpFailure::NotSent`] to
    /// [`crate::Outcome::NotAttempted`] and [`HttpFailure::Unknown`] to [`crate::Outcome::Unknown`].
    pub fn http(&self, request: &HttpRequest) -> Result<HttpResponse, HttpFailure> {
        let payload = serde_json::to_value(request).map_err(|e| HttpFailure::Invalid {
            message: e.to_string(),
        })?;
        match self.backend.call(ops::HTTP, &payload.to_string()) {
            Ok(answer) => serde_json::from_str(&answer).map_err(|e| HttpFailure::Unknown {
                message: format!("the host's answer is unreadable: {e}"),
                status: None,
            }),
            Err(error) => {
                Err(serde_json::from_str(&error)
                    .unwrap_or(HttpFailure::Unsupported { message: error }))
            }
        }
    }

    /// Sends one log record to the host, which tags it with the provider id. Usually you log
    /// with `tracing` instead; the SDK forwards those events here.
    pub fn log(&self, record: &LogRecord) {
        let payload = serde_json::to_value(record).unwrap_or(Value::Null);
        let _ = self.call(ops::LOG, &payload);
    }
}

/// The system clock in Unix milliseconds.
pub(crate) fn system_now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

thread_local! {
    /// The host of the instance whose method runs on this thread, so that `tracing` events are
    /// tagged with the right provider id when one library serves several.
    static CURRENT: RefCell<Option<HostServices>> = const { RefCell::new(None) };
}

/// Runs `f` with `host` as this thread's current host.
pub(crate) fn with_current<R>(host: &HostServices, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(host.clone())));
    struct Restore(Option<HostServices>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// This thread's current host, else `fallback`.
fn current_or(fallback: &HostServices) -> HostServices {
    CURRENT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(|| fallback.clone())
}

/// Forwards the plugin's `tracing` events (its own copy of tracing, with its own global
/// dispatcher) to the host. Spans are not forwarded; events carry their own fields.
pub(crate) struct ForwardingSubscriber {
    fallback: HostServices,
    max_level: LevelFilter,
    next_span: AtomicU64,
}

impl ForwardingSubscriber {
    pub(crate) fn new(fallback: HostServices, max_level: LevelFilter) -> Self {
        ForwardingSubscriber {
            fallback,
            max_level,
            next_span: AtomicU64::new(1),
        }
    }
}

/// Parses a level name as the host sends it; unknown names mean `info`.
pub(crate) fn parse_level_filter(name: &str) -> LevelFilter {
    match name {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => LevelFilter::INFO,
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

#[derive(Default)]
struct FieldCollector {
    message: String,
    fields: Map<String, Value>,
}

impl Visit for FieldCollector {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields
                .insert(field.name().to_owned(), Value::String(text));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .insert(field.name().to_owned(), Value::String(value.to_owned()));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().to_owned(), value.into());
    }
}

impl Subscriber for ForwardingSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= &self.max_level
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max_level)
    }
    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _span: &Id, _values: &Record<'_>) {}
    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut collector = FieldCollector::default();
        event.record(&mut collector);
        let meta = event.metadata();
        current_or(&self.fallback).log(&LogRecord {
            level: level_name(meta.level()).to_owned(),
            target: meta.target().to_owned(),
            message: collector.message,
            fields: collector.fields,
        });
    }
    fn enter(&self, _span: &Id) {}
    fn exit(&self, _span: &Id) {}
}

/// Reports a panic to the host at error level, with where it happened; installed as the plugin's
/// panic hook so panics do not go to the host's stderr unannounced.
pub(crate) fn report_panic(fallback: &HostServices, info: &std::panic::PanicHookInfo<'_>) {
    let payload = panic_message(info.payload());
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let mut fields = Map::new();
    fields.insert("location".into(), Value::String(location));
    current_or(fallback).log(&LogRecord {
        level: "error".into(),
        target: "payhost_provider_api::panic".into(),
        message: format!("provider panicked: {payload}"),
        fields,
    });
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
