//! The typed payloads that cross the plugin boundary as JSON.
//!
//! Rules that keep old and new plugins working together (docs/vendors.md, "What stays stable"): no type here uses
//! `deny_unknown_fields`, every field added after 1.0 is optional (`#[serde(default)]`), and every
//! enum that a newer peer may extend has a catch-all variant, so that a newer plugin's answer is
//! read as "unknown" instead of failing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::holders::{
    CreateAccountHolderRequest, DeleteAccountHolderRequest, DeletePaymentMethodRequest,
    ListPaymentMethodsRequest, PaymentMethodList, RetrieveAccountHolderRequest,
    RetrieveAccountHolderResponse, SavePaymentMethodRequest, UpdateAccountHolderRequest,
};

/// The protocol version this build of provider-api speaks. The host and a plugin agree on the
/// highest version both list; see [`crate::Manifest::protocols`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The operations the host may ask of a provider, by their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Start a payment with the provider when a session is created or selected.
    Initiate,
    /// Change the amount, cart or context of an initiated payment.
    Update,
    /// Authorize the payment (reserve the funds).
    Authorize,
    /// Capture all or part of an authorized payment.
    Capture,
    /// Refund all or part of what was captured.
    Refund,
    /// Cancel (void) an authorization.
    Cancel,
    /// Forget a session that was never authorized.
    Delete,
    /// Ask the provider for the truth about a payment or one earlier attempt.
    Retrieve,
    /// Verify and translate an incoming webhook.
    ParseWebhook,
    /// Create a customer's record at the processor (since 1.4).
    CreateAccountHolder,
    /// Change a customer's record at the processor (since 1.4).
    UpdateAccountHolder,
    /// Delete a customer's record, detaching its payment methods (since 1.4).
    DeleteAccountHolder,
    /// Ask for the truth about an account holder or one earlier holder call (since 1.4).
    RetrieveAccountHolder,
    /// List the payment methods saved to an account holder (since 1.4).
    ListPaymentMethods,
    /// Save (attach) a payment method to an account holder (since 1.4).
    SavePaymentMethod,
    /// Delete (detach) a saved payment method (since 1.4).
    DeletePaymentMethod,
}

impl Operation {
    /// Every operation, in lifecycle order.
    pub const ALL: [Operation; 16] = [
        Operation::Initiate,
        Operation::Update,
        Operation::Authorize,
        Operation::Capture,
        Operation::Refund,
        Operation::Cancel,
        Operation::Delete,
        Operation::Retrieve,
        Operation::ParseWebhook,
        Operation::CreateAccountHolder,
        Operation::UpdateAccountHolder,
        Operation::DeleteAccountHolder,
        Operation::RetrieveAccountHolder,
        Operation::ListPaymentMethods,
        Operation::SavePaymentMethod,
        Operation::DeletePaymentMethod,
    ];

    /// The account holder and payment method operations (since 1.4), which a provider offers
    /// only when its manifest declares [`crate::Manifest::account_holders`].
    pub const ACCOUNT_HOLDER: [Operation; 7] = [
        Operation::CreateAccountHolder,
        Operation::UpdateAccountHolder,
        Operation::DeleteAccountHolder,
        Operation::RetrieveAccountHolder,
        Operation::ListPaymentMethods,
        Operation::SavePaymentMethod,
        Operation::DeletePaymentMethod,
    ];

