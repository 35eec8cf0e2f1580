//! The lifecycle engine: the only code that changes a status or moves money, for the library API,
//! the server and webhooks alike.
//!
//! Every money-moving call is written ahead: under the entity's lock, check the transition and
//! record an `in_flight` attempt (one atomic write; the database allows one open attempt per
//! session or payment); call the provider with no transaction open; record the outcome and its
//! effects in one atomic write. An outcome the host could not read stays `unknown` and is settled
//! by [`Host::reconcile_due`], never guessed.
//!
//! Files: `sessions` (collections, sessions, authorize), `payments` (capture, refund, cancel),
//! `holders` (account holders and saved methods, with their own write-ahead attempts),
//! `attempts` (the write-ahead core: begin, after_call, settle, ask_about), `reports` (webhooks,
//! syncs), `reconcile`, `idempotency` (client keys), `inputs` (what callers send), `outbox`
//! (which change makes which event, the stream, the deliverer), `lease` (a host's lease on a
//! shared store), `owed` (writes kept through a store outage).

mod attempts;
mod holders;
mod idempotency;
mod inputs;
mod lease;
mod outbox;
mod owed;
mod payments;
mod reconcile;
mod reports;
mod sessions;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use payhost_provider_api::{
    AttemptRef, AuthorizeRequest, CancelRequest, CaptureRequest, DeleteRequest, InitiateRequest,
    Outcome, ProviderError, ProviderResponse, RefundRequest, RemoteStatus, RetrieveRequest,
    UpdateRequest, WebhookAction, WebhookEvent,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use attempts::{Current, Settled};
pub use holders::{AccountHolderUpdate, AccountHolderView, NewAccountHolder, NewPaymentMethod};
pub use inputs::*;
pub use lease::LeaseSettings;
pub use reconcile::{ReconcileReport, ReconcileSettings, ResolveAs};
pub use reports::VerifiedWebhook;

use crate::domain::transitions::{self, PaymentInput, SessionInput, Step};
use crate::domain::*;
use crate::events::EventType;
use crate::plugins::Providers;
use crate::provider::{CallError, Clock, Provider, SystemClock};
use crate::store::{Store, StoreError, WriteOp};

/// Why an engine operation did not happen. [`EngineError::code`] is stable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// No such collection, session, payment or attempt.
    #[error("{kind} `{id}` not found")]
    NotFound {
        /// What was looked for.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A field of the request is wrong; nothing changed.
    #[error("invalid `{field}`: {message}")]
    InvalidInput {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The entity's state does not allow the operation.
    #[error("{0}")]
    InvalidTransition(String),
    /// The provider lacks the capability the operation needs.
    #[error("{0}")]
    Unsupported(String),
    /// The session's provider is not loaded (disabled, removed from the config, or failed).
    #[error("provider `{0}` is not loaded")]
    ProviderNotLoaded(String),
    /// An earlier money operation's outcome is still unknown; nothing new until it resolves.
    #[error(
        "the outcome of {operation} attempt {attempt_id} is not known yet; no new money operation until it is reconciled (or resolved with `payhost attempts resolve`)"
    )]
    AttemptUnresolved {
        /// The open attempt.
        attempt_id: String,
        /// What it was.
        operation: String,
    },
    /// The attempt's provider call may still reach the processor: nobody can say yet whether it
    /// happened.
    #[error(
        "attempt {attempt_id}'s provider call may still reach the processor{}; it cannot be resolved before that",
        until.map(|t| format!(" (until {t}, Unix ms)")).unwrap_or_else(|| " (it is still running in this host)".into())
    )]
    CallMayLand {
        /// The attempt.
        attempt_id: String,
        /// When it no longer can, unless it is still running here.
        until: Option<Timestamp>,
    },
    /// Another operation on the same object is running (on another host, or under the same
    /// idempotency key).
    #[error("{0}")]
    InProgress(String),
    /// The idempotency key was used with another request.
    #[error("idempotency key `{key}` was used with a different request")]
    IdempotencyMismatch {
        /// The key.
        key: String,
    },
    /// The provider declined.
    #[error("declined{}: {message}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Declined {
        /// The provider's code.
        code: Option<String>,
        /// Its message.
        message: String,
    },
    /// The call may or may not have taken effect; recorded, and reconciled in the background.
    #[error("outcome unknown ({reason}); attempt {attempt_id} will be reconciled")]
    OutcomeUnknown {
        /// The attempt.
        attempt_id: String,
        /// Why.
        reason: String,
    },
    /// Nothing reached the processor; safe to retry.
    #[error("not attempted: {reason}")]
    NotAttempted {
        /// Why.
        reason: String,
    },
    /// The provider answered with an error.
    #[error("provider error: {0}")]
    Provider(ProviderError),
    /// A webhook whose signature did not verify; nothing was changed.
    #[error("webhook not verified: {0}")]
    Unverified(String),
    /// The events after this cursor were pruned (delivered and past the retention): the
    /// consumer missed them and must resynchronise from the current state.
    #[error(
        "events up to {pruned_through} were pruned; a consumer at {after} missed some of them (resynchronise from the current state, then read after {pruned_through})"
    )]
    EventsPruned {
        /// The cursor asked for.
        after: i64,
        /// The highest pruned sequence number.
        pruned_through: i64,
    },
    /// A total that cannot be represented (past 2^53 minor units): refused, never wrapped.
    #[error("{0}")]
    AmountOverflow(String),
    /// Storage failed.
    #[error("{0}")]
    Store(StoreError),
}

