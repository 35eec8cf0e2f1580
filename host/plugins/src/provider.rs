//! A loaded provider instance and how the host calls it: off the async runtime, under a deadline
//! and a concurrency limit, with every failure mode kept apart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost_provider_api::envelope::{ProviderBox, RResult, RStr};
use payhost_provider_api::{
    ErrorKind, Manifest, Operation, PaymentMethodList, ProviderError, ProviderResponse, Request,
    RetrieveAccountHolderResponse, RetrieveResponse, WebhookEvent,
};

/// A provider's answer, as labelled in metrics.
pub trait Answer {
    /// `processed`, `declined`, … for operations; `answered` or `verified` for the others.
    fn outcome_label(&self) -> &'static str;

    /// The `data` it asks the host to store, if any.
    fn data(&self) -> Option<&serde_json::Value> {
        None
    }
}

impl Answer for ProviderResponse {
    fn outcome_label(&self) -> &'static str {
        self.outcome.name()
    }
    fn data(&self) -> Option<&serde_json::Value> {
        self.data.as_ref()
    }
}

impl Answer for RetrieveResponse {
    fn outcome_label(&self) -> &'static str {
        "answered"
    }
    fn data(&self) -> Option<&serde_json::Value> {
        self.data.as_ref()
    }
}

impl Answer for RetrieveAccountHolderResponse {
    fn outcome_label(&self) -> &'static str {
        "answered"
    }
    fn data(&self) -> Option<&serde_json::Value> {
        self.data.as_ref()
    }
}

/// The whole list is bounded by [`MAX_ANSWER_BYTES`]; each method's data is the host's to
/// bound when it stores one.
impl Answer for PaymentMethodList {
    fn outcome_label(&self) -> &'static str {
        "answered"
    }
}

impl Answer for WebhookEvent {
    fn outcome_label(&self) -> &'static str {
        "verified"
    }
}
use tokio::sync::Semaphore;

use crate::answer::{Undecoded, read_error_str};
use crate::host_side::with_call_deadline;
pub use payhost_core::{Clock, SystemClock};

/// Where a provider's code came from, for `payhost check` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryInfo {
    /// The library file.
    pub path: PathBuf,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
}

/// Why a provider call did not produce the provider's answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// Nothing was sent to the provider (no concurrency slot before the deadline, a request that
    /// did not serialize): retrying with the same idempotency key is safe.
    #[error("not attempted: {reason}")]
    NotAttempted {
        /// Why.
        reason: String,
    },
    /// The call may or may not have taken effect: it overran its deadline, or its answer could not
    /// be read. It must be reconciled through retrieve, never assumed failed.
    #[error("outcome unknown: {reason}")]
    Unknown {
        /// Why.
        reason: String,
    },
    /// The provider answered with an error (a panic inside it is one, of kind `panic`).
    #[error("{0}")]
    Provider(ProviderError),
    /// The answer (or the data it asks the host to store) is larger than the host takes. The
    /// call ran, so its outcome is unknown: it is reconciled like a lost answer.
    #[error(
        "provider.answer_too_large: the {what} is {bytes} bytes, over the {limit} the host takes; the outcome is unknown"
    )]
    AnswerTooLarge {
        /// `answer` or `data`.
        what: &'static str,
        /// Its size.
        bytes: usize,
        /// The bound.
        limit: usize,
    },
}

/// The largest answer the host reads from a provider call.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// The largest `data` the host stores from one answer (and copies into events).
pub const MAX_DATA_BYTES: usize = 64 * 1024;

impl CallError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::NotAttempted { .. } => "provider.not_attempted",
            CallError::Unknown { .. } => "provider.outcome_unknown",
            CallError::Provider(e) => match e.kind {
                ErrorKind::Panic => "provider.panic",
                _ => "provider.error",
            },
            CallError::AnswerTooLarge { .. } => "provider.answer_too_large",
        }
    }

    /// Whether money may have moved: an unknown outcome, or a panic in the middle of a call.
    pub fn outcome_is_unknown(&self) -> bool {
        match self {
            CallError::Unknown { .. } | CallError::AnswerTooLarge { .. } => true,
            CallError::Provider(e) => e.kind == ErrorKind::Panic,
            CallError::NotAttempted { .. } => false,
        }
    }
}

/// A provider instance, ready to be called.
pub struct Provider {
    id: String,
    manifest: Manifest,
    protocol: u32,
    library: LibraryInfo,
    backend: Backend,
    pool: crate::call_pool::CallPool,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    timeout: Duration,
    resend_unknown: bool,
    webhook_rate: crate::auth::RateLimit,
    clock: Arc<dyn Clock>,
    redactor: crate::config::Redactor,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.id)
            .field("manifest", &self.manifest)
            .field("protocol", &self.protocol)
            .field("library", &self.library)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Everything [`Provider::new`] needs; built by the loader.
