//! What callers send to the engine, and what authorize returns. Field names are Medusa's.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{Payment, PaymentSession};

/// Create a payment collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCollection {
    /// Amount owed, minor units.
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub amount: i64,
    /// ISO 4217 code.
    #[schema(pattern = "^[A-Za-z]{3}$", example = "eur")]
    pub currency_code: String,
    /// The embedder's metadata.
    #[serde(default)]
    pub metadata: Value,
}

fn yes() -> bool {
    true
}

/// Create a payment session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// The collection it pays. Without one, `amount` and `currency_code` are required and the
    /// session's own collection is created with it, in the same write.
    #[serde(default)]
    pub payment_collection_id: Option<String>,
    /// The operator's provider id.
    pub provider_id: String,
    /// The embedder's cart.
    #[serde(default)]
    pub cart_id: Option<String>,
    /// The cart snapshot.
    #[serde(default)]
    pub cart: Value,
    /// The cart's context for the provider.
    #[serde(default)]
    pub context: Value,
    /// Input for the provider's initiate call: a payment method, a card, test switches.
    /// Transient: handed to that call only, never stored, returned or logged; the session's
    /// `data` holds only what the provider answers.
    #[serde(default)]
    pub data: Value,
    /// Amount; default the collection's.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub amount: Option<i64>,
    /// Currency; must be the collection's if given.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z]{3}$")]
    pub currency_code: Option<String>,
    /// The embedder's metadata.
    #[serde(default)]
    pub metadata: Value,
    /// The caller's own id for the session (1 to 255 characters), kept with it: `GET
    /// /v1/payment-sessions?reference=` finds it. (Left out when absent, so an idempotency
    /// key's stored request reads the same as before references existed.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The account holder (`ach_…`, active, at the same provider) whose saved methods may pay
    /// the session; its provider calls carry it. (Left out when absent, as `reference`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_holder_id: Option<String>,
    /// Initiate with the provider now (default); false creates a placeholder (Medusa v1).
    #[serde(default = "yes")]
    pub initiate: bool,
}

/// Change a session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionUpdate {
    /// New amount.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub amount: Option<i64>,
    /// New cart snapshot.
    #[serde(default)]
    pub cart: Option<Value>,
    /// New context.
    #[serde(default)]
    pub context: Option<Value>,
    /// Input for the provider's update call (transient, like [`NewSession::data`]).
    #[serde(default)]
    pub data: Option<Value>,
    /// New metadata.
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// Authorize a session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeInput {
    /// The cart's context now (ip, user agent…).
    #[serde(default)]
    pub context: Option<Value>,
    /// Input for the provider's authorize call: a payment method, a card, a 3-D Secure result
    /// (transient, like [`NewSession::data`]).
    #[serde(default)]
    pub data: Option<Value>,
    /// A method saved to the session's account holder (`pm_…`) to charge, without card input.
    /// (Left out when absent, so an idempotency key's stored request reads as before.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method_id: Option<String>,
}

/// Capture a payment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureInput {
    /// Amount; default what remains uncaptured.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub amount: Option<i64>,
}

/// Refund a payment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundInput {
    /// Amount; default everything captured and not refunded.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    pub amount: Option<i64>,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A provider's decline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decline {
    /// The provider's code (`card_declined`…).
    pub code: Option<String>,
    /// Its message.
    pub message: String,
}

/// What authorize gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuthorizeResult {
    /// The session after the call.
    pub payment_session: PaymentSession,
    /// Its payment, once authorized.
    pub payment: Option<Payment>,
    /// What the customer must do, when the provider requires more.
    pub next_action: Option<Value>,
    /// Why it was declined, when it was.
    pub decline: Option<Decline>,
}

impl AuthorizeResult {
    pub(crate) fn of(payment_session: PaymentSession, payment: Option<Payment>) -> Self {
        AuthorizeResult {
            payment_session,
            payment,
            next_action: None,
            decline: None,
        }
    }
}

/// What receiving a webhook did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookReceipt {
    /// The provider's event id.
    pub event_id: String,
    /// The session it named, if any.
    pub session_id: Option<String>,
    /// Whether it was a duplicate of an event already applied (and so changed nothing).
    pub duplicate: bool,
}

impl WebhookReceipt {
    pub(crate) fn of(event: &payhost_provider_api::WebhookEvent, duplicate: bool) -> Self {
        WebhookReceipt {
            event_id: event.event_id.clone(),
            session_id: event.session_id.clone(),
            duplicate,
        }
    }
}