impl EngineError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::NotFound { .. } => "not_found",
            EngineError::InvalidInput { .. } => "invalid_input",
            EngineError::InvalidTransition(_) => "invalid_transition",
            EngineError::Unsupported(_) => "unsupported",
            EngineError::ProviderNotLoaded(_) => "provider_not_loaded",
            EngineError::AttemptUnresolved { .. } => "attempt_unresolved",
            EngineError::InProgress(_) => "in_progress",
            EngineError::CallMayLand { .. } => "call_may_land",
            EngineError::IdempotencyMismatch { .. } => "idempotency_mismatch",
            EngineError::Declined { .. } => "declined",
            EngineError::OutcomeUnknown { .. } => "outcome_unknown",
            EngineError::NotAttempted { .. } => "not_attempted",
            EngineError::Provider(_) => "provider_error",
            EngineError::Unverified(_) => "unverified",
            EngineError::EventsPruned { .. } => "events_pruned",
            EngineError::AmountOverflow(_) => "amount_overflow",
            EngineError::Store(e) => e.code(),
        }
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        EngineError::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AttemptOpen(what) => EngineError::InProgress(format!(
                "{what} has a money operation in progress; retry when it completes"
            )),
            StoreError::VersionConflict(what) => EngineError::InProgress(format!(
                "{what} was changed by a concurrent operation; retry"
            )),
            other => EngineError::Store(other),
        }
    }
}

tokio::task_local! {
    /// The client idempotency key of the operation running in this task, so that the write that
    /// starts a money movement also links the key to its attempt.
    static CLIENT_KEY: Option<String>;
    /// Who asked for what runs in this task (an API key id), recorded with the attempts it
    /// starts and the resolutions it makes.
    static ACTOR: String;
}

/// Runs `operation` on behalf of `actor` (an API key id): the attempts it starts record it as
/// `requested_by`.
pub async fn acting_as<F: Future>(actor: String, operation: F) -> F::Output {
    ACTOR.scope(actor, operation).await
}

/// Who the running operation acts for, if anyone said.
pub fn current_actor() -> Option<String> {
    ACTOR.try_with(Clone::clone).ok()
}