    /// The name used on the wire (`"authorize"`, `"parse_webhook"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Initiate => "initiate",
            Operation::Update => "update",
            Operation::Authorize => "authorize",
            Operation::Capture => "capture",
            Operation::Refund => "refund",
            Operation::Cancel => "cancel",
            Operation::Delete => "delete",
            Operation::Retrieve => "retrieve",
            Operation::ParseWebhook => "parse_webhook",
            Operation::CreateAccountHolder => "create_account_holder",
            Operation::UpdateAccountHolder => "update_account_holder",
            Operation::DeleteAccountHolder => "delete_account_holder",
            Operation::RetrieveAccountHolder => "retrieve_account_holder",
            Operation::ListPaymentMethods => "list_payment_methods",
            Operation::SavePaymentMethod => "save_payment_method",
            Operation::DeletePaymentMethod => "delete_payment_method",
        }
    }

    /// The operation with this wire name, if any.
    pub fn from_wire(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.as_str() == name)
    }

    /// Whether the operation can move money, so the host records it before making it.
    pub const fn moves_money(self) -> bool {
        matches!(
            self,
            Operation::Authorize | Operation::Capture | Operation::Refund | Operation::Cancel
        )
    }

    /// Whether the operation changes what the processor holds for a customer (a customer
    /// record, an attached method), so a host must record it before making it, like money.
    pub const fn changes_account_holder(self) -> bool {
        matches!(
            self,
            Operation::CreateAccountHolder
                | Operation::UpdateAccountHolder
                | Operation::DeleteAccountHolder
                | Operation::SavePaymentMethod
                | Operation::DeletePaymentMethod
        )
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request type: names its operation and its response, and carries the host's deadline.
pub trait Request: Serialize + serde::de::DeserializeOwned {
    /// The operation this request is for.
    const OPERATION: Operation;
    /// What the provider answers.
    type Response: Serialize + serde::de::DeserializeOwned;
    /// Sets when the host stops waiting (Unix milliseconds).
    fn set_deadline(&mut self, deadline_unix_ms: i64);
}

macro_rules! request {
    ($($req:ty => $op:ident, $resp:ty;)*) => {$(
        impl Request for $req {
            const OPERATION: Operation = Operation::$op;
            type Response = $resp;
            fn set_deadline(&mut self, deadline_unix_ms: i64) {
                self.deadline_unix_ms = Some(deadline_unix_ms);
            }
        }
    )*};
}

request! {
    InitiateRequest => Initiate, ProviderResponse;
    UpdateRequest => Update, ProviderResponse;
    AuthorizeRequest => Authorize, ProviderResponse;
    CaptureRequest => Capture, ProviderResponse;
    RefundRequest => Refund, ProviderResponse;
    CancelRequest => Cancel, ProviderResponse;
    DeleteRequest => Delete, ProviderResponse;
    RetrieveRequest => Retrieve, RetrieveResponse;
    CreateAccountHolderRequest => CreateAccountHolder, ProviderResponse;
    UpdateAccountHolderRequest => UpdateAccountHolder, ProviderResponse;
    DeleteAccountHolderRequest => DeleteAccountHolder, ProviderResponse;
    RetrieveAccountHolderRequest => RetrieveAccountHolder, RetrieveAccountHolderResponse;
    ListPaymentMethodsRequest => ListPaymentMethods, PaymentMethodList;
    SavePaymentMethodRequest => SavePaymentMethod, ProviderResponse;
    DeletePaymentMethodRequest => DeletePaymentMethod, ProviderResponse;
}

impl Request for WebhookRequest {
    const OPERATION: Operation = Operation::ParseWebhook;
    type Response = WebhookEvent;
    /// Webhooks are parsed locally and carry no deadline.
    fn set_deadline(&mut self, _deadline_unix_ms: i64) {}
}

/// Start a payment with the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitiateRequest {
    /// The payhost session id (`ps_…`); providers store it as their reference back to payhost.
    pub session_id: String,
    /// The host's idempotency key for this call; the same key must never act twice.
    pub idempotency_key: String,
    /// Amount in minor units of `currency_code`.
    pub amount: i64,
    /// ISO 4217 code, lower case as in Medusa (`"eur"`).
    pub currency_code: String,
    /// The cart's context as the embedder gave it (customer email, ip, user agent, …).
    #[serde(default)]
    pub context: Value,
    /// The session's provider data: empty on a new session (only provider answers fill it).
    #[serde(default)]
    pub data: Value,
    /// What the caller sent for this call: a payment method, a card, a 3-D Secure result, test
    /// switches. **Transient**: the host hands it to this one call and never stores, returns or
    /// logs it, so card numbers and CVCs may pass through here and nowhere else. Return in
    /// `data` only what you own (references, tokens) — never a card number or a CVC. Since 1.3;
    /// hosts before it merged the caller's fields into `data`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// The customer's account holder at this provider, when the session has one (since 1.4;
    /// older plugins ignore it), so the processor's payment belongs to that customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_holder: Option<crate::AccountHolderRef>,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Change an initiated payment (amount, cart, context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// The payhost session id.
    pub session_id: String,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// The new amount in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The cart's current context.
    #[serde(default)]
    pub context: Value,
    /// The session's provider data, as last returned by the provider.
    #[serde(default)]
    pub data: Value,
    /// What the caller sent for this call: a payment method, a card, a 3-D Secure result, test
    /// switches. **Transient**: the host hands it to this one call and never stores, returns or
    /// logs it, so card numbers and CVCs may pass through here and nowhere else. Return in
    /// `data` only what you own (references, tokens) — never a card number or a CVC. Since 1.3;
    /// hosts before it merged the caller's fields into `data`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Authorize the payment of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorizeRequest {
    /// The payhost session id.
    pub session_id: String,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// Amount to authorize, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The cart's current context.
    #[serde(default)]
    pub context: Value,
    /// The session's provider data, as last returned by the provider.
    #[serde(default)]
    pub data: Value,
    /// What the caller sent for this call: a payment method, a card, a 3-D Secure result, test
    /// switches. **Transient**: the host hands it to this one call and never stores, returns or
    /// logs it, so card numbers and CVCs may pass through here and nowhere else. Return in
    /// `data` only what you own (references, tokens) — never a card number or a CVC. Since 1.3;
    /// hosts before it merged the caller's fields into `data`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// The customer's account holder at this provider, when the session has one (since 1.4;
    /// older plugins ignore it), so the processor's payment belongs to that customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_holder: Option<crate::AccountHolderRef>,
    /// The saved payment method to charge (the account holder's, since 1.4): charge it without
    /// the customer present (`off_session`), or answer `requires_more` when the processor wants
    /// the customer again (3-D Secure). `None`: the method comes in `input` as before. Sent only
    /// to a provider whose manifest declares [`crate::Manifest::account_holders`] (an older
    /// plugin would not see it and charge whatever `input` holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<crate::PaymentMethodRef>,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Capture all or part of an authorized payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureRequest {
    /// The payhost session id the payment came from.
    pub session_id: String,
    /// The payhost payment id (`pay_…`).
    pub payment_id: String,
    /// The host's idempotency key for this capture.
    pub idempotency_key: String,
    /// Amount to capture now, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The payment's provider data.
    #[serde(default)]
    pub data: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Refund all or part of what was captured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefundRequest {
    /// The payhost session id the payment came from.
    pub session_id: String,
    /// The payhost payment id.
    pub payment_id: String,
    /// The host's idempotency key for this refund.
    pub idempotency_key: String,
    /// Amount to refund now, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The payment's provider data.
    #[serde(default)]
    pub data: Value,
    /// Why the money goes back, if the caller said.
    #[serde(default)]
    pub reason: Option<String>,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Cancel (void) an authorization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The payhost session id.
    pub session_id: String,
    /// The payhost payment id, when a payment exists.
    #[serde(default)]
    pub payment_id: Option<String>,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// The authorized amount being released, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The session's or payment's provider data.
    #[serde(default)]
    pub data: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Forget a session that was never authorized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// The payhost session id.
    pub session_id: String,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// The session's amount, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The session's provider data.
    #[serde(default)]
    pub data: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// One earlier call whose outcome the host needs to learn (after a timeout or a crash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRef {
    /// What the earlier call was.
    pub operation: Operation,
    /// The idempotency key the earlier call carried.
    pub idempotency_key: String,
    /// The amount the earlier call carried, in minor units.
    pub amount: i64,
}

/// Ask the provider for the truth about a payment, and optionally about one earlier attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveRequest {
    /// The payhost session id.
    pub session_id: String,
    /// The payhost payment id, when a payment exists.
    #[serde(default)]
    pub payment_id: Option<String>,
    /// The host's idempotency key for this (read-only) call.
    pub idempotency_key: String,
    /// The session's or payment's amount, in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The provider data the host holds.
    #[serde(default)]
    pub data: Value,
    /// The earlier call to report on, when reconciling.
    #[serde(default)]
    pub attempt: Option<AttemptRef>,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// An incoming webhook, exactly as it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookRequest {
    /// The raw request body; verification must use these exact bytes.
    pub body: String,
    /// Request headers, names in lower case, in arrival order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// When the host received it (Unix milliseconds).
    pub received_at_unix_ms: i64,
}

