//! The lifecycle engine: the only code that changes a status or moves money, for the library API,
//! the server and webhooks alike.
//!
//! Every money-moving call follows DESIGN.md §4: under the entity's lock, check the transition and
//! record an `in_flight` attempt (one atomic write; the database allows one open attempt per
//! session or payment); call the provider with no transaction open; record the outcome and its
//! effects in one atomic write. An outcome the host could not read stays `unknown` and is settled
//! by [`Host::reconcile_due`], never guessed.

mod inputs;
mod reconcile;

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

pub use inputs::*;
pub use reconcile::{ReconcileReport, ReconcileSettings, ResolveAs};

use crate::domain::transitions::{self, PaymentInput, SessionInput, Step};
use crate::domain::*;
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
            EngineError::IdempotencyMismatch { .. } => "idempotency_mismatch",
            EngineError::Declined { .. } => "declined",
            EngineError::OutcomeUnknown { .. } => "outcome_unknown",
            EngineError::NotAttempted { .. } => "not_attempted",
            EngineError::Provider(_) => "provider_error",
            EngineError::Unverified(_) => "unverified",
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

/// The payment-session host: the engine over a store and the loaded providers.
pub struct Host {
    store: Arc<dyn Store>,
    providers: Providers,
    clock: Arc<dyn Clock>,
    locks: Locks,
    reconcile: ReconcileSettings,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

fn moved(outcome: &Outcome) -> AttemptState {
    match outcome {
        Outcome::Processed | Outcome::RequiresMore { .. } | Outcome::Pending => {
            AttemptState::Succeeded
        }
        Outcome::Declined { .. } | Outcome::NotAttempted { .. } => AttemptState::Failed,
        Outcome::Unknown { .. } => AttemptState::Unknown,
    }
}

fn merge(base: &Value, over: &Value) -> Value {
    match (base, over) {
        (Value::Object(a), Value::Object(b)) => {
            let mut out = a.clone();
            for (k, v) in b {
                out.insert(k.clone(), v.clone());
            }
            Value::Object(out)
        }
        (_, Value::Null) => base.clone(),
        _ => over.clone(),
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
    let url = &storage.url;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let settings = crate::store::postgres::PostgresSettings {
            pool_size: storage.pool_size,
            acquire_timeout: Duration::from_millis(storage.connect_timeout_ms),
            statement_timeout: Duration::from_millis(storage.statement_timeout_ms),
        };
        let store = crate::store::postgres::PostgresStore::open(url, &settings).await?;
        return Ok(Arc::new(store));
    }
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Err(OpenError::Storage(format!(
            "`{}` is not supported (use sqlite://<file> or postgres://…)",
            url.split("://").next().unwrap_or(url)
        )));
    };
    if path.is_empty() {
        return Err(OpenError::Storage("sqlite:// needs a file path".into()));
    }
    let path = config.dir.join(path);
    let store = tokio::task::spawn_blocking(move || crate::store::sqlite::SqliteStore::open(path))
        .await
        .map_err(|e| OpenError::Storage(e.to_string()))??;
    Ok(Arc::new(store))
}

impl Host {
    /// Opens the store of `config`, takes `providers`, and recovers: in-flight attempts of a
    /// previous run are reconciled before the host is returned.
    pub async fn open(config: &crate::Config, providers: Providers) -> Result<Host, OpenError> {
        let store = open_store(config).await?;
        let max_timeout = providers
            .iter()
            .map(|p| p.timeout().as_millis() as i64)
            .max()
            .unwrap_or(0);
        let host = Host::new(store, providers).with_reconcile(ReconcileSettings {
            // A live host's call ends within its timeout; twice that plus a margin is abandoned.
            stale_after_ms: 2 * max_timeout + 10_000,
            ..ReconcileSettings::default()
        });
        let report = host.recover().await?;
        if report != ReconcileReport::default() {
            tracing::info!(?report, "start-up reconciliation");
        }
        Ok(host)
    }

    /// A host over `store` and `providers`. Call [`Host::recover`] before serving.
    pub fn new(store: Arc<dyn Store>, providers: Providers) -> Host {
        Host {
            store,
            providers,
            clock: Arc::new(SystemClock),
            locks: Locks::new(),
            reconcile: ReconcileSettings::default(),
        }
    }

