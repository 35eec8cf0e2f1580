//! Storage behind one trait. The engine speaks in domain writes ([`WriteOp`]) applied atomically,
//! and domain reads; only the drivers know SQL: `payhost-store-sqlite` (the embedded default) and
//! `payhost-store-postgres` (several hosts on one database), which pass the same tests.

use async_trait::async_trait;
use serde_json::Value;

use crate::events::{Delivery, DeliveryState, Event, EventPage};

use crate::domain::{
    AccountHolder, AccountHolderId, Attempt, Capture, CollectionId, HolderAttempt, Payment,
    PaymentCollection, PaymentId, PaymentMethod, PaymentMethodId, PaymentSession, Refund,
    SessionId, Timestamp,
};

/// One write; a `Vec<WriteOp>` is applied all or nothing.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A new collection.
    InsertCollection(PaymentCollection),
    /// A new session.
    InsertSession(PaymentSession),
    /// Replaces a session whose stored version is `expected_version` (else
    /// [`StoreError::VersionConflict`]); the stored version becomes `session.version`.
    UpdateSession {
        /// The new row.
        session: PaymentSession,
        /// The version read before.
        expected_version: i64,
    },
    /// Selects a session and unselects every other of its cart and of its collection.
    SelectSession(SessionId),
    /// Records an attempt. At most one open attempt per session or payment
    /// (else [`StoreError::AttemptOpen`]).
    InsertAttempt(Attempt),
    /// Replaces an attempt's state, outcome and checks (by id; on a shared store only as its
    /// owner, else [`StoreError::Fenced`]).
    UpdateAttempt(Attempt),
    /// Gives an attempt a new call deadline, `call_ms` from now on the store's clock (it is
    /// about to be sent again).
    ExtendDeadline {
        /// The attempt.
        id: crate::domain::AttemptId,
        /// The new call's timeout.
        call_ms: i64,
        /// Now on the host's clock (a store of one host has no other).
        now: Timestamp,
    },
    /// A new payment (its captures and refunds are inserted separately).
    InsertPayment(Payment),
    /// Replaces a payment's own fields (data, captured_at, canceled_at, version) if its stored
    /// version is `expected_version`.
    UpdatePayment {
        /// The new row.
        payment: Payment,
        /// The version read before.
        expected_version: i64,
    },
    /// A capture of a payment. The store refuses one that breaks Σcaptures ≤ amount or comes
    /// after a cancel ([`StoreError::Invariant`]).
    InsertCapture(PaymentId, Capture),
    /// A refund of a payment. The store refuses one that breaks Σrefunds ≤ Σcaptures.
    InsertRefund(PaymentId, Refund),
    /// Claims a client idempotency key (else [`StoreError::KeyExists`]).
    ClaimKey {
        /// The key.
        key: String,
        /// Which operation it was used for.
        operation: String,
        /// Hash of the request it came with.
        request_hash: String,
        /// When.
        at: Timestamp,
        /// This claim's own id: a release names it, so it never removes another run's claim.
        claim_id: String,
    },
    /// Stores the response of a claimed key.
    CompleteKey {
        /// The key.
        key: String,
        /// The response to replay.
        response: Value,
    },
    /// Forgets the claim `claim_id` of a key whose operation failed without effect; a key linked
    /// to an attempt, completed, or claimed anew by another run is kept.
    ReleaseKey {
        /// The key.
        key: String,
        /// The claim to remove.
        claim_id: String,
    },
    /// Forgets a key linked to `attempt_id` (which failed and moved nothing), so a retry may run
    /// afresh. Compare-and-delete: a key no longer linked to that attempt (another retry claimed
    /// it anew) is left alone and the write fails with [`StoreError::KeyExists`].
    ForgetKey {
        /// The key.
        key: String,
        /// The failed attempt it must still be linked to.
        attempt_id: String,
    },
    /// Links a claimed key to the attempt its operation started.
    LinkKey {
        /// The key.
        key: String,
        /// The attempt.
        attempt_id: String,
    },
    /// Forgets every claimed key without a response and without a linked attempt, created before
    /// `older_than` (their processes are gone, and they moved nothing).
    ReleasePendingKeys {
        /// Keys claimed before this are released.
        older_than: Timestamp,
    },
    /// Claims an open attempt for reconciling until `until`: an unknown one due at `now`, or an
    /// in-flight one last written before `stale_before` (which becomes unknown). Else
    /// [`StoreError::VersionConflict`]: another host has it, or it is not due. Keeps two hosts
    /// from asking about and settling the same attempt at once.
    ClaimAttempt {
        /// The attempt.
        id: crate::domain::AttemptId,
        /// The claim lasts until then (it becomes the attempt's next check).
        until: Timestamp,
        /// Now.
        now: Timestamp,
        /// In-flight attempts written before this are abandoned.
        stale_before: Timestamp,
    },
    /// Stores a verified webhook (else [`StoreError::KeyExists`] for a duplicate event id).
    InsertWebhookEvent(WebhookEventRecord),
    /// Appends an event to the outbox with the next sequence number, and a pending delivery of it
    /// to each endpoint in `deliver_to`. Applied after every other op of the write. An event
    /// whose id is stored already (a redone write) is skipped.
    AppendEvent {
        /// The event (its `seq` is ignored: the store numbers it).
        event: crate::events::Event,
        /// Endpoint ids that receive it.
        deliver_to: Vec<String>,
    },
    /// Records what one pass of an endpoint's deliverer did with the deliveries `claimer` holds
    /// (a delivery no longer held by it is left alone: another host took it over).
    DeliveryOutcomes {
        /// Who tried.
        claimer: String,
        /// Answered 2xx: delivered.
        delivered: Vec<String>,
        /// Tries that failed: the delivery, the delay before its next try (`None`: park it),
        /// and what the try got.
        failed: Vec<(String, Option<i64>, String)>,
        /// Claimed but not tried (one before them in their session failed): free again.
        released: Vec<String>,
    },
    /// Sends parked deliveries to `endpoints` again from scratch: one (`Some(id)`) or all.
    Redeliver {
        /// The delivery, or every parked one.
        id: Option<String>,
        /// Only deliveries to these endpoints.
        endpoints: Vec<String>,
        /// Who asked (`key:<id>`, a name, `unauthenticated:<name>`), recorded on each.
        by: String,
    },
    /// Parks the pending deliveries to endpoints that are not in `configured` (removed from the
    /// config): they are listed with the parked ones instead of waiting unseen.
    ParkUnconfigured {
        /// The endpoint ids configured now.
        configured: Vec<String>,
    },
    /// Prunes the events committed before `before` whose deliveries are all delivered, as a
    /// prefix of the sequence (an event that must stay keeps every later one).
    PruneEvents {
        /// Events created before this may go.
        before: Timestamp,
    },
    /// A new account holder. At most one live (`pending` or `active`) per customer and
    /// provider, else [`StoreError::KeyExists`].
    InsertAccountHolder(AccountHolder),
    /// Replaces an account holder if its stored version is `expected_version`.
    UpdateAccountHolder {
        /// The new row.
        holder: AccountHolder,
        /// The version read before.
        expected_version: i64,
    },
    /// A new saved payment method.
    InsertPaymentMethod(PaymentMethod),
    /// Replaces a saved method if its stored version is `expected_version`.
    UpdatePaymentMethod {
        /// The new row.
        method: PaymentMethod,
        /// The version read before.
        expected_version: i64,
    },
    /// Records a holder attempt. At most one open per holder (else
    /// [`StoreError::AttemptOpen`]).
    InsertHolderAttempt(HolderAttempt),
    /// Replaces a holder attempt if its stored version is `expected_version` (a reconciler's
    /// claim is such a write). A settled attempt never changes again
    /// ([`StoreError::Invariant`]).
    UpdateHolderAttempt {
        /// The new row.
        attempt: HolderAttempt,
        /// The version read before.
        expected_version: i64,
    },
    /// Marks a stored webhook as applied.
    MarkWebhookApplied {
        /// The provider.
        provider_id: String,
        /// The provider's event id.
        event_id: String,
        /// When.
        at: Timestamp,
    },
}