impl WebhookRequest {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What happened to one call. Keeps apart what payment systems learned the hard way: a decline is
/// final, a call that never reached the processor is safe to retry, and an *unknown* outcome may or
/// may not have moved money and must be reconciled, never guessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Done: the operation took effect at the processor.
    Processed,
    /// The customer must act (3-D Secure, a redirect); authorize again afterwards.
    RequiresMore {
        /// What the customer must do, in the provider's words (e.g. `{"type":"redirect","url":…}`).
        #[serde(default)]
        next_action: Value,
    },
    /// Accepted, but the result comes later (by webhook or retrieve).
    Pending,
    /// Refused by the processor or the issuer; final for this attempt.
    Declined {
        /// The provider's decline code (`card_declined`, `insufficient_funds`, …).
        #[serde(default)]
        code: Option<String>,
        /// A message fit for an operator.
        #[serde(default)]
        message: String,
    },
    /// Nothing reached the processor: retrying with the same key is safe.
    NotAttempted {
        /// Why the call did not go out.
        #[serde(default)]
        reason: String,
    },
    /// The call may or may not have taken effect; the host reconciles it through retrieve.
    Unknown {
        /// What left the outcome open (timeout, reset connection, …).
        #[serde(default)]
        reason: String,
    },
}

impl Outcome {
    /// `NotAttempted` with this reason: nothing reached the processor.
    pub fn not_attempted(reason: impl Into<String>) -> Self {
        Outcome::NotAttempted {
            reason: reason.into(),
        }
    }