pub(crate) struct ProviderParts {
    pub(crate) id: String,
    pub(crate) manifest: Manifest,
    pub(crate) protocol: u32,
    pub(crate) library: LibraryInfo,
    pub(crate) backend: Backend,
    pub(crate) max_concurrency: usize,
    pub(crate) timeout: Duration,
    pub(crate) resend_unknown: bool,
    pub(crate) webhook_rate: crate::auth::RateLimit,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) redactor: crate::config::Redactor,
}

impl Provider {
    pub(crate) fn new(parts: ProviderParts) -> Provider {
        let id_for_pool = parts.id.clone();
        Provider {
            id: parts.id,
            manifest: parts.manifest,
            protocol: parts.protocol,
            library: parts.library,
            backend: parts.backend,
            pool: crate::call_pool::CallPool::new(&id_for_pool),
            permits: Arc::new(Semaphore::new(parts.max_concurrency)),
            max_concurrency: parts.max_concurrency,
            timeout: parts.timeout,
            resend_unknown: parts.resend_unknown,
            webhook_rate: parts.webhook_rate,
            clock: parts.clock,
            redactor: parts.redactor,
        }
    }

    /// The operator's id for this provider.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// What the plugin says about itself.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The negotiated protocol version.
    pub fn protocol(&self) -> u32 {
        self.protocol
    }
    /// Where the code came from.
    pub fn library(&self) -> &LibraryInfo {
        &self.library
    }
    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// How many calls may run at once.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }
    /// Calls running now (including ones that overran their deadline and have not returned).
    pub fn calls_in_progress(&self) -> usize {
        self.max_concurrency - self.permits.available_permits()
    }

    /// Calls the operation of `request`'s type under the provider's deadline.
    pub async fn call<R: Request>(&self, request: R) -> Result<R::Response, CallError>
    where
        R::Response: Answer,
    {
        self.call_with_timeout(request, self.timeout).await
    }

    /// Calls with an explicit deadline (reconciliation uses its own). The deadline covers waiting
    /// for a concurrency slot (then nothing was sent: [`CallError::NotAttempted`]) and the call
    /// itself (then the outcome is [`CallError::Unknown`]). A call that overran keeps running on its
    /// thread and keeps its slot until it returns; its answer is dropped.
    pub async fn call_with_timeout<R: Request>(
        &self,
        request: R,
        timeout: Duration,
    ) -> Result<R::Response, CallError>
    where
        R::Response: Answer,
    {
        self.call_until(request, Instant::now() + timeout).await.0
    }