/// This host's registration on a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLease {
    /// The host's id.
    pub host_id: String,
    /// Its epoch: new at every registration; what it owns carries it.
    pub epoch: i64,
}

/// A registered host, for `payhost hosts` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostRecord {
    /// Its id.
    pub host_id: String,
    /// Its current epoch.
    pub epoch: i64,
    /// When it registered first (store clock, Unix ms).
    pub started_at: Timestamp,
    /// When its lease ends (store clock).
    pub lease_expires_at: Timestamp,
    /// Whether the lease is current.
    pub live: bool,
    /// What it said about itself (pid, address, version).
    pub info: String,
    /// Open attempts it owns.
    pub open_attempts: i64,
}

/// A verified webhook as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEventRecord {
    /// The provider it came to.
    pub provider_id: String,
    /// The provider's unique event id.
    pub event_id: String,
    /// The raw body.
    pub body: String,
    /// The session it names, if any.
    pub session_id: Option<String>,
    /// The action it maps to.
    pub action: String,
    /// When it arrived.
    pub received_at: Timestamp,
    /// When it was applied; `None` until then.
    pub applied_at: Option<Timestamp>,
}

impl WriteOp {
    /// Whether it is delivery bookkeeping, which a crash may lose without harm: a delivery whose
    /// outcome was lost is sent again (deliveries are at least once). Stores commit a write made
    /// only of these without waiting for the disk; every other write waits.
    pub fn is_bookkeeping(&self) -> bool {
        matches!(self, WriteOp::DeliveryOutcomes { .. })
    }