    /// The outcome's wire name (`"processed"`, `"not_attempted"`, …), for logs and metrics.
    pub const fn name(&self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::RequiresMore { .. } => "requires_more",
            Outcome::Pending => "pending",
            Outcome::Declined { .. } => "declined",
            Outcome::NotAttempted { .. } => "not_attempted",
            Outcome::Unknown { .. } => "unknown",
        }
    }
}

/// A provider's answer to initiate, update, authorize, capture, refund, cancel and delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderResponse {
    /// What happened.
    pub outcome: Outcome,
    /// New provider data to store on the session or payment; `None` keeps what the host has.
    #[serde(default)]
    pub data: Option<Value>,
    /// The provider's own id for what it did (a charge, a refund), for operators and reconciling.
    #[serde(default)]
    pub reference: Option<String>,
}

impl ProviderResponse {
    /// A processed answer with no data change.
    pub fn processed() -> Self {
        ProviderResponse {
            outcome: Outcome::Processed,
            data: None,
            reference: None,
        }
    }

    /// An answer with this outcome and no data change.
    pub fn with_outcome(outcome: Outcome) -> Self {
        ProviderResponse {
            outcome,
            data: None,
            reference: None,
        }
    }

    /// Sets the provider data to store.
    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Sets the provider's reference for what it did.
    pub fn reference(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }
}

/// The state of a payment as the provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteStatus {
    /// Initiated, not yet authorized.
    Pending,
    /// Waiting for the customer to act.
    RequiresMore,
    /// Funds reserved.
    Authorized,
    /// Some or all captured (see the amounts).
    Captured,
    /// Voided or canceled.
    Canceled,
    /// Declined or failed.
    Error,
    /// The provider has no record of it.
    NotFound,
    /// A status this version of payhost does not know (sent by a newer plugin).
    #[serde(other)]
    Other,
}

/// The provider's truth about a payment, and about one attempt when asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveResponse {
    /// Where the payment stands.
    pub status: RemoteStatus,
    /// Amount authorized, when the provider knows it.
    #[serde(default)]
    pub amount_authorized: Option<i64>,
    /// Amount captured so far, when the provider knows it.
    #[serde(default)]
    pub amount_captured: Option<i64>,
    /// Amount refunded so far, when the provider knows it.
    #[serde(default)]
    pub amount_refunded: Option<i64>,
    /// What became of [`RetrieveRequest::attempt`]: `processed`, `declined`, `pending`, or
    /// `not_attempted` when the processor has no record of that key (conclusive for the host
    /// only once the call can no longer land; see `PaymentProvider::retrieve`), `unknown` when
    /// it could not find out. `None` when not asked.
    #[serde(default)]
    pub attempt: Option<Outcome>,
    /// New provider data, if it changed.
    #[serde(default)]
    pub data: Option<Value>,
}

impl RetrieveResponse {
    /// An answer about one attempt only, with nothing known about the payment itself.
    pub fn attempt(attempt: Option<Outcome>) -> Self {
        RetrieveResponse {
            status: RemoteStatus::NotFound,
            amount_authorized: None,
            amount_captured: None,
            amount_refunded: None,
            attempt,
            data: None,
        }
    }
}

/// What a webhook tells the host to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookAction {
    /// The payment is authorized.
    Authorized,
    /// Money was captured.
    Captured,
    /// The payment failed or was declined.
    Failed,
    /// The payment was canceled.
    Canceled,
    /// The customer must act.
    RequiresMore,
    /// Still pending.
    Pending,
    /// An event payhost does not act on (acknowledged and stored).
    #[serde(other)]
    NotSupported,
}

/// A verified webhook, translated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// The provider's unique event id; the host applies each id once.
    pub event_id: String,
    /// The payhost session id the event is about, when the event carries it.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The provider's own reference for the payment, when it has one.
    #[serde(default)]
    pub reference: Option<String>,
    /// What to do.
    pub action: WebhookAction,
    /// The amount the event concerns, in minor units.
    #[serde(default)]
    pub amount: Option<i64>,
    /// ISO 4217 code of `amount`.
    #[serde(default)]
    pub currency_code: Option<String>,
    /// New provider data, if the event carries any.
    #[serde(default)]
    pub data: Option<Value>,
}

