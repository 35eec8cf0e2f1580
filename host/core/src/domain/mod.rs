//! The payment domain, after Medusa: collections, sessions, payments with captures and refunds,
//! and the attempts that record every money-moving provider call; account holders and their saved
//! payment methods ([`holders`]). The transition tables live in [`transitions`] (sessions,
//! payments, collections) and [`holders`] (holders, methods); nothing else decides a status.

pub mod money;
pub mod transitions;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use money::{Currency, MAX_AMOUNT, Money, MoneyError};
pub use payhost_provider_api::Operation;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id prefix.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh, time-ordered id.
            pub fn generate() -> Self {
                $name(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Accepts an id with the right prefix.
            pub fn parse(s: &str) -> Option<Self> {
                (s.starts_with($prefix) && s.len() > $prefix.len() && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                    .then(|| $name(s.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(/// A payment collection id (`paycol_…`).
    CollectionId, "paycol_");
id_type!(/// A payment session id (`ps_…`).
    SessionId, "ps_");
id_type!(/// A payment id (`pay_…`).
    PaymentId, "pay_");
id_type!(/// A capture id (`capt_…`).
    CaptureId, "capt_");
id_type!(/// A refund id (`ref_…`).
    RefundId, "ref_");
id_type!(/// An attempt id (`att_…`).
    AttemptId, "att_");

pub mod holders;

pub use holders::{
    AccountHolder, AccountHolderId, HolderAttempt, HolderStatus, MethodStatus, PaymentMethod,
    PaymentMethodId,
};

/// Milliseconds since the Unix epoch.
pub type Timestamp = i64;

/// What a cart or order owes, paid through one or more sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentCollection {
    /// `paycol_…`.
    pub id: CollectionId,
    /// Amount owed, minor units.
    pub amount: i64,
    /// Its currency.
    #[schema(value_type = String, example = "eur")]
    pub currency_code: Currency,
    /// The embedder's metadata.
    pub metadata: Value,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A collection with its status, which is derived from its sessions and payments, never stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CollectionView {
    /// The collection.
    #[serde(flatten)]
    pub collection: PaymentCollection,
    /// Derived status.
    pub status: CollectionStatus,
    /// Σ of authorized, non-canceled payments.
    pub authorized_amount: i64,
    /// Σ captured.
    pub captured_amount: i64,
    /// Σ refunded.
    pub refunded_amount: i64,
    /// Its sessions.
    pub payment_sessions: Vec<PaymentSession>,
    /// Its payments.
    pub payments: Vec<Payment>,
}

/// A collection's status (Medusa's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CollectionStatus {
    /// Nothing started.
    NotPaid,
    /// A session is initiated, none authorized.
    Awaiting,
    /// Authorized, but less than the amount.
    PartiallyAuthorized,
    /// Authorized for the whole amount.
    Authorized,
    /// Captured for the whole amount.
    Completed,
    /// Every payment was canceled.
    Canceled,
}

/// A session's status (Medusa's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Created or initiated, not authorized.
    Pending,
    /// The customer must act, then authorize again.
    RequiresMore,
    /// Authorized; a payment exists.
    Authorized,
    /// Declined or failed; terminal.
    Error,
    /// Canceled or deleted; terminal.
    Canceled,
}

impl SessionStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Pending => "pending",
            SessionStatus::RequiresMore => "requires_more",
            SessionStatus::Authorized => "authorized",
            SessionStatus::Error => "error",
            SessionStatus::Canceled => "canceled",
        }
    }

    /// The status with this stored name.
    pub fn parse(s: &str) -> Option<SessionStatus> {
        [
            SessionStatus::Pending,
            SessionStatus::RequiresMore,
            SessionStatus::Authorized,
            SessionStatus::Error,
            SessionStatus::Canceled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A payment session (Medusa's PaymentSession).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentSession {
    /// `ps_…`.
    pub id: SessionId,
    /// The collection it pays.
    pub payment_collection_id: CollectionId,
    /// The embedder's cart, if any.
    pub cart_id: Option<String>,
    /// The embedder's cart snapshot (email, totals, …).
    pub cart: Value,
    /// The cart's context for the provider (ip, user agent, …).
    pub context: Value,
    /// The operator's provider id.
    pub provider_id: String,
    /// The customer's chosen session for its cart and collection.
    pub is_selected: bool,
    /// Initiated with the provider.
    pub is_initiated: bool,
    /// Status, moved only by [`transitions`].
    pub status: SessionStatus,
    /// The provider's opaque data.
    pub data: Value,
    /// Generated key sent to the provider; every call's key derives from it.
    pub idempotency_key: String,
    /// Amount, minor units.
    pub amount: i64,
    /// Currency.
    #[schema(value_type = String, example = "eur")]
    pub currency_code: Currency,
    /// When authorized.
    pub payment_authorized_at: Option<Timestamp>,
    /// The embedder's metadata.
    pub metadata: Value,
    /// The caller's own id for the session (a Medusa session id), set at creation; sessions
    /// can be listed by it.
    pub reference: Option<String>,
    /// The account holder whose saved methods may pay it (set at creation; its provider is
    /// the session's).
    #[serde(default)]
    pub account_holder_id: Option<AccountHolderId>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Optimistic-concurrency version, bumped by every write.
    pub version: i64,
}

/// A payment's status, derived from its amounts and cancelation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Authorized, nothing captured.
    Authorized,
    /// Some captured.
    PartiallyCaptured,
    /// All captured.
    Captured,
    /// Some refunded.
    PartiallyRefunded,
    /// All captured money refunded.
    Refunded,
    /// Canceled (voided).
    Canceled,
}

/// One capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Capture {
    /// `capt_…`.
    pub id: CaptureId,
    /// Amount, minor units.
    pub amount: i64,
    /// The attempt that made it.
    pub attempt_id: AttemptId,
    /// When.
    pub created_at: Timestamp,
}

/// One refund.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refund {
    /// `ref_…`.
    pub id: RefundId,
    /// Amount, minor units.
    pub amount: i64,
    /// Why, if given.
    pub reason: Option<String>,
    /// The attempt that made it.
    pub attempt_id: AttemptId,
    /// When.
    pub created_at: Timestamp,
}

/// An authorized session promoted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Payment {
    /// `pay_…`.
    pub id: PaymentId,
    /// The session it came from.
    pub payment_session_id: SessionId,
    /// The collection it pays.
    pub payment_collection_id: CollectionId,
    /// The provider.
    pub provider_id: String,
    /// Authorized amount.
    pub amount: i64,
    /// Currency.
    #[schema(value_type = String, example = "eur")]
    pub currency_code: Currency,
    /// The provider's data.
    pub data: Value,
    /// Captures, oldest first.
    pub captures: Vec<Capture>,
    /// Refunds, oldest first.
    pub refunds: Vec<Refund>,
    /// When fully captured.
    pub captured_at: Option<Timestamp>,
    /// When canceled.
    pub canceled_at: Option<Timestamp>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Optimistic-concurrency version.
    pub version: i64,
}