    /// Whether it only administers the outbox's deliveries (no money, attempt or event): an
    /// operator's tool may write it beside the host that has an embedded database.
    pub fn is_outbox_admin(&self) -> bool {
        matches!(self, WriteOp::Redeliver { .. })
    }
}

/// A stored client idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    /// The operation it was used for.
    pub operation: String,
    /// Hash of the request it came with.
    pub request_hash: String,
    /// The response, once complete.
    pub response: Option<Value>,
    /// The attempt the operation started, if it moved money.
    pub attempt_id: Option<String>,
}

/// A storage failure. [`StoreError::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The row changed since it was read (another operation won the race).
    #[error("{0} changed concurrently; retry")]
    VersionConflict(String),
    /// The session or payment already has an open attempt.
    #[error("{0} already has an operation in progress")]
    AttemptOpen(String),
    /// The idempotency key is taken.
    #[error("idempotency key `{0}` is already in use")]
    KeyExists(String),
    /// A database constraint guarding a money invariant refused the write.
    #[error("refused by the database: {0}")]
    Invariant(String),
    /// The database failed or is unreachable.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The embedded database belongs to another running host.
    #[error("{0}")]
    Locked(String),
    /// This host's lease lapsed: what it tried to write may belong to another host now, so the
    /// database refused it (it re-registers and carries on).
    #[error("refused: this host's lease lapsed ({0}); another host may own it now")]
    Fenced(String),
}

impl StoreError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::VersionConflict(_) => "store.version_conflict",
            StoreError::AttemptOpen(_) => "store.attempt_open",
            StoreError::KeyExists(_) => "store.key_exists",
            StoreError::Invariant(_) => "store.invariant",
            StoreError::Unavailable(_) => "store.unavailable",
            StoreError::Locked(_) => "store.locked",
            StoreError::Fenced(_) => "store.fenced",
        }
    }
}