    /// Calls under `deadline`, like [`Provider::call_with_timeout`]; when the call overran, also
    /// gives its [`LateAnswer`]: the answer it gives when its thread returns, which is the truth
    /// about the call (the engine settles an unknown attempt with it).
    pub async fn call_until<R: Request>(
        &self,
        mut request: R,
        deadline: Instant,
    ) -> (Result<R::Response, CallError>, Option<LateAnswer<R>>)
    where
        R::Response: Answer,
    {
        let op = R::OPERATION;
        let started = Instant::now();
        let timeout = deadline.saturating_duration_since(started);
        // For messages: the deadline was set a moment before `started`.
        let timeout_ms = (timeout.as_secs_f64() * 1000.0).round() as u64;
        request.set_deadline(self.clock.now_unix_ms() + timeout_ms as i64);
        let json = match serde_json::to_string(&request) {
            Ok(json) => json,
            Err(e) => {
                let reason = format!("the {op} request did not serialize: {e}");
                return (Err(CallError::NotAttempted { reason }), None);
            }
        };
        let permit =
            match tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned())
                .await
            {
                Err(_) => {
                    let reason = format!(
                        "all {} call slots of provider `{}` stayed busy for {} ms",
                        self.max_concurrency, self.id, timeout_ms
                    );
                    return (Err(CallError::NotAttempted { reason }), None);
                }
                Ok(Err(_)) => {
                    let reason = "the provider is shutting down".to_owned();
                    return (Err(CallError::NotAttempted { reason }), None);
                }
                Ok(Ok(permit)) => permit,
            };
        let backend = self.backend.clone();
        let mut task = self.pool.run(move || {
            let answer = backend.call(op.as_str(), &json, deadline);
            drop(permit);
            answer
        });
        let (result, late) = match tokio::time::timeout_at(deadline.into(), &mut task).await {
            Err(_) => (
                Err(CallError::Unknown {
                    reason: format!("no answer within {timeout_ms} ms"),
                }),
                Some(LateAnswer {
                    task,
                    provider: self.id.clone(),
                    started,
                    redactor: self.redactor.clone(),
                    _request: std::marker::PhantomData,
                }),
            ),
            Ok(joined) => (read_answer::<R>(op, joined, &self.redactor), None),
        };
        log_call(&self.id, op, started.elapsed(), &result);
        (result, late)
    }

    /// Calls the operation of `request`'s type on the current thread, bypassing the deadline and
    /// the concurrency limit. For benchmarks and tools; the engine never uses it.
    pub fn call_blocking<R: Request>(&self, request: &R) -> Result<R::Response, CallError>
    where
        R::Response: Answer,
    {
        let json = serde_json::to_string(request).map_err(|e| CallError::NotAttempted {
            reason: e.to_string(),
        })?;
        let deadline = Instant::now() + self.timeout;
        read_answer::<R>(
            R::OPERATION,
            Some(self.backend.call(R::OPERATION.as_str(), &json, deadline)),
            &self.redactor,
        )
    }

    /// Calls a provider-specific `x.<name>` operation (diagnostics, test helpers).
    pub async fn call_custom(
        &self,
        name: &str,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        let backend = self.backend.clone();
        let op = format!("x.{name}");
        let json = payload.to_string();
        let deadline = Instant::now() + self.timeout;
        let task = self.pool.run(move || backend.call(&op, &json, deadline));
        match tokio::time::timeout(self.timeout, task).await {
            Err(_) => Err(CallError::Unknown {
                reason: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
            Ok(None) => Err(CallError::Unknown {
                reason: "the call's thread failed".into(),
            }),
            Ok(Some(raw)) => decode(raw, "x", &self.redactor),
        }
    }

    /// How the provider's code is run, and how it is doing.
    pub fn isolation(&self) -> (&'static str, Option<crate::worker::WorkerHealth>) {
        match &self.backend {
            Backend::InProcess(_) => ("in_process", None),
            Backend::Worker(w) => ("process", Some(w.health())),
        }
    }

    /// Whether it can serve: always in-process; an isolated one while its worker is not
    /// crash-looping.
    pub fn healthy(&self) -> bool {
        !matches!(
            self.isolation().1,
            Some(crate::worker::WorkerHealth::Unhealthy)
        )
    }

    /// How many times its worker was restarted (0 in-process).
    pub fn worker_restarts(&self) -> u64 {
        match &self.backend {
            Backend::InProcess(_) => 0,
            Backend::Worker(w) => w.restarts(),
        }
    }

    /// Stops its worker, if it has one (the host is shutting down).
    pub fn stop(&self) {
        if let Backend::Worker(w) = &self.backend {
            w.stop();
        }
    }

    /// How fast its webhook intake takes events.
    pub fn webhook_rate(&self) -> crate::auth::RateLimit {
        self.webhook_rate
    }

    /// Whether the plugin was built before provider-api 1.3, which added the caller's `input`
    /// beside the provider's `data`.
    pub fn predates_input(&self) -> bool {
        let mut parts = self.manifest.api_version.split('.');
        let major: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) < (1, 3)
    }

    /// Whether an unknown call of `op` may be sent again with its idempotency key: the provider
    /// declares that its processor replays a repeated key for it, and the operator did not turn
    /// that off (`resend_unknown = false`).
    pub fn replays(&self, op: Operation) -> bool {
        self.resend_unknown && self.manifest.replays_idempotency_keys.contains(&op)
    }

    /// Whether the provider declares the ability an operation needs; the engine refuses up front
    /// what it cannot do.
    pub fn supports(&self, op: Operation) -> bool {
        match op {
            Operation::ParseWebhook => self.manifest.capabilities.webhooks,
            op if Operation::ACCOUNT_HOLDER.contains(&op) => self.manifest.account_holders,
            _ => true,
        }
    }
}

/// The answer of a call that overran its deadline, once its thread returns.
pub struct LateAnswer<R: Request> {
    task: crate::call_pool::Pending<Undecoded>,
    provider: String,
    started: Instant,
    redactor: crate::config::Redactor,
    _request: std::marker::PhantomData<fn() -> R>,
}

impl<R: Request> std::fmt::Debug for LateAnswer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LateAnswer")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl<R: Request> LateAnswer<R> {
    /// Waits for the call's thread to return, and reads its answer.
    pub async fn wait(self) -> Result<R::Response, CallError>
    where
        R::Response: Answer,
    {
        let joined = self.task.await;
        let answer = read_answer::<R>(R::OPERATION, joined, &self.redactor);
        tracing::info!(
            provider = %self.provider,
            operation = %R::OPERATION,
            elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            answered = answer.is_ok(),
            "a provider call that overran its deadline returned"
        );
        answer
    }
}

