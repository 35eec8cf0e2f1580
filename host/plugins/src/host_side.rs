//! The host side of host services for one provider instance (log, clock, `http.request`): what a
//! plugin may make the host do, each within the plugin's own bounds. A leaf: in-process calls
//! reach it through the envelope, a worker's through its socket.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost_core::Clock;
use payhost_provider_api::envelope::{HostObject, RResult, RStr, RString};
use payhost_provider_api::{LogRecord, host_ops};

thread_local! {
    /// The deadline of the provider call running on this thread, for the host services it uses.
    static CALL_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a provider call) with `deadline` as the deadline of the host services it uses.
pub(crate) fn with_call_deadline<R>(deadline: Instant, f: impl FnOnce() -> R) -> R {
    let previous = CALL_DEADLINE.with(|d| d.replace(Some(deadline)));
    let answer = f();
    CALL_DEADLINE.with(|d| d.set(previous));
    answer
}

/// What the host lends one provider instance, and within which bounds.
#[derive(Debug, Clone)]
pub(crate) struct HostLimits {
    /// A host service used outside any call (from the provider's own threads) ends within
    /// this (the provider's call deadline).
    pub(crate) call_timeout: Duration,
    /// The largest HTTP response body the host reads for it.
    pub(crate) max_response_bytes: usize,
}

/// The host side of host services for one provider instance: tags logs with the provider id,
/// keeps its HTTP requests within the deadline of the call that makes them, and redacts its
/// secrets from what it logs.
pub(crate) struct HostSide {
    pub(crate) provider_id: String,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) limits: HostLimits,
    pub(crate) redactor: crate::config::Redactor,
}

impl HostObject for HostSide {
    fn call(&self, op: RStr<'_>, request: RStr<'_>) -> RResult<RString, RString> {
        let deadline = CALL_DEADLINE.with(std::cell::Cell::get);
        // A panic must not unwind into the plugin's frames.
        match catch_unwind(AssertUnwindSafe(|| {
            self.serve(op.as_str(), request.as_str(), deadline)
        })) {
            Ok(Ok(answer)) => RResult::ROk(RString::from(answer)),
            Ok(Err(message)) => RResult::RErr(RString::from(message)),
            Err(_) => RResult::RErr(RString::from("the host service panicked")),
        }
    }
}

impl HostSide {
    /// Serves one host service call. `call_deadline` is the deadline of the provider call that
    /// makes it (`None`: a provider's own thread, bounded by the provider's call timeout).
    pub(crate) fn serve(
        &self,
        op: &str,
        request: &str,
        call_deadline: Option<Instant>,
    ) -> Result<String, String> {
        match op {
            host_ops::CLOCK_NOW => Ok(format!("{{\"unix_ms\":{}}}", self.clock.now_unix_ms())),
            host_ops::HTTP => {
                let failure = |f: &payhost_provider_api::HttpFailure| {
                    serde_json::to_string(f).unwrap_or_default()
                };
                let request: payhost_provider_api::HttpRequest = serde_json::from_str(request)
                    .map_err(|e| {
                        failure(&payhost_provider_api::HttpFailure::Invalid {
                            message: format!("bad http.request: {e}"),
                        })
                    })?;
                let bounds = crate::outbound::Bounds {
                    deadline: call_deadline
                        .unwrap_or_else(|| Instant::now() + self.limits.call_timeout),
                    max_response_bytes: self.limits.max_response_bytes,
                };
                let answer = crate::outbound::send_blocking(
                    &self.provider_id,
                    request,
                    self.clock.now_unix_ms(),
                    &bounds,
                );
                match answer {
                    Ok(response) => Ok(serde_json::to_string(&response).unwrap_or_default()),
                    Err(f) => Err(failure(&f)),
                }
            }
            host_ops::LOG => {
                let mut record: LogRecord =
                    serde_json::from_str(request).map_err(|e| format!("bad log record: {e}"))?;
                let (message, in_message) = self.redactor.redact_noting(&record.message);
                record.message = crate::host_side::escape_control(&message);
                let in_fields = emit(&self.provider_id, &record, &self.redactor);
                if in_message || in_fields {
                    // The operator must hear of it (and `payhost provider test` fails on it).
                    tracing::warn!(
                        target: "payhost::provider",
                        provider = %self.provider_id,
                        "{SECRET_REDACTED}"
                    );
                }
                Ok("null".into())
            }
            other => Err(format!("unsupported host service `{other}`")),
        }
    }
}

/// What the host logs when a provider's log record held a secret it redacted.
pub const SECRET_REDACTED: &str = "the provider logged the value of a secret (of its options or the environment); the host redacted it: a provider must never log its secrets";

/// Emits a provider's log record into the host's `tracing`, tagged with the provider id; says
/// whether a secret was redacted from its fields.
fn emit(provider: &str, r: &LogRecord, redactor: &crate::config::Redactor) -> bool {
    // JSON escapes line breaks in the fields; the secrets still go.
    let (fields, redacted) = if r.fields.is_empty() {
        (String::new(), false)
    } else {
        redactor.redact_noting(&serde_json::Value::Object(r.fields.clone()).to_string())
    };
    let target = crate::host_side::escape_control(&r.target);
    let (target, message) = (target.as_str(), r.message.as_str());
    macro_rules! at {
        ($level:ident) => {
            tracing::$level!(target: "payhost::provider", provider, plugin_target = target, fields = %fields, "{message}")
        };
    }
    match r.level.as_str() {
        "error" => at!(error),
        "warn" => at!(warn),
        "debug" => at!(debug),
        "trace" => at!(trace),
        _ => at!(info),
    }
    redacted
}

/// `text` with control characters written as escapes (`\r`, `\u{1b}`): a plugin's output can
/// never end a log line early or forge another one.
pub(crate) fn escape_control(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