/// What kind of failure a [`ProviderError`] is. Stable: match on [`ErrorKind::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed or made no sense for this payment.
    InvalidRequest,
    /// The provider's `[providers.x.options]` table was refused.
    InvalidOptions,
    /// The provider does not implement this operation.
    Unsupported,
    /// The provider's credentials were refused by the processor.
    Authentication,
    /// A webhook's signature did not verify.
    InvalidSignature,
    /// The provider has no record of the payment.
    NotFound,
    /// The operation conflicts with the payment's state at the processor.
    Conflict,
    /// The processor answered with an error.
    Processor,
    /// The processor could not be reached.
    Network,
    /// A bug or broken invariant inside the provider.
    Internal,
    /// The provider panicked; the panic was caught at the boundary.
    Panic,
    /// A kind this version of payhost does not know (sent by a newer plugin).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The stable code, as it appears in logs and API errors.
    pub const fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::InvalidOptions => "invalid_options",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Authentication => "authentication",
            ErrorKind::InvalidSignature => "invalid_signature",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Processor => "processor",
            ErrorKind::Network => "network",
            ErrorKind::Internal => "internal",
            ErrorKind::Panic => "panic",
            ErrorKind::Other => "other",
        }
    }
}

/// A failed provider call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// Whether the same call may succeed if repeated (with the same idempotency key).
    #[serde(default)]
    pub retryable: bool,
    /// The provider's or processor's own error code.
    #[serde(default)]
    pub code: Option<String>,
    /// What went wrong, for an operator. Never contains secrets.
    pub message: String,
    /// The request or options field the error is about (`options.api_key`), if any.
    #[serde(default)]
    pub param: Option<String>,
}

impl ProviderError {
    /// An error of this kind with this message; not retryable, no code.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            retryable: false,
            code: None,
            message: message.into(),
            param: None,
        }
    }

    /// The provider does not implement `operation`.
    pub fn unsupported(operation: &str) -> Self {
        Self::new(
            ErrorKind::Unsupported,
            format!("operation `{operation}` is not supported by this provider"),
        )
    }

    /// A malformed or nonsensical request.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// A refused options table.
    pub fn invalid_options(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidOptions, message)
    }

    /// A broken invariant inside the provider.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Marks the error as retryable.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets the provider's own error code.
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Names the request or options field the error is about.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.code())?;
        if let Some(code) = &self.code {
            write!(f, " ({code})")?;
        }
        if let Some(param) = &self.param {
            write!(f, " at `{param}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ProviderError {}

#[cfg(test)]
mod tests {
    use super::{
        AuthorizeRequest, ErrorKind, Operation, Outcome, RemoteStatus, Value, WebhookAction,
    };

    #[test]
    fn outcomes_round_trip_with_their_wire_names() {
        let declined = Outcome::Declined {
            code: Some("card_declined".into()),
            message: "no".into(),
        };
        let json = serde_json::to_value(&declined).unwrap();
        assert_eq!(json["status"], "declined");
        assert_eq!(serde_json::from_value::<Outcome>(json).unwrap(), declined);
    }

    #[test]
    fn a_newer_peers_unknown_variants_are_read_as_catch_alls() {
        let kind: ErrorKind = serde_json::from_str("\"rate_limited\"").unwrap();
        assert_eq!(kind, ErrorKind::Other);
        let status: RemoteStatus = serde_json::from_str("\"disputed\"").unwrap();
        assert_eq!(status, RemoteStatus::Other);
        let action: WebhookAction = serde_json::from_str("\"dispute_opened\"").unwrap();
        assert_eq!(action, WebhookAction::NotSupported);
    }

    #[test]
    fn requests_accept_fields_added_by_newer_hosts() {
        let req: AuthorizeRequest = serde_json::from_str(
            r#"{"session_id":"ps_1","idempotency_key":"k","amount":10,"currency_code":"eur","new_field":1}"#,
        )
        .unwrap();
        assert_eq!(req.amount, 10);
        assert_eq!(req.data, Value::Null);
    }

    #[test]
    fn operation_wire_names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(Operation::from_wire(op.as_str()), Some(op));
            assert_eq!(
                serde_json::to_value(op).unwrap(),
                Value::String(op.as_str().into())
            );
        }
    }
}