impl Payment {
    /// Σ captures.
    pub fn captured_amount(&self) -> i64 {
        self.captures.iter().map(|c| c.amount).sum()
    }
    /// Σ refunds.
    pub fn refunded_amount(&self) -> i64 {
        self.refunds.iter().map(|r| r.amount).sum()
    }
    /// Derived status.
    pub fn status(&self) -> PaymentStatus {
        let (captured, refunded) = (self.captured_amount(), self.refunded_amount());
        if self.canceled_at.is_some() {
            PaymentStatus::Canceled
        } else if refunded > 0 && refunded >= captured {
            PaymentStatus::Refunded
        } else if refunded > 0 {
            PaymentStatus::PartiallyRefunded
        } else if captured >= self.amount {
            PaymentStatus::Captured
        } else if captured > 0 {
            PaymentStatus::PartiallyCaptured
        } else {
            PaymentStatus::Authorized
        }
    }
}

/// Where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Recorded, provider called, outcome not yet recorded (or the host died meanwhile).
    InFlight,
    /// The operation took effect.
    Succeeded,
    /// It did not (declined, refused, never attempted).
    Failed,
    /// It may or may not have taken effect; the reconciler asks the provider.
    Unknown,
    /// Still unknown after the reconciler's backoff; an operator must settle it.
    NeedsOperator,
}

impl AttemptState {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptState::InFlight => "in_flight",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Unknown => "unknown",
            AttemptState::NeedsOperator => "needs_operator",
        }
    }
    /// The state with this stored name.
    pub fn parse(s: &str) -> Option<AttemptState> {
        [
            AttemptState::InFlight,
            AttemptState::Succeeded,
            AttemptState::Failed,
            AttemptState::Unknown,
            AttemptState::NeedsOperator,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
    /// Whether the outcome is still open.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            AttemptState::InFlight | AttemptState::Unknown | AttemptState::NeedsOperator
        )
    }
}

/// How an operator settled an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resolution {
    /// Who.
    pub by: String,
    /// Why.
    pub note: String,
    /// When.
    pub at: Timestamp,
}

/// One money-moving provider call, recorded before it is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// `att_…`.
    pub id: AttemptId,
    /// The session concerned.
    pub session_id: SessionId,
    /// The payment concerned (capture, refund, cancel of a payment).
    pub payment_id: Option<PaymentId>,
    /// The provider.
    pub provider_id: String,
    /// What was asked.
    #[schema(value_type = String, example = "capture")]
    pub operation: Operation,
    /// Amount asked, minor units.
    pub amount: i64,
    /// Currency.
    #[schema(value_type = String, example = "eur")]
    pub currency_code: Currency,
    /// The idempotency key sent to the provider.
    pub idempotency_key: String,
    /// Where it stands.
    pub state: AttemptState,
    /// The provider's answer, when one was read.
    pub outcome: Option<Value>,
    /// The error, when the call failed.
    pub error: Option<Value>,
    /// For refunds: the reason given.
    pub reason: Option<String>,
    /// How many times the reconciler asked.
    pub checks: i64,
    /// When the reconciler asks next.
    pub next_check_at: Option<Timestamp>,
    /// The operator's settlement, if any.
    pub resolution: Option<Resolution>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// When the host stops waiting for the provider call (its last one, if the reconciler sent
    /// it again). Until this plus a margin has passed, the call may still reach the processor,
    /// so "not attempted" proves nothing. `None` on attempts recorded before it was kept.
    #[serde(default)]
    pub call_deadline_at: Option<Timestamp>,
    /// The API key id of the request that started it, when the caller proved one.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// On a shared store: the host whose call it is (or who took it over), and that host's
    /// epoch. Only a live owner writes it; another host takes it over only once the owner's
    /// lease lapsed and the call's deadline passed.
    #[serde(default)]
    pub owner_host: Option<String>,
    /// The owner's epoch.
    #[serde(default)]
    pub owner_epoch: Option<i64>,
    /// How many times the reconciler sent it again with its idempotency key (at most once).
    #[serde(default)]
    pub resends: i64,
}

impl Attempt {
    /// The entity whose money operations this attempt blocks while open.
    pub fn entity(&self) -> String {
        match &self.payment_id {
            Some(p) => p.0.clone(),
            None => self.session_id.0.clone(),
        }
    }
}