/// Striped async locks: operations on one session or payment run one at a time in this process
/// (across processes, row versions and the one-open-attempt index do the same).
struct Locks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl Locks {
    fn new() -> Locks {
        Locks {
            stripes: (0..1024).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
    async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        self.stripes[(h % self.stripes.len() as u64) as usize]
            .lock()
            .await
    }
}

/// A money-moving request, whichever its operation.
pub(super) enum MoneyRequest {
    Authorize(AuthorizeRequest),
    Capture(CaptureRequest),
    Refund(RefundRequest),
    Cancel(CancelRequest),
}

type LateFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<ProviderResponse, CallError>> + Send>>;

fn late_boxed<R>(
    (answer, late): (
        Result<ProviderResponse, CallError>,
        Option<crate::provider::LateAnswer<R>>,
    ),
) -> (Result<ProviderResponse, CallError>, Option<LateFuture>)
where
    R: payhost_provider_api::Request<Response = ProviderResponse> + 'static,
{
    (answer, late.map(|l| Box::pin(l.wait()) as LateFuture))
}

/// Attempts whose provider call is running in this process (counted: a call sent again may
/// overlap the first). While one is, its outcome can still change at the processor.
#[derive(Default)]
struct LiveCalls(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl LiveCalls {
    fn enter(self: &Arc<Self>, attempt_id: &str) -> LiveCall {
        let mut calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry(attempt_id.to_owned()).or_default() += 1;
        LiveCall {
            calls: self.clone(),
            attempt_id: attempt_id.to_owned(),
        }
    }
    fn contains(&self, attempt_id: &str) -> bool {
        let calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        calls.contains_key(attempt_id)
    }
}

/// One live call; it ends when this is dropped.
struct LiveCall {
    calls: Arc<LiveCalls>,
    attempt_id: String,
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        let mut calls = self.calls.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.attempt_id) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.attempt_id);
            }
        }
    }
}

/// A call's late answer, for its attempt.
type Late = (String, Result<ProviderResponse, CallError>);

/// Answers of calls that returned after their deadline, waiting to settle their attempts.
#[derive(Clone)]
struct LateQueue {
    tx: tokio::sync::mpsc::UnboundedSender<Late>,
    rx: Arc<std::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Late>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl LateQueue {
    fn new() -> LateQueue {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        LateQueue {
            tx,
            rx: Arc::new(std::sync::Mutex::new(rx)),
            arrived: Arc::new(tokio::sync::Notify::new()),
        }
    }
    fn push(&self, attempt_id: String, answer: Result<ProviderResponse, CallError>) {
        let _ = self.tx.send((attempt_id, answer));
        self.arrived.notify_one();
    }
    /// Puts an answer back to try at the next pass (the store did not answer): no wake-up, so
    /// an unreachable store is not hammered.
    fn requeue(&self, attempt_id: String, answer: Result<ProviderResponse, CallError>) {
        let _ = self.tx.send((attempt_id, answer));
    }
    fn drain(&self) -> Vec<Late> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.push(item);
        }
        out
    }
}

/// The payment-session host: the engine over a store and the loaded providers.
pub struct Host {
    store: Arc<dyn Store>,
    /// The providers now: a reload swaps them whole; an operation takes its provider once.
    providers: std::sync::RwLock<Arc<Providers>>,
    clock: Arc<dyn Clock>,
    locks: Locks,
    reconcile: ReconcileSettings,
    live: Arc<LiveCalls>,
    late: LateQueue,
    recovered: std::sync::atomic::AtomicBool,
    lease: LeaseSettings,
    lease_ok: Arc<std::sync::atomic::AtomicBool>,
    lease_keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    owed: owed::OwedWrites,
    /// The event settings now: a reload swaps them whole (a write reads them once).
    events: std::sync::RwLock<Arc<crate::events::EventSettings>>,
    /// Woken when a reload swapped the event settings (the deliverer follows).
    events_swapped: Arc<tokio::sync::Notify>,
    /// Held for writing while a reload swaps a generation, for reading while a request pins
    /// one: a request never sees half of two.
    generations: std::sync::RwLock<()>,
}