    /// Replaces the clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Host {
        self.clock = clock;
        self
    }

    /// Replaces the reconciler's settings.
    pub fn with_reconcile(mut self, settings: ReconcileSettings) -> Host {
        self.reconcile = settings;
        self
    }

    /// The loaded providers.
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn now(&self) -> Timestamp {
        self.clock.now_unix_ms()
    }

    fn provider(&self, id: &str) -> Result<&Arc<Provider>, EngineError> {
        self.providers
            .get(id)
            .ok_or_else(|| EngineError::ProviderNotLoaded(id.to_owned()))
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
            transitions::collection(collection.amount, &sessions, &payments);
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

    // ------------------------------------------------------ idempotency

    /// Runs `f` once per client idempotency key: a repeated key with the same request replays the
    /// stored result, with another request it is an error. No key: runs `f`.
    ///
    /// A key whose operation started a money movement is linked to that attempt in the same
    /// write, and is never released: if the process dies before the result is stored, or the
    /// outcome was unknown, a retry with the key is answered from the attempt once it is settled
    /// (`rebuild`), or told it is still pending, and never moves money a second time. `rebuild`
    /// returning `None` (the attempt failed, nothing moved) lets the retry run afresh.
    async fn idempotent<T, F, Fut, R, RFut>(
        &self,
        key: Option<&str>,
        operation: &str,
        request: &impl Serialize,
        rebuild: R,
        f: F,
    ) -> Result<T, EngineError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<T>, EngineError>>,
    {
        let Some(key) = key else {
            return CLIENT_KEY.scope(None, f()).await;
        };
        if key.is_empty() || key.len() > 255 {
            return Err(EngineError::invalid(
                "idempotency_key",
                "must be 1 to 255 characters",
            ));
        }
        let request = serde_json::to_string(request).unwrap_or_default();
        let hash = hex::encode(Sha256::digest(format!("{operation}\n{request}")));
        let claim = WriteOp::ClaimKey {
            key: key.to_owned(),
            operation: operation.to_owned(),
            request_hash: hash.clone(),
            at: self.now(),
        };
        match self.store.write(vec![claim.clone()]).await {
            Ok(()) => {}
            Err(StoreError::KeyExists(_)) => {
                let stored = self.store.key(key).await?;
                let stored = match stored {
                    Some(s) if s.operation != operation || s.request_hash != hash => {
                        return Err(EngineError::IdempotencyMismatch {
                            key: key.to_owned(),
                        });
                    }
                    Some(s) => s,
                    None => {
                        return Err(EngineError::InProgress(format!(
                            "a request with idempotency key `{key}` just finished without effect; retry"
                        )));
                    }
                };
                if let Some(response) = stored.response {
                    return serde_json::from_value(response).map_err(|e| {
                        EngineError::Store(StoreError::Unavailable(format!(
                            "stored response for key `{key}` is unreadable: {e}"
                        )))
                    });
                }
                let Some(attempt_id) = stored.attempt_id else {
                    return Err(EngineError::InProgress(format!(
                        "a request with idempotency key `{key}` is in progress"
                    )));
                };
                let attempt = self
                    .store
                    .attempt(&attempt_id)
                    .await?
                    .ok_or_else(|| not_found("attempt", &attempt_id))?;
                if attempt.state.is_open() {
                    return Err(EngineError::AttemptUnresolved {
                        attempt_id,
                        operation: attempt.operation.as_str().to_owned(),
                    });
                }
                match rebuild(attempt).await? {
                    Some(value) => {
                        self.store
                            .write(vec![WriteOp::CompleteKey {
                                key: key.to_owned(),
                                response: serde_json::to_value(&value).unwrap_or(Value::Null),
                            }])
                            .await?;
                        return Ok(value);
                    }
                    None => {
                        // The attempt failed and moved nothing: this request may run afresh.
                        self.store
                            .write(vec![WriteOp::ForgetKey(key.to_owned()), claim])
                            .await?;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
        let result = CLIENT_KEY.scope(Some(key.to_owned()), f()).await;
        let write = match &result {
            Ok(value) => WriteOp::CompleteKey {
                key: key.to_owned(),
                response: serde_json::to_value(value).unwrap_or(Value::Null),
            },
            // A key linked to an attempt stays; an unlinked one (nothing moved) is released.
            Err(_) => WriteOp::ReleaseKey(key.to_owned()),
        };
        self.store.write(vec![write]).await?;
        result
    }

    /// What to answer a retried money request whose first run ended unrecorded: the payment as
    /// it stands if its attempt succeeded; `None` (run again) if it failed.
    async fn rebuild_payment(&self, attempt: Attempt) -> Result<Option<Payment>, EngineError> {
        if attempt.state != AttemptState::Succeeded {
            return Ok(None);
        }
        let id = attempt.payment_id.map(|p| p.0).unwrap_or_default();
        self.payment(&id).await.map(Some)
    }

    /// What to answer a retried authorize whose first run ended unrecorded: the session as it
    /// stands, with the attempt's next action or decline.
    async fn rebuild_authorize(
        &self,
        attempt: Attempt,
    ) -> Result<Option<AuthorizeResult>, EngineError> {
        let outcome: Option<Outcome> = attempt
            .outcome
            .clone()
            .and_then(|o| serde_json::from_value(o).ok());
        if attempt.state == AttemptState::Failed
            && !matches!(outcome, Some(Outcome::Declined { .. }))
        {
            return Ok(None);
        }
        let session = self.session(attempt.session_id.as_str()).await?;
        let payment = self.store.payment_of_session(&session.id).await?;
        let mut result = AuthorizeResult::of(session, payment);
        match outcome {
            Some(Outcome::RequiresMore { next_action }) => result.next_action = Some(next_action),
            Some(Outcome::Declined { code, message }) => {
                result.decline = Some(Decline { code, message })
            }
            _ => {}
        }
        Ok(Some(result))
    }

    // ------------------------------------------------------ collections

    /// Creates a payment collection.
    pub async fn create_collection(
        &self,
        input: NewCollection,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentCollection, EngineError> {
        self.idempotent(
            idempotency_key,
            "create_collection",
            &input,
            no_attempt,
            || async {
                let money =
                    Money::new(input.amount, &input.currency_code).map_err(|e| match e {
                        MoneyError::UnknownCurrency(_) => {
                            EngineError::invalid("currency_code", e.to_string())
                        }
                        _ => EngineError::invalid("amount", e.to_string()),
                    })?;
                let now = self.now();
                let collection = PaymentCollection {
                    id: CollectionId::generate(),
                    amount: money.amount,
                    currency_code: money.currency,
                    metadata: input.metadata.clone(),
                    created_at: now,
                    updated_at: now,
                };
                self.store
                    .write(vec![WriteOp::InsertCollection(collection.clone())])
                    .await?;
                Ok(collection)
            },
        )
        .await
    }

    // ------------------------------------------------------ sessions

    /// Creates a session for a collection and, unless `initiate` is false (a Medusa v1
    /// placeholder), initiates it with the provider.
    pub async fn create_session(
        &self,
        input: NewSession,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(idempotency_key, "create_session", &input, no_attempt, || async {
            let collection_id = CollectionId::parse(&input.payment_collection_id)
                .ok_or_else(|| not_found("payment collection", &input.payment_collection_id))?;
            let collection = self
                .store
                .collection(&collection_id)
                .await?
                .ok_or_else(|| not_found("payment collection", collection_id.as_str()))?;
            self.provider(&input.provider_id)?;
            if let Some(code) = &input.currency_code {
                let currency = Currency::parse(code).ok_or_else(|| {
                    EngineError::invalid(
                        "currency_code",
                        format!("`{code}` is not an ISO 4217 currency code"),
                    )
                })?;
                if currency != collection.currency_code {
                    return Err(EngineError::invalid(
                        "currency_code",
                        format!(
                            "currency mismatch: the collection is in {}, the session in {currency}",
                            collection.currency_code
                        ),
                    ));
                }
            }
            let amount = input.amount.unwrap_or(collection.amount);
            Money::of(amount, collection.currency_code)
                .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
            if let Some(cart) = &input.cart_id
                && (cart.is_empty() || cart.len() > 255)
            {
                return Err(EngineError::invalid(
                    "cart_id",
                    "must be 1 to 255 characters",
                ));
            }
            let now = self.now();
            let session = PaymentSession {
                id: SessionId::generate(),
                payment_collection_id: collection_id,
                cart_id: input.cart_id.clone(),
                cart: input.cart.clone(),
                context: input.context.clone(),
                provider_id: input.provider_id.clone(),
                is_selected: false,
                is_initiated: false,
                status: SessionStatus::Pending,
                data: input.data.clone(),
                idempotency_key: format!("psk_{}", uuid::Uuid::new_v4().simple()),
                amount,
                currency_code: collection.currency_code,
                payment_authorized_at: None,
                metadata: input.metadata.clone(),
                created_at: now,
                updated_at: now,
                version: 1,
            };
            self.store
                .write(vec![WriteOp::InsertSession(session.clone())])
                .await?;
            if !input.initiate {
                return Ok(session);
            }
            let _guard = self.locks.lock(session.id.as_str()).await;
            self.initiate_locked(session).await
        })
        .await
    }

    /// Initiates a placeholder session with its provider (Medusa v1: when it is selected).
    pub async fn initiate_session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let session = self.session(id).await?;
        let _guard = self.locks.lock(session.id.as_str()).await;
        let session = self.session(id).await?;
        if session.is_initiated {
            return Ok(session);
        }
        self.initiate_locked(session).await
    }

    async fn initiate_locked(
        &self,
        mut session: PaymentSession,
    ) -> Result<PaymentSession, EngineError> {
        allow(session.status, SessionInput::Update)?;
        let provider = self.provider(&session.provider_id)?;
        let key = format!("{}:initiate:{}", session.idempotency_key, session.amount);
        let response = provider.call(Self::initiate_request(&session, key)).await;
        let response = definitive(response, "initiate")?;
        let expected = session.version;
        session.is_initiated = true;
        if let Some(data) = response.data {
            session.data = data;
        }
        self.save_session(session, expected).await
    }

    /// Changes a session's amount, cart, context, data or metadata; the provider is told (or the
    /// payment recreated with it, where it cannot update an amount).
    pub async fn update_session(
        &self,
        id: &str,
        input: SessionUpdate,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("update_session:{id}"),
            &input,
            no_attempt,
            || async {
                let _guard = self.locks.lock(id).await;
                let mut session = self.session(id).await?;
                allow(session.status, SessionInput::Update)?;
                self.refuse_if_open(session.id.as_str()).await?;
                let expected = session.version;
                let amount_changed = match input.amount {
                    Some(a) => {
                        Money::of(a, session.currency_code)
                            .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
                        a != session.amount
                    }
                    None => false,
                };
                if let Some(a) = input.amount {
                    session.amount = a;
                }
                if let Some(cart) = &input.cart {
                    session.cart = cart.clone();
                }
                if let Some(context) = &input.context {
                    session.context = context.clone();
                }
                if let Some(data) = &input.data {
                    session.data = merge(&session.data, data);
                }
                if let Some(metadata) = &input.metadata {
                    session.metadata = metadata.clone();
                }
                if session.is_initiated {
                    let provider = self.provider(&session.provider_id)?;
                    let key = format!("{}:update:{}", session.idempotency_key, session.version);
                    let response = if amount_changed
                        && !provider.manifest().capabilities.update_amount
                    {
                        // Recreate: forget the old payment at the provider, start a new one.
                        definitive(
                            provider
                                .call(DeleteRequest {
                                    session_id: session.id.0.clone(),
                                    idempotency_key: format!("{key}:delete"),
                                    amount: session.amount,
                                    currency_code: session.currency_code.code().to_owned(),
                                    data: session.data.clone(),
                                    deadline_unix_ms: None,
                                })
                                .await,
                            "delete",
                        )?;
                        definitive(
                            provider
                                .call(Self::initiate_request(&session, format!("{key}:initiate")))
                                .await,
                            "initiate",
                        )?
                    } else {
                        definitive(
                            provider
                                .call(UpdateRequest {
                                    session_id: session.id.0.clone(),
                                    idempotency_key: key,
                                    amount: session.amount,
                                    currency_code: session.currency_code.code().to_owned(),
                                    context: session.context.clone(),
                                    data: session.data.clone(),
                                    deadline_unix_ms: None,
                                })
                                .await,
                            "update",
                        )?
                    };
                    if let Some(data) = response.data {
                        session.data = data;
                    }
                }
                self.save_session(session, expected).await
            },
        )
        .await
    }

    /// Selects a session: the one selected for its cart and for its collection (the others are
    /// unselected). A placeholder is initiated on selection.
    pub async fn select_session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let guard = self.locks.lock(id).await;
        let session = self.session(id).await?;
        if matches!(
            session.status,
            SessionStatus::Error | SessionStatus::Canceled
        ) {
            return Err(EngineError::InvalidTransition(format!(
                "a session that is {} cannot be selected",
                session.status.as_str()
            )));
        }
        self.store
            .write(vec![WriteOp::SelectSession(session.id.clone())])
            .await?;
        drop(guard);
        if !session.is_initiated && session.status == SessionStatus::Pending {
            return self.initiate_session(id).await;
        }
        self.session(id).await
    }

    /// Deletes a session that was never authorized: the provider is told, and the session is kept
    /// as `canceled` (history is never lost).
    pub async fn delete_session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let _guard = self.locks.lock(id).await;
        let mut session = self.session(id).await?;
        allow(session.status, SessionInput::Delete)?;
        self.refuse_if_open(session.id.as_str()).await?;
        if session.is_initiated {
            let provider = self.provider(&session.provider_id)?;
            definitive(
                provider
                    .call(DeleteRequest {
                        session_id: session.id.0.clone(),
                        idempotency_key: format!("{}:delete", session.idempotency_key),
                        amount: session.amount,
                        currency_code: session.currency_code.code().to_owned(),
                        data: session.data.clone(),
                        deadline_unix_ms: None,
                    })
                    .await,
                "delete",
            )?;
        }
        let expected = session.version;
        session.status = SessionStatus::Canceled;
        session.is_selected = false;
        self.save_session(session, expected).await
    }

    /// Writes a changed session over the version it was read at (`expected`), bumping it.
    async fn save_session(
        &self,
        mut session: PaymentSession,
        expected: i64,
    ) -> Result<PaymentSession, EngineError> {
        session.version = expected + 1;
        session.updated_at = self.now();
        self.store
            .write(vec![WriteOp::UpdateSession {
                session: session.clone(),
                expected_version: expected,
            }])
            .await?;
        Ok(session)
    }

    /// The initiate request for a session, under `key`.
    fn initiate_request(session: &PaymentSession, key: String) -> InitiateRequest {
        InitiateRequest {
            session_id: session.id.0.clone(),
            idempotency_key: key,
            amount: session.amount,
            currency_code: session.currency_code.code().to_owned(),
            context: session.context.clone(),
            data: session.data.clone(),
            deadline_unix_ms: None,
        }
    }

    async fn refuse_if_open(&self, entity: &str) -> Result<(), EngineError> {
        if let Some(open) = self
            .store
            .attempts_of(entity)
            .await?
            .into_iter()
            .find(|a| a.state.is_open())
        {
            return Err(EngineError::AttemptUnresolved {
                attempt_id: open.id.0,
                operation: open.operation.as_str().to_owned(),
            });
        }
        Ok(())
    }

    /// Records an attempt, bumps the entity's version and links the client's idempotency key
    /// (if any) to the attempt, in one write.
    async fn begin(&self, attempt: &Attempt, bump: WriteOp) -> Result<(), EngineError> {
        let mut ops = vec![WriteOp::InsertAttempt(attempt.clone()), bump];
        if let Ok(Some(key)) = CLIENT_KEY.try_with(Clone::clone) {
            ops.push(WriteOp::LinkKey {
                key,
                attempt_id: attempt.id.0.clone(),
            });
        }
        self.store.write(ops).await.map_err(EngineError::from)
    }

    fn new_attempt(
        &self,
        session: &PaymentSession,
        payment: Option<&Payment>,
        operation: Operation,
        amount: i64,
        reason: Option<String>,
    ) -> Attempt {
        let id = AttemptId::generate();
        let now = self.now();
        Attempt {
            idempotency_key: format!("{}:{}", session.idempotency_key, id),
            id,
            session_id: session.id.clone(),
            payment_id: payment.map(|p| p.id.clone()),
            provider_id: session.provider_id.clone(),
            operation,
            amount,
            currency_code: session.currency_code,
            state: AttemptState::InFlight,
            outcome: None,
            error: None,
            reason,
            checks: 0,
            next_check_at: None,
            resolution: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Authorizes a session: `processed` makes it authorized and creates its payment in one write;
    /// `requires_more` returns the customer's next action; `pending` waits for a webhook or sync;
    /// a decline leaves it in `error` (see [`AuthorizeResult::decline`]).
    pub async fn authorize_session(
        &self,
        id: &str,
        input: AuthorizeInput,
        idempotency_key: Option<&str>,
    ) -> Result<AuthorizeResult, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("authorize:{id}"),
            &input,
            |a| self.rebuild_authorize(a),
            || async {
                let _guard = self.locks.lock(id).await;
                let mut session = self.session(id).await?;
                match transitions::session(session.status, SessionInput::Authorize) {
                    Step::Refused(why) => return Err(EngineError::InvalidTransition(why)),
                    _ if session.status == SessionStatus::Authorized => {
                        let payment = self.store.payment_of_session(&session.id).await?;
                        return Ok(AuthorizeResult::of(session, payment));
                    }
                    _ => {}
                }
                self.refuse_if_open(session.id.as_str()).await?;
                let provider = self.provider(&session.provider_id)?.clone();
                if !session.is_initiated {
                    session = self.initiate_locked(session).await?;
                }
                if let Some(context) = &input.context {
                    session.context = context.clone();
                }
                if let Some(data) = &input.data {
                    session.data = merge(&session.data, data);
                }
                let attempt =
                    self.new_attempt(&session, None, Operation::Authorize, session.amount, None);
                let expected = session.version;
                session.version += 1;
                session.updated_at = self.now();
                self.begin(
                    &attempt,
                    WriteOp::UpdateSession {
                        session: session.clone(),
                        expected_version: expected,
                    },
                )
                .await?;
                let answer = provider
                    .call(AuthorizeRequest {
                        session_id: session.id.0.clone(),
                        idempotency_key: attempt.idempotency_key.clone(),
                        amount: session.amount,
                        currency_code: session.currency_code.code().to_owned(),
                        context: session.context.clone(),
                        data: session.data.clone(),
                        deadline_unix_ms: None,
                    })
                    .await;
                let outcome = self.after_call(attempt, answer).await?;
                let session = self.session(id).await?;
                let payment = self.store.payment_of_session(&session.id).await?;
                let mut result = AuthorizeResult::of(session, payment);
                match outcome {
                    Outcome::RequiresMore { next_action } => result.next_action = Some(next_action),
                    Outcome::Declined { code, message } => {
                        result.decline = Some(Decline { code, message })
                    }
                    _ => {}
                }
                Ok(result)
            },
        )
        .await
    }

    /// Records what a provider call gave: a definitive outcome through [`Host::settle`]; an
    /// unreadable or late one as `unknown` for the reconciler; an error as a failed attempt.
    /// Returns the outcome, or the error the caller should see.
    async fn after_call(
        &self,
        mut attempt: Attempt,
        answer: Result<ProviderResponse, CallError>,
    ) -> Result<Outcome, EngineError> {
        let attempt_id = attempt.id.0.clone();
        match answer {
            Ok(response) => {
                let outcome = response.outcome.clone();
                self.settle(attempt, outcome.clone(), response.data, None)
                    .await?;
                match outcome {
                    Outcome::Unknown { reason } => {
                        Err(EngineError::OutcomeUnknown { attempt_id, reason })
                    }
                    Outcome::NotAttempted { reason } => Err(EngineError::NotAttempted { reason }),
                    other => Ok(other),
                }
            }
            Err(e) if e.outcome_is_unknown() => {
                attempt.state = AttemptState::Unknown;
                attempt.error = serde_json::to_value(e.to_string()).ok();
                attempt.next_check_at = Some(self.now() + self.reconcile.first_check_ms);
                attempt.updated_at = self.now();
                self.store
                    .write(vec![WriteOp::UpdateAttempt(attempt)])
                    .await?;
                tracing::warn!(attempt = %attempt_id, "provider outcome unknown: {e}");
                Err(EngineError::OutcomeUnknown {
                    attempt_id,
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                attempt.state = AttemptState::Failed;
                attempt.error = Some(match &e {
                    CallError::Provider(pe) => serde_json::to_value(pe).unwrap_or(Value::Null),
                    other => Value::String(other.to_string()),
                });
                attempt.updated_at = self.now();
                self.store
                    .write(vec![WriteOp::UpdateAttempt(attempt)])
                    .await?;
                Err(match e {
                    CallError::NotAttempted { reason } => EngineError::NotAttempted { reason },
                    CallError::Provider(pe) => EngineError::Provider(pe),
                    CallError::Unknown { reason } => EngineError::NotAttempted { reason },
                })
            }
        }
    }

    /// Applies a definitive `outcome` of `attempt` and its effects in one write. Used after a call,
    /// by the reconciler, and by an operator's resolution. An `unknown` outcome keeps the attempt
    /// open for the reconciler. A concurrent change of the entity (a selection, another host's
    /// write) makes it read again and retry: an outcome once known is not dropped.
    async fn settle(
        &self,
        attempt: Attempt,
        outcome: Outcome,
        data: Option<Value>,
        resolution: Option<Resolution>,
    ) -> Result<(), EngineError> {
        let mut tries = 0;
        loop {
            let result = self
                .settle_once(
                    attempt.clone(),
                    outcome.clone(),
                    data.clone(),
                    resolution.clone(),
                )
                .await;
            match result {
                Err(EngineError::Store(StoreError::VersionConflict(_))) if tries < 8 => tries += 1,
                other => return other,
            }
        }
    }

    async fn settle_once(
        &self,
        mut attempt: Attempt,
        outcome: Outcome,
        data: Option<Value>,
        resolution: Option<Resolution>,
    ) -> Result<(), EngineError> {
        let now = self.now();
        attempt.updated_at = now;
        attempt.outcome = serde_json::to_value(&outcome).ok();
        attempt.resolution = resolution;
        attempt.state = moved(&outcome);
        if attempt.state == AttemptState::Unknown {
            attempt.next_check_at = Some(now + self.reconcile.first_check_ms);
            self.store
                .write(vec![WriteOp::UpdateAttempt(attempt)])
                .await?;
            return Ok(());
        }
        let mut ops = Vec::new();
        match attempt.operation {
            Operation::Authorize => {
                let mut session = self
                    .store
                    .session(&attempt.session_id)
                    .await?
                    .ok_or_else(|| not_found("payment session", attempt.session_id.as_str()))?;
                let expected = session.version;
                match transitions::session(session.status, SessionInput::Authorized(&outcome)) {
                    Step::To(status) => {
                        if status == SessionStatus::Authorized && session.status != status {
                            session.payment_authorized_at = Some(now);
                            ops.push(WriteOp::InsertPayment(self.payment_for(&session, now)));
                        }
                        session.status = status;
                    }
                    Step::Ignored(why) => {
                        tracing::info!(session = %session.id, "authorize outcome ignored: {why}");
                    }
                    Step::Unchanged | Step::Refused(_) => {}
                }
                if let Some(data) = data {
                    session.data = data;
                }
                session.version += 1;
                session.updated_at = now;
                ops.push(WriteOp::UpdateSession {
                    session,
                    expected_version: expected,
                });
            }
            Operation::Capture | Operation::Refund | Operation::Cancel => {
                let payment_id = attempt.payment_id.clone().ok_or_else(|| {
                    EngineError::Store(StoreError::Invariant(format!(
                        "attempt {} has no payment",
                        attempt.id
                    )))
                })?;
                let mut payment = self
                    .store
                    .payment(&payment_id)
                    .await?
                    .ok_or_else(|| not_found("payment", payment_id.as_str()))?;
                if outcome == Outcome::Processed {
                    let expected = payment.version;
                    match attempt.operation {
                        Operation::Capture => {
                            let capture = Capture {
                                id: CaptureId::generate(),
                                amount: attempt.amount,
                                attempt_id: attempt.id.clone(),
                                created_at: now,
                            };
                            if payment.captured_amount() + attempt.amount >= payment.amount {
                                payment.captured_at = Some(now);
                            }
                            ops.push(WriteOp::InsertCapture(payment.id.clone(), capture));
                        }
                        Operation::Refund => {
                            ops.push(WriteOp::InsertRefund(
                                payment.id.clone(),
                                Refund {
                                    id: RefundId::generate(),
                                    amount: attempt.amount,
                                    reason: attempt.reason.clone(),
                                    attempt_id: attempt.id.clone(),
                                    created_at: now,
                                },
                            ));
                        }
                        _ => payment.canceled_at = Some(now),
                    }
                    if let Some(data) = data {
                        payment.data = data;
                    }
                    payment.version += 1;
                    payment.updated_at = now;
                    ops.push(WriteOp::UpdatePayment {
                        payment,
                        expected_version: expected,
                    });
                } else if matches!(outcome, Outcome::Pending) {
                    // A capture, refund or cancel the processor will finish later: keep asking.
                    attempt.state = AttemptState::Unknown;
                    attempt.next_check_at = Some(now + self.reconcile.first_check_ms);
                } else if matches!(outcome, Outcome::RequiresMore { .. }) {
                    attempt.state = AttemptState::Failed;
                }
            }
            _ => {}
        }
        ops.insert(0, WriteOp::UpdateAttempt(attempt));
        // Raw store errors: `settle` retries a version conflict.
        self.store.write(ops).await.map_err(EngineError::Store)
    }

    fn payment_for(&self, session: &PaymentSession, now: Timestamp) -> Payment {
        Payment {
            id: PaymentId::generate(),
            payment_session_id: session.id.clone(),
            payment_collection_id: session.payment_collection_id.clone(),
            provider_id: session.provider_id.clone(),
            amount: session.amount,
            currency_code: session.currency_code,
            data: session.data.clone(),
            captures: Vec::new(),
            refunds: Vec::new(),
            captured_at: None,
            canceled_at: None,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }

    // ------------------------------------------------------ payments

    async fn payment_op(
        &self,
        id: &str,
        operation: Operation,
        amount: Option<i64>,
        reason: Option<String>,
    ) -> Result<Payment, EngineError> {
        let _guard = self.locks.lock(id).await;
        let mut payment = self.payment(id).await?;
        // An open outcome comes first: until it resolves, the amounts below are not the truth.
        self.refuse_if_open(payment.id.as_str()).await?;
        let session = self
            .store
            .session(&payment.payment_session_id)
            .await?
            .ok_or_else(|| not_found("payment session", payment.payment_session_id.as_str()))?;
        let provider = self.provider(&payment.provider_id)?.clone();
        let caps = provider.manifest().capabilities;
        let captured = payment.captured_amount();
        let refunded = payment.refunded_amount();
        let (amount, input) = match operation {
            Operation::Capture => {
                let a = amount.unwrap_or(payment.amount - captured);
                (a, PaymentInput::Capture(a))
            }
            Operation::Refund => {
                let a = amount.unwrap_or(captured - refunded);
                (a, PaymentInput::Refund(a))
            }
            _ => (payment.amount, PaymentInput::Cancel),
        };
        if operation != Operation::Cancel {
            Money::of(amount, payment.currency_code)
                .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
        }
        transitions::payment(&payment, input).map_err(EngineError::InvalidTransition)?;
        match operation {
            Operation::Capture if amount < payment.amount - captured && !caps.partial_capture => {
                return Err(EngineError::Unsupported(format!(
                    "provider `{}` cannot capture part of a payment",
                    payment.provider_id
                )));
            }
            Operation::Capture if captured > 0 && !caps.multiple_captures => {
                return Err(EngineError::Unsupported(format!(
                    "provider `{}` allows one capture per payment",
                    payment.provider_id
                )));
            }
            Operation::Refund
                if (amount < captured - refunded || refunded > 0) && !caps.partial_refund =>
            {
                return Err(EngineError::Unsupported(format!(
                    "provider `{}` can only refund everything captured, once",
                    payment.provider_id
                )));
            }
            _ => {}
        }
        let attempt = self.new_attempt(&session, Some(&payment), operation, amount, reason.clone());
        let expected = payment.version;
        payment.version += 1;
        payment.updated_at = self.now();
        self.begin(
            &attempt,
            WriteOp::UpdatePayment {
                payment: payment.clone(),
                expected_version: expected,
            },
        )
        .await?;
        let currency = payment.currency_code.code().to_owned();
        let answer = match operation {
            Operation::Capture => {
                provider
                    .call(CaptureRequest {
                        session_id: session.id.0.clone(),
                        payment_id: payment.id.0.clone(),
                        idempotency_key: attempt.idempotency_key.clone(),
                        amount,
                        currency_code: currency,
                        data: payment.data.clone(),
                        deadline_unix_ms: None,
                    })
                    .await
            }
            Operation::Refund => {
                provider
                    .call(RefundRequest {
                        session_id: session.id.0.clone(),
                        payment_id: payment.id.0.clone(),
                        idempotency_key: attempt.idempotency_key.clone(),
                        amount,
                        currency_code: currency,
                        data: payment.data.clone(),
                        reason,
                        deadline_unix_ms: None,
                    })
                    .await
            }
            _ => {
                provider
                    .call(CancelRequest {
                        session_id: session.id.0.clone(),
                        payment_id: Some(payment.id.0.clone()),
                        idempotency_key: attempt.idempotency_key.clone(),
                        amount,
                        currency_code: currency,
                        data: payment.data.clone(),
                        deadline_unix_ms: None,
                    })
                    .await
            }
        };
        let attempt_id = attempt.id.0.clone();
        match self.after_call(attempt, answer).await {
            Ok(Outcome::Declined { code, message }) => Err(EngineError::Declined { code, message }),
            Ok(Outcome::Pending) => Err(EngineError::OutcomeUnknown {
                attempt_id,
                reason: "the provider will finish it later".into(),
            }),
            Ok(Outcome::RequiresMore { .. }) => Err(EngineError::Provider(ProviderError::new(
                payhost_provider_api::ErrorKind::InvalidRequest,
                format!("the provider asked for customer action on a {operation}"),
            ))),
            Ok(_) => self.payment(id).await,
            Err(EngineError::OutcomeUnknown { reason, .. }) => {
                Err(EngineError::OutcomeUnknown { attempt_id, reason })
            }
            Err(e) => Err(e),
        }
    }

    /// Captures `amount` (default: what remains) of a payment.
    pub async fn capture_payment(
        &self,
        id: &str,
        input: CaptureInput,
        idempotency_key: Option<&str>,
    ) -> Result<Payment, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("capture:{id}"),
            &input,
            |a| self.rebuild_payment(a),
            || self.payment_op(id, Operation::Capture, input.amount, None),
        )
        .await
    }

    /// Refunds `amount` (default: everything captured and not yet refunded) of a payment.
    pub async fn refund_payment(
        &self,
        id: &str,
        input: RefundInput,
        idempotency_key: Option<&str>,
    ) -> Result<Payment, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("refund:{id}"),
            &input,
            |a| self.rebuild_payment(a),
            || self.payment_op(id, Operation::Refund, input.amount, input.reason.clone()),
        )
        .await
    }

    /// Cancels (voids) a payment with no captures.
    pub async fn cancel_payment(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Payment, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("cancel:{id}"),
            &Value::Null,
            |a| self.rebuild_payment(a),
            || self.payment_op(id, Operation::Cancel, None, None),
        )
        .await
    }

    // ------------------------------------------------------ reports from the provider

    /// Applies what a provider reports about a session (a verified webhook, or a sync). Monotone:
    /// a report about a session that moved on is ignored and logged.
    pub async fn apply_report(
        &self,
        id: &str,
        action: WebhookAction,
    ) -> Result<PaymentSession, EngineError> {
        let _guard = self.locks.lock(id).await;
        let mut session = self.session(id).await?;
        let step = transitions::session(session.status, SessionInput::Reported(action));
        let to = match step {
            Step::To(to) if to != session.status => to,
            Step::Ignored(why) => {
                tracing::info!(session = %session.id, ?action, "report ignored: {why}");
                return Ok(session);
            }
            _ => return Ok(session),
        };
        // A session with an attempt in flight is left to that attempt's outcome.
        self.refuse_if_open(session.id.as_str()).await?;
        let now = self.now();
        let expected = session.version;
        let mut ops = Vec::new();
        if to == SessionStatus::Authorized {
            session.payment_authorized_at = Some(now);
            ops.push(WriteOp::InsertPayment(self.payment_for(&session, now)));
        }
        session.status = to;
        session.version += 1;
        session.updated_at = now;
        ops.push(WriteOp::UpdateSession {
            session: session.clone(),
            expected_version: expected,
        });
        self.store.write(ops).await?;
        Ok(session)
    }

    /// Receives a webhook: the provider verifies and translates it, the event is stored once per
    /// (provider, event id), and applied through the engine. A duplicate of an applied event is
    /// acknowledged and changes nothing; an event that could not be applied yet (an operation on
    /// its session is in flight) is kept and applied when the provider sends it again.
    pub async fn receive_webhook(
        &self,
        provider_id: &str,
        body: String,
        headers: Vec<(String, String)>,
    ) -> Result<WebhookReceipt, EngineError> {
        let provider = self.provider(provider_id)?.clone();
        if !provider.manifest().capabilities.webhooks {
            return Err(EngineError::Unsupported(format!(
                "provider `{provider_id}` does not take webhooks"
            )));
        }
        let event = provider
            .call(payhost_provider_api::WebhookRequest {
                body: body.clone(),
                headers,
                received_at_unix_ms: self.now(),
            })
            .await
            .map_err(|e| match e {
                CallError::Provider(pe)
                    if pe.kind == payhost_provider_api::ErrorKind::InvalidSignature =>
                {
                    EngineError::Unverified(pe.message)
                }
                CallError::Provider(pe) => EngineError::invalid("body", pe.message),
                other => call_error(other),
            })?;
        if event.event_id.is_empty() {
            return Err(EngineError::invalid("body", "the event has no id"));
        }
        let action = serde_json::to_value(event.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let record = crate::store::WebhookEventRecord {
            provider_id: provider_id.to_owned(),
            event_id: event.event_id.clone(),
            body,
            session_id: event.session_id.clone(),
            action,
            received_at: self.now(),
            applied_at: None,
        };
        match self
            .store
            .write(vec![WriteOp::InsertWebhookEvent(record)])
            .await
        {
            Ok(()) => {}
            Err(StoreError::KeyExists(_)) => {
                let stored = self
                    .store
                    .webhook_event(provider_id, &event.event_id)
                    .await?;
                if stored.is_some_and(|s| s.applied_at.is_some()) {
                    return Ok(WebhookReceipt::of(&event, true));
                }
            }
            Err(e) => return Err(e.into()),
        }
        match self.apply_webhook(provider_id, &event).await {
            Ok(_) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.store
            .write(vec![WriteOp::MarkWebhookApplied {
                provider_id: provider_id.to_owned(),
                event_id: event.event_id.clone(),
                at: self.now(),
            }])
            .await?;
        Ok(WebhookReceipt::of(&event, false))
    }

    /// Applies a verified webhook event of `provider_id`.
    pub async fn apply_webhook(
        &self,
        provider_id: &str,
        event: &WebhookEvent,
    ) -> Result<Option<PaymentSession>, EngineError> {
        let Some(session_id) = &event.session_id else {
            return Ok(None);
        };
        let session = self.session(session_id).await?;
        if session.provider_id != provider_id {
            return Err(EngineError::invalid(
                "session_id",
                format!(
                    "session {session_id} belongs to provider `{}`",
                    session.provider_id
                ),
            ));
        }
        self.apply_report(session_id, event.action).await.map(Some)
    }

    /// Asks the provider where a session stands and applies it (monotone).
    pub async fn sync_session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let session = self.session(id).await?;
        let provider = self.provider(&session.provider_id)?;
        let truth = provider
            .call(RetrieveRequest {
                session_id: session.id.0.clone(),
                payment_id: None,
                idempotency_key: format!("{}:sync:{}", session.idempotency_key, session.version),
                amount: session.amount,
                currency_code: session.currency_code.code().to_owned(),
                data: session.data.clone(),
                attempt: None,
                deadline_unix_ms: None,
            })
            .await
            .map_err(call_error)?;
        let action = match truth.status {
            RemoteStatus::Authorized | RemoteStatus::Captured => WebhookAction::Authorized,
            RemoteStatus::Error => WebhookAction::Failed,
            RemoteStatus::Canceled => WebhookAction::Canceled,
            RemoteStatus::RequiresMore => WebhookAction::RequiresMore,
            _ => WebhookAction::Pending,
        };
        self.apply_report(id, action).await
    }

    /// The provider's answer to an earlier attempt.
    async fn ask_about(&self, attempt: &Attempt) -> Result<Outcome, CallError> {
        let provider =
            self.providers
                .get(&attempt.provider_id)
                .ok_or_else(|| CallError::NotAttempted {
                    reason: format!("provider `{}` is not loaded", attempt.provider_id),
                })?;
        // The provider finds its own references (an intent id, …) in the data it returned.
        let data = match &attempt.payment_id {
            Some(p) => self.store.payment(p).await.ok().flatten().map(|p| p.data),
            None => self
                .store
                .session(&attempt.session_id)
                .await
                .ok()
                .flatten()
                .map(|s| s.data),
        }
        .unwrap_or(Value::Null);
        let truth = provider
            .call_with_timeout(
                RetrieveRequest {
                    session_id: attempt.session_id.0.clone(),
                    payment_id: attempt.payment_id.as_ref().map(|p| p.0.clone()),
                    idempotency_key: format!(
                        "{}:retrieve:{}",
                        attempt.idempotency_key, attempt.checks
                    ),
                    amount: attempt.amount,
                    currency_code: attempt.currency_code.code().to_owned(),
                    data,
                    attempt: Some(AttemptRef {
                        operation: attempt.operation,
                        idempotency_key: attempt.idempotency_key.clone(),
                        amount: attempt.amount,
                    }),
                    deadline_unix_ms: None,
                },
                provider.timeout().max(Duration::from_millis(100)),
            )
            .await?;
        Ok(truth.attempt.unwrap_or(Outcome::Unknown {
            reason: "the provider did not report on the attempt".into(),
        }))
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
    }
}

fn not_found(kind: &'static str, id: &str) -> EngineError {
    EngineError::NotFound {
        kind,
        id: id.to_owned(),
    }
}