/// Storage of collections, sessions, payments, attempts and idempotency keys.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `ops` atomically and durably: once this returns `Ok`, a crash or power loss does not
    /// undo them.
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError>;
    /// Whether several hosts may use this store at once (then an in-flight attempt may belong to
    /// a live host: hosts hold leases, and only a lapsed owner's work is taken over).
    fn shared(&self) -> bool {
        false
    }
    /// Registers this host (a new epoch) with a lease of `lease`, on the store's clock. A store
    /// of one host has no leases: `None`.
    async fn register_host(
        &self,
        lease: std::time::Duration,
    ) -> Result<Option<HostLease>, StoreError> {
        let _ = lease;
        Ok(None)
    }
    /// This host's current registration, if it holds one.
    fn host_lease(&self) -> Option<HostLease> {
        None
    }
    /// Extends this host's lease; `false`: it had lapsed (the host must register again).
    async fn renew_host(&self, lease: std::time::Duration) -> Result<bool, StoreError> {
        let _ = lease;
        Ok(true)
    }
    /// Gives the lease up (graceful shutdown): other hosts take over at once.
    async fn release_host(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The hosts registered, live or not, with their open attempts.
    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        Ok(Vec::new())
    }
    /// Now on the store's clock (the database's, for a shared store: hosts' clocks never
    /// decide who owns what).
    async fn now_ms(&self) -> Result<Timestamp, StoreError> {
        Ok(crate::clock::Clock::now_unix_ms(&crate::clock::SystemClock))
    }
    /// A collection.
    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError>;
    /// A session.
    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError>;
    /// Sessions of a cart, oldest first.
    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError>;
    /// Sessions carrying the caller's `reference`, oldest first.
    async fn sessions_by_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<PaymentSession>, StoreError>;
    /// Sessions of a collection, oldest first.
    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError>;
    /// A payment with its captures and refunds.
    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError>;
    /// A payment with its captures and refunds, and its session (what a payment operation
    /// starts from).
    async fn payment_and_session(
        &self,
        id: &PaymentId,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        let Some(payment) = self.payment(id).await? else {
            return Ok(None);
        };
        let session = self
            .session(&payment.payment_session_id)
            .await?
            .ok_or_else(|| {
                StoreError::Invariant(format!(
                    "payment {id} has no session {}",
                    payment.payment_session_id
                ))
            })?;
        Ok(Some((payment, session)))
    }
    /// The payment of a session, if authorized.
    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError>;
    /// Payments of a collection.
    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError>;
    /// An attempt.
    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError>;
    /// Every attempt of a session or payment, oldest first.
    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError>;
    /// Every open attempt (in flight, unknown, needs operator), oldest first.
    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError>;
    /// A stored webhook event.
    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError>;
    /// A client idempotency key.
    async fn key(&self, key: &str) -> Result<Option<StoredKey>, StoreError>;
    /// An account holder.
    async fn account_holder(
        &self,
        id: &AccountHolderId,
    ) -> Result<Option<AccountHolder>, StoreError>;
    /// The account holders of a customer, every provider and status, oldest first.
    async fn account_holders_of_customer(
        &self,
        customer_id: &str,
    ) -> Result<Vec<AccountHolder>, StoreError>;
    /// A saved payment method.
    async fn payment_method(
        &self,
        id: &PaymentMethodId,
    ) -> Result<Option<PaymentMethod>, StoreError>;
    /// The methods of an account holder, every status, oldest first.
    async fn payment_methods_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<PaymentMethod>, StoreError>;
    /// A holder attempt.
    async fn holder_attempt(&self, id: &str) -> Result<Option<HolderAttempt>, StoreError>;
    /// The attempts of an account holder, oldest first.
    async fn holder_attempts_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<HolderAttempt>, StoreError>;
    /// Every open holder attempt, oldest first.
    async fn open_holder_attempts(&self) -> Result<Vec<HolderAttempt>, StoreError>;
    /// Up to `limit` events after sequence number `after`, of the `types` named (all: `None`),
    /// in order.
    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError>;
    /// Claims, for `claimer` and `claim_ms`, up to `limit` deliveries to `endpoint_id` that are
    /// due, with their events, in order: for each session (or collection) a run of its
    /// undelivered deliveries from the first one on, none skipped — so that sending each run in
    /// order keeps the session's order. A store of one host claims nothing in the database (it
    /// has one deliverer per endpoint).
    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        claimer: &str,
        claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError>;
    /// Deliveries in `state`, oldest first, at most `limit`.
    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Woken after every write that appended events (so streams in this process need not poll).
    fn appended(&self) -> std::sync::Arc<tokio::sync::Notify>;
    /// Statements sent and write transactions committed so far, where the store counts them
    /// (PostgreSQL): what work costs the database, for benchmarks.
    fn statement_counts(&self) -> Option<(u64, u64)> {
        None
    }
}