fn read_answer<R: Request>(
    op: Operation,
    joined: Option<Undecoded>,
    redactor: &crate::config::Redactor,
) -> Result<R::Response, CallError>
where
    R::Response: Answer,
{
    let answer: R::Response = match joined {
        None => Err(CallError::Unknown {
            reason: "the call's thread failed (a panic past the plugin's guard)".into(),
        }),
        Some(raw) => decode(raw, op.as_str(), redactor),
    }?;
    // What the host stores is bounded: every event about the session copies it.
    if let Some(data) = answer.data() {
        let bytes = serde_json::to_string(data).map_or(0, |t| t.len());
        if bytes > MAX_DATA_BYTES {
            return Err(CallError::AnswerTooLarge {
                what: "data",
                bytes,
                limit: MAX_DATA_BYTES,
            });
        }
    }
    Ok(answer)
}

fn decode<T: serde::de::DeserializeOwned>(
    raw: Undecoded,
    op: &str,
    redactor: &crate::config::Redactor,
) -> Result<T, CallError> {
    match raw {
        Undecoded::Ok(answer) if answer.len() > MAX_ANSWER_BYTES => {
            Err(CallError::AnswerTooLarge {
                what: "answer",
                bytes: answer.len(),
                limit: MAX_ANSWER_BYTES,
            })
        }
        Undecoded::TooLarge(bytes) => Err(CallError::AnswerTooLarge {
            what: "answer",
            bytes,
            limit: MAX_ANSWER_BYTES,
        }),
        Undecoded::Ok(answer) => serde_json::from_str(&answer).map_err(|e| CallError::Unknown {
            reason: format!("the {op} answer could not be read: {e}"),
        }),
        Undecoded::Err(error) if error.len() > MAX_ANSWER_BYTES => Err(CallError::Unknown {
            reason: format!(
                "the {op} error is {} bytes, over the {MAX_ANSWER_BYTES} the host reads",
                error.len()
            ),
        }),
        Undecoded::Err(error) => {
            let mut e = read_error_str(&error);
            // A provider's error text is logged and stored with the attempt: no secret of the
            // config or of its options may ride along, and no line break may forge a log line.
            e.message = crate::host_side::escape_control(&redactor.redact(&e.message));
            Err(CallError::Provider(e))
        }
        Undecoded::NotSent(reason) => Err(CallError::NotAttempted { reason }),
        Undecoded::Lost(reason) => Err(CallError::Unknown { reason }),
    }
}

/// Where a provider's code runs.
#[derive(Clone)]
pub(crate) enum Backend {
    /// Loaded into this process.
    InProcess(Arc<ProviderBox>),
    /// In a supervised worker process.
    Worker(Arc<crate::worker::Worker>),
}

impl Backend {
    /// One call through the envelope (blocking).
    fn call(&self, op: &str, json: &str, deadline: Instant) -> Undecoded {
        match self {
            Backend::InProcess(object) => {
                let answer = with_call_deadline(deadline, || {
                    object.call(RStr::from_str(op), RStr::from_str(json))
                });
                match answer {
                    RResult::ROk(answer) => Undecoded::Ok(answer.into_string()),
                    RResult::RErr(error) => Undecoded::Err(error.into_string()),
                }
            }
            Backend::Worker(worker) => worker.call(op, json, deadline),
        }
    }
}

fn log_call<T: Answer>(id: &str, op: Operation, elapsed: Duration, result: &Result<T, CallError>) {
    let label = match result {
        Ok(answer) => answer.outcome_label(),
        Err(CallError::NotAttempted { .. }) => "not_attempted",
        Err(CallError::Unknown { .. }) => "unknown",
        Err(CallError::Provider(e)) if e.kind == ErrorKind::Panic => "panic",
        Err(CallError::Provider(_)) => "error",
        Err(CallError::AnswerTooLarge { .. }) => "answer_too_large",
    };
    if let Err(CallError::AnswerTooLarge { what, .. }) = result {
        crate::metrics::global()
            .plugin_limits
            .with_label_values(&[
                id,
                if *what == "data" {
                    "data_bytes"
                } else {
                    "answer_bytes"
                },
            ])
            .inc();
    }
    crate::metrics::global()
        .provider_calls
        .with_label_values(&[id, op.as_str(), label])
        .observe(elapsed.as_secs_f64());
    let ms = elapsed.as_secs_f64() * 1000.0;
    match result {
        Ok(_) => {
            tracing::debug!(provider = id, operation = %op, elapsed_ms = ms, "provider call answered")
        }
        Err(e @ CallError::Provider(pe)) if pe.kind == ErrorKind::Panic => {
            tracing::error!(provider = id, operation = %op, elapsed_ms = ms, code = e.code(), "provider call panicked: {e}")
        }
        Err(e) => {
            tracing::warn!(provider = id, operation = %op, elapsed_ms = ms, code = e.code(), "provider call failed: {e}")
        }
    }
}