/// One generation of what a reload swaps (the providers, the event settings), pinned for a
/// request: everything the request does uses it, whatever a reload swaps meanwhile.
#[derive(Clone)]
pub struct Pinned {
    providers: Arc<Providers>,
    events: Arc<crate::events::EventSettings>,
}

tokio::task_local! {
    /// The generation the running request pinned, if it pinned one.
    static PINNED: Pinned;
}

impl Drop for Host {
    fn drop(&mut self) {
        // A host dropped without giving its lease up lets it lapse, as if it had died.
        if let Some(keeper) = self
            .lease_keeper
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            keeper.abort();
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("providers", &self.providers())
            .finish_non_exhaustive()
    }
}

/// The state an attempt settles in, given what its provider answered (an unknown outcome stays
/// open).
fn settled_state(outcome: &Outcome) -> AttemptState {
    match outcome {
        Outcome::Processed | Outcome::RequiresMore { .. } | Outcome::Pending => {
            AttemptState::Succeeded
        }
        Outcome::Declined { .. } | Outcome::NotAttempted { .. } => AttemptState::Failed,
        Outcome::Unknown { .. } => AttemptState::Unknown,
    }
}

/// What a plugin built before provider-api 1.3 expects in `data`: the caller's fields merged
/// over the provider's (it knows no `input`). Newer plugins get the provider's data untouched.
fn with_legacy_input(provider: &Provider, data: &Value, input: &Value) -> Value {
    if input.is_null() || !provider.predates_input() {
        return data.clone();
    }
    match (data, input) {
        (Value::Object(a), Value::Object(b)) => {
            let mut out = a.clone();
            for (k, v) in b {
                out.insert(k.clone(), v.clone());
            }
            Value::Object(out)
        }
        (Value::Null, _) => input.clone(),
        _ => data.clone(),
    }
}

/// Field names that hold card data. The caller's input is never stored; a provider that copies
/// one of these into the data it returns has it removed (and is named in the log).
const CARD_FIELDS: &[&str] = &[
    "card_number",
    "cvc",
    "cvv",
    "cvc2",
    "cvv2",
    "security_code",
    "pan",
];

/// The data a provider returned, fit to store: card numbers and CVCs removed.
fn provider_data(provider: &Provider, data: Option<Value>) -> Option<Value> {
    let mut data = data?;
    let mut removed = Vec::new();
    scrub(&mut data, "data", false, &mut removed);
    if !removed.is_empty() {
        tracing::warn!(
            provider = provider.id(),
            fields = ?removed,
            "the provider returned card data in its data; removed before storing (a provider must return only references and tokens)"
        );
    }
    Some(data)
}

fn scrub(value: &mut Value, path: &str, in_card: bool, removed: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let doomed: Vec<String> = map
                .keys()
                .filter(|k| {
                    let k = k.to_ascii_lowercase();
                    CARD_FIELDS.contains(&k.as_str()) || (in_card && k == "number")
                })
                .cloned()
                .collect();
            for k in doomed {
                map.remove(&k);
                removed.push(format!("{path}.{k}"));
            }
            for (k, v) in map.iter_mut() {
                scrub(
                    v,
                    &format!("{path}.{k}"),
                    k.eq_ignore_ascii_case("card"),
                    removed,
                );
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                scrub(v, &format!("{path}[{i}]"), in_card, removed);
            }
        }
        _ => {}
    }
}

/// Why a host could not be opened from a config.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `storage.url` names a store this build cannot open.
    #[error("storage.url: {0}")]
    Storage(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Start-up reconciliation failed.
    #[error("start-up reconciliation failed: {0}")]
    Recover(#[from] EngineError),
}

/// Opens the store `config.storage.url` names (migrations applied).
pub async fn open_store(config: &crate::Config) -> Result<Arc<dyn Store>, OpenError> {
    let storage = &config.storage;
    match &storage.url {
        crate::config::StorageUrl::Postgres(url) => {
            let settings = crate::store::postgres::PostgresSettings {
                pool_size: storage.pool_size,
                acquire_timeout: Duration::from_millis(storage.connect_timeout_ms),
                statement_timeout: Duration::from_millis(storage.statement_timeout_ms),
            };
            let store = crate::store::postgres::PostgresStore::open(url, &settings).await?;
            Ok(Arc::new(store))
        }
        crate::config::StorageUrl::Sqlite(path) => {
            let path = path.clone();
            let store =
                tokio::task::spawn_blocking(move || crate::store::sqlite::SqliteStore::open(path))
                    .await
                    .map_err(|e| OpenError::Storage(e.to_string()))??;
            Ok(Arc::new(store))
        }
    }
}

/// The reconciler's settings from `config`'s `[reconcile]` and its providers' timeouts.
pub fn reconcile_settings(config: &crate::Config, providers: &Providers) -> ReconcileSettings {
    let max_timeout = providers
        .iter()
        .map(|p| p.timeout().as_millis() as i64)
        .max()
        .unwrap_or(0);
    let r = &config.reconcile;
    ReconcileSettings {
        // A live host's call ends within its timeout; twice that plus a margin is abandoned.
        stale_after_ms: 2 * max_timeout + 10_000,
        first_check_ms: r.first_check_ms as i64,
        max_checks: i64::from(r.max_checks),
        landing_margin_ms: r.landing_margin_ms as i64,
        interval: Duration::from_millis(r.interval_ms.max(10)),
        ..ReconcileSettings::default()
    }
}

/// Opens `config`'s store for an operator's changes to the outbox: a shared store as usual, an
/// embedded database that a running host has beside it ([`crate::store::sqlite::SqliteStore::open_beside`]).
pub async fn open_store_for_outbox(config: &crate::Config) -> Result<Arc<dyn Store>, OpenError> {
    match open_store(config).await {
        Err(OpenError::Store(StoreError::Locked(_))) => {
            let path = config
                .storage
                .url
                .sqlite_path()
                .ok_or_else(|| OpenError::Storage("only a SQLite store is locked".into()))?;
            let store = crate::store::sqlite::SqliteStore::open_beside(path)?;
            Ok(Arc::new(store))
        }
        other => other,
    }
}

/// Opens `config`'s embedded database read-only, beside the host that has it.
pub fn open_store_read_only(config: &crate::Config) -> Result<Arc<dyn Store>, OpenError> {
    let path = config
        .storage
        .url
        .sqlite_path()
        .ok_or_else(|| OpenError::Storage("only a SQLite store opens read-only".into()))?;
    let store = crate::store::sqlite::SqliteStore::open_read_only(path)?;
    Ok(Arc::new(store))
}

impl Host {
    /// Opens the store of `config`, takes `providers`, and takes over what a previous run left
    /// in flight (marked unknown: the reconciler's first pass asks about it, see
    /// [`Host::recovered`]).
    pub async fn open(config: &crate::Config, providers: Providers) -> Result<Host, OpenError> {
        let store = open_store(config).await?;
        let settings = reconcile_settings(config, &providers);
        let host = Host::new(store, providers)
            .with_reconcile(settings)
            .with_events(config.events.clone())
            .with_lease(LeaseSettings {
                lease: Duration::from_millis(config.storage.lease_ms),
                renew: Duration::from_millis(config.storage.renew_ms),
            });
        host.register().await?;
        // Asking the providers about what the previous run left open is the reconciler's first
        // pass, so that the host serves meanwhile (those attempts block only their payments).
        host.take_over_abandoned().await?;
        Ok(host)
    }

    /// A host over `store` and `providers`. Call [`Host::recover`] before serving.
    pub fn new(store: Arc<dyn Store>, providers: Providers) -> Host {
        Host {
            store,
            providers: std::sync::RwLock::new(Arc::new(providers)),
            clock: Arc::new(SystemClock),
            locks: Locks::new(),
            reconcile: ReconcileSettings::default(),
            live: Arc::default(),
            late: LateQueue::new(),
            recovered: std::sync::atomic::AtomicBool::new(false),
            lease: LeaseSettings::default(),
            lease_ok: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            lease_keeper: std::sync::Mutex::new(None),
            owed: owed::OwedWrites::default(),
            events: std::sync::RwLock::default(),
            events_swapped: Arc::default(),
            generations: std::sync::RwLock::new(()),
        }
    }

    /// Replaces the clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Host {
        self.clock = clock;
        self
    }

    /// Replaces the lease settings (shared stores).
    pub fn with_lease(mut self, settings: LeaseSettings) -> Host {
        self.lease = settings;
        self
    }

    /// Now on the store's clock: the database's on a shared store (hosts' clocks never decide
    /// whether another host's call can still land), this host's otherwise.
    pub(super) async fn store_now(&self) -> Result<Timestamp, EngineError> {
        if self.store.shared() {
            Ok(self.store.now_ms().await?)
        } else {
            Ok(self.now())
        }
    }

    /// Replaces the reconciler's settings.
    pub fn with_reconcile(mut self, settings: ReconcileSettings) -> Host {
        self.reconcile = settings;
        self
    }

    /// The providers: the running request's pinned generation, else the current one.
    pub fn providers(&self) -> Arc<Providers> {
        PINNED
            .try_with(|p| p.providers.clone())
            .unwrap_or_else(|_| {
                self.providers
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
    }

    /// The current generation, and `also` (the caller's part of it: the API keys) read with it,
    /// never across a reload's swap.
    pub fn pin<T>(&self, also: impl FnOnce() -> T) -> (Pinned, T) {
        let _reading = self.generations.read().unwrap_or_else(|e| e.into_inner());
        let pinned = Pinned {
            providers: self
                .providers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            events: self
                .events
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        (pinned, also())
    }

    /// Runs `f` with `pinned` as its generation (what a request does runs so).
    pub async fn with_pinned<F: Future>(pinned: Pinned, f: F) -> F::Output {
        PINNED.scope(pinned, f).await
    }

    /// Runs `swap` (a reload's swaps) while no request pins a generation.
    pub fn swapping<T>(&self, swap: impl FnOnce() -> T) -> T {
        let _writing = self.generations.write().unwrap_or_else(|e| e.into_inner());
        swap()
    }

    /// Swaps the providers (a reload): operations from now on take theirs from `providers`;
    /// one that took its provider before finishes on it.
    pub fn swap_providers(&self, providers: Providers) {
        *self.providers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(providers);
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(super) fn now(&self) -> Timestamp {
        self.clock.now_unix_ms()
    }

    pub(super) fn provider(&self, id: &str) -> Result<Arc<Provider>, EngineError> {
        self.providers()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::ProviderNotLoaded(id.to_owned()))
    }

    /// The provider for something new (a session, an account holder): loaded and not disabled
    /// by a reload.
    pub(super) fn open_provider(&self, id: &str) -> Result<Arc<Provider>, EngineError> {
        let providers = self.providers();
        match providers.get(id) {
            Some(p) if providers.is_open(id) => Ok(p.clone()),
            Some(_) => Err(EngineError::ProviderNotLoaded(format!(
                "{id}` is disabled: it finishes what it has open but takes nothing new; `{id}"
            ))),
            None => Err(EngineError::ProviderNotLoaded(id.to_owned())),
        }
    }

    // ---------------------------------------------------------------- reads

    /// A collection with its derived status, sessions and payments.
    pub async fn collection(&self, id: &str) -> Result<CollectionView, EngineError> {
        let id = CollectionId::parse(id).ok_or_else(|| not_found("payment collection", id))?;
        let collection = self
            .store
            .collection(&id)
            .await?
            .ok_or_else(|| not_found("payment collection", id.as_str()))?;
        let sessions = self.store.sessions_by_collection(&id).await?;
        let payments = self.store.payments_by_collection(&id).await?;
        let (status, authorized, captured, refunded) =
            transitions::collection(collection.amount, &sessions, &payments)
                .map_err(|e| EngineError::AmountOverflow(format!("collection {id}: {e}")))?;
        Ok(CollectionView {
            collection,
            status,
            authorized_amount: authorized,
            captured_amount: captured,
            refunded_amount: refunded,
            payment_sessions: sessions,
            payments,
        })
    }

    /// A session.
    pub async fn session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let sid = SessionId::parse(id).ok_or_else(|| not_found("payment session", id))?;
        self.store
            .session(&sid)
            .await?
            .ok_or_else(|| not_found("payment session", id))
    }

    /// Sessions of a cart, oldest first.
    pub async fn sessions_of_cart(
        &self,
        cart_id: &str,
    ) -> Result<Vec<PaymentSession>, EngineError> {
        Ok(self.store.sessions_by_cart(cart_id).await?)
    }

    /// Sessions created with the caller's `reference`, oldest first.
    pub async fn sessions_with_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<PaymentSession>, EngineError> {
        Ok(self.store.sessions_by_reference(reference).await?)
    }

    /// Sessions of a collection, oldest first.
    pub async fn sessions_of_collection(
        &self,
        id: &str,
    ) -> Result<Vec<PaymentSession>, EngineError> {
        let id = CollectionId::parse(id).ok_or_else(|| not_found("payment collection", id))?;
        Ok(self.store.sessions_by_collection(&id).await?)
    }

    /// A payment with its captures and refunds.
    pub async fn payment(&self, id: &str) -> Result<Payment, EngineError> {
        let pid = PaymentId::parse(id).ok_or_else(|| not_found("payment", id))?;
        self.store
            .payment(&pid)
            .await?
            .ok_or_else(|| not_found("payment", id))
    }

    /// Attempts whose outcome is still open.
    pub async fn open_attempts(&self) -> Result<Vec<Attempt>, EngineError> {
        Ok(self.store.open_attempts().await?)
    }

    /// Every attempt concerning a session or payment.
    pub async fn attempts_of(&self, entity_id: &str) -> Result<Vec<Attempt>, EngineError> {
        Ok(self.store.attempts_of(entity_id).await?)
    }
}

/// For operations that move no money: a key is never linked to an attempt.
async fn no_attempt<T>(_: Attempt) -> Result<Option<T>, EngineError> {
    Ok(None)
}

/// Whether the session table allows a caller's command in this status.
fn allow(status: SessionStatus, command: SessionInput<'_>) -> Result<(), EngineError> {
    match transitions::session(status, command) {
        Step::Refused(why) => Err(EngineError::InvalidTransition(why)),
        _ => Ok(()),
    }
}

/// Turns a non-money call's result into its response, or the error the caller should see.
fn definitive(
    answer: Result<ProviderResponse, CallError>,
    what: &str,
) -> Result<ProviderResponse, EngineError> {
    let response = answer.map_err(call_error)?;
    match &response.outcome {
        Outcome::Processed | Outcome::Pending | Outcome::RequiresMore { .. } => Ok(response),
        Outcome::Declined { code, message } => Err(EngineError::Declined {
            code: code.clone(),
            message: message.clone(),
        }),
        Outcome::NotAttempted { reason } => Err(EngineError::NotAttempted {
            reason: reason.clone(),
        }),
        Outcome::Unknown { reason } => Err(EngineError::NotAttempted {
            reason: format!("{what} outcome unknown ({reason}); it moves no money, retry it"),
        }),
    }
}

fn call_error(e: CallError) -> EngineError {
    match e {
        CallError::Provider(pe) => EngineError::Provider(pe),
        CallError::NotAttempted { reason } | CallError::Unknown { reason } => {
            EngineError::NotAttempted { reason }
        }
        e @ CallError::AnswerTooLarge { .. } => EngineError::NotAttempted {
            reason: e.to_string(),
        },
    }
}

fn not_found(kind: &'static str, id: &str) -> EngineError {
    EngineError::NotFound {
        kind,
        id: id.to_owned(),
    }
}
