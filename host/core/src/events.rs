//! Events out: what changed, exactly as committed.
//!
//! Every change that matters is written as an [`Event`] in the same store write as the change
//! itself (the transactional outbox), so there is never an event for a change that did not
//! commit, nor a committed change without its event. Events carry a per-store sequence that is
//! gap-free and in commit order: embedders read it as a stream (`payhost::Host::events`) or over
//! HTTP (`GET /v1/events`), and configured endpoints receive each one as a signed POST
//! ([`sign`], [`verify`]), retried with backoff and parked past their retry period.
//!
//! This module is the vocabulary (types, the event and delivery records, the signature); the
//! outbox that writes and delivers them is `payhost`'s, and the endpoints' settings are the
//! config's.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::domain::Timestamp;

/// The header carrying an outgoing event's signature: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">` (Stripe's scheme).
pub const SIGNATURE_HEADER: &str = "payhost-signature";
/// The header carrying an outgoing event's id (receivers dedupe by it).
pub const EVENT_ID_HEADER: &str = "payhost-event-id";

macro_rules! event_types {
    ($($(#[doc = $doc:tt])* $variant:ident = $name:tt,)*) => {
        /// What an event says happened. Its name is stable.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum EventType {
            $($(#[doc = $doc])* #[serde(rename = $name)] $variant,)*
        }

        impl EventType {
            /// Every type.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The stable name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }

            /// What it means (its documentation).
            pub const fn description(self) -> &'static str {
                match self {
                    $(EventType::$variant => concat!($($doc),*).trim_ascii(),)*
                }
            }
        }
    };
}

event_types! {
    /// A payment collection was created (`data`: the collection).
    CollectionCreated = "payment_collection.created",
    /// A payment session was created (`data`: the session).
    SessionCreated = "payment_session.created",
    /// A session went back to pending (the processor is working on it).
    SessionPending = "payment_session.pending",
    /// A session needs the customer to act (3-D Secure, a redirect).
    SessionRequiresMore = "payment_session.requires_more",
    /// A session was authorized; `payment_id` names its payment.
    SessionAuthorized = "payment_session.authorized",
    /// A session was declined or failed (terminal).
    SessionError = "payment_session.error",
    /// A session was canceled or deleted (terminal).
    SessionCanceled = "payment_session.canceled",
    /// A payment was captured (`amount`: this capture; `data`: the payment after it).
    PaymentCaptured = "payment.captured",
    /// A payment was refunded (`amount`: this refund).
    PaymentRefunded = "payment.refunded",
    /// A payment was canceled.
    PaymentCanceled = "payment.canceled",
    /// A money call's outcome is unknown; it blocks its payment until reconciled (`data`: the
    /// attempt).
    AttemptUnknown = "attempt.unknown",
    /// An unknown outcome could not be settled by asking: an operator must resolve it.
    AttemptNeedsOperator = "attempt.needs_operator",
    /// An unknown outcome was settled (`data.resolved_by`: the reconciler, a late answer, or the
    /// operator's name).
    AttemptResolved = "attempt.resolved",
    /// A provider's verified webhook was applied (`data`: provider, event id, action).
    WebhookApplied = "webhook.applied",
    /// An account holder was created at its provider (`data`: the holder).
    AccountHolderCreated = "account_holder.created",
    /// An account holder was deleted at its provider, with every method saved to it.
    AccountHolderDeleted = "account_holder.deleted",
    /// A payment method was saved to an account holder (`data`: the method: never a card number).
    PaymentMethodSaved = "payment_method.saved",
    /// A saved payment method was deleted (detached at the processor).
    PaymentMethodDeleted = "payment_method.deleted",
}

/// What an event's `data` is: the entity as it stands after the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A [`crate::domain::PaymentCollection`].
    Collection,
    /// A [`crate::domain::PaymentSession`].
    Session,
    /// A [`crate::domain::Payment`].
    Payment,
    /// An [`crate::domain::Attempt`], with `resolved_by` once resolved.
    Attempt,
    /// A webhook: `provider_id`, `event_id`, `action`, `payment_session_id`.
    Webhook,
    /// A [`crate::domain::AccountHolder`].
    AccountHolder,
    /// A [`crate::domain::PaymentMethod`].
    PaymentMethod,
}

impl EventType {
    /// What its `data` is.
    pub const fn subject(self) -> Subject {
        match self {
            EventType::CollectionCreated => Subject::Collection,
            EventType::SessionCreated
            | EventType::SessionPending
            | EventType::SessionRequiresMore
            | EventType::SessionAuthorized
            | EventType::SessionError
            | EventType::SessionCanceled => Subject::Session,
            EventType::PaymentCaptured
            | EventType::PaymentRefunded
            | EventType::PaymentCanceled => Subject::Payment,
            EventType::AttemptUnknown
            | EventType::AttemptNeedsOperator
            | EventType::AttemptResolved => Subject::Attempt,
            EventType::WebhookApplied => Subject::Webhook,
            EventType::AccountHolderCreated | EventType::AccountHolderDeleted => {
                Subject::AccountHolder
            }
            EventType::PaymentMethodSaved | EventType::PaymentMethodDeleted => {
                Subject::PaymentMethod
            }
        }
    }

    /// The type with this name.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.iter().copied().find(|t| t.as_str() == name)
    }

    /// Whether `pattern` (a type's name, `prefix.*`, or `*`) covers this type.
    pub fn matches(self, pattern: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => self.as_str().starts_with(prefix),
            None => self.as_str() == pattern,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `pattern` names at least one type (a name, `prefix.*` or `*`).
pub fn valid_pattern(pattern: &str) -> bool {
    EventType::ALL.iter().any(|t| t.matches(pattern))
}

/// A position in the event sequence; a consumer stores the cursor of the last event it handled
/// and resumes after it (`payhost::Host::events`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cursor(pub i64);

impl Cursor {
    /// Before the first event.
    pub const START: Cursor = Cursor(0);

    /// The sequence number it stands at (0: before the first event).
    pub const fn seq(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Position in the store's sequence: gap-free, in commit order; the cursor to resume after.
    pub seq: i64,
    /// `evt_…`: unique, stable across redeliveries (dedupe by it).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The collection concerned.
    pub payment_collection_id: Option<String>,
    /// The session concerned.
    pub payment_session_id: Option<String>,
    /// The payment concerned.
    pub payment_id: Option<String>,
    /// The attempt concerned.
    pub attempt_id: Option<String>,
    /// The amount the change is about (a capture's, a refund's, a session's), minor units.
    pub amount: Option<i64>,
    /// Its currency.
    pub currency_code: Option<String>,
    /// When it was committed (Unix ms).
    pub created_at: Timestamp,
    /// The entity as it stands after the change.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl Event {
    /// A new event (its sequence number is given by the store).
    pub fn new(kind: EventType, at: Timestamp, data: Value) -> Event {
        Event {
            seq: 0,
            id: format!("evt_{}", uuid::Uuid::now_v7().simple()),
            kind,
            payment_collection_id: None,
            payment_session_id: None,
            payment_id: None,
            attempt_id: None,
            amount: None,
            currency_code: None,
            created_at: at,
            data,
        }
    }

    /// The cursor to resume after this event.
    pub const fn cursor(&self) -> Cursor {
        Cursor(self.seq)
    }

    /// What orders its deliveries: events of one session (or else one collection, or one
    /// account holder with its methods) reach an endpoint in order.
    pub fn order_key(&self) -> String {
        let holder = || {
            let field = match self.kind.subject() {
                Subject::AccountHolder => "id",
                Subject::PaymentMethod => "account_holder_id",
                _ => return None,
            };
            self.data.get(field)?.as_str().map(str::to_owned)
        };
        self.payment_session_id
            .clone()
            .or_else(|| self.payment_collection_id.clone())
            .or_else(holder)
            .unwrap_or_else(|| self.id.clone())
    }
}

/// A page of events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventPage {
    /// Events after the cursor, in order.
    pub events: Vec<Event>,
    /// The highest sequence number pruned (0: none); a cursor below it is gone.
    pub pruned_through: i64,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its (next) try.
    Pending,
    /// The endpoint answered 2xx.
    Delivered,
    /// Retried for the whole retry period without success; `payhost events redeliver` sends it
    /// again. Later events of its session wait behind it.
    Parked,
}

impl DeliveryState {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Parked => "parked",
        }
    }

    /// The state with this stored name.
    pub fn parse(s: &str) -> Option<DeliveryState> {
        [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Parked,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delivery {
    /// `<event id>:<endpoint id>`.
    pub id: String,
    /// The endpoint.
    pub endpoint_id: String,
    /// The event's sequence number.
    pub event_seq: i64,
    /// Its state.
    pub state: DeliveryState,
    /// Tries so far.
    pub attempts: i64,
    /// When it is tried next (store clock, Unix ms).
    pub next_at: Timestamp,
    /// When it was first tried.
    pub first_tried_at: Option<Timestamp>,
    /// What the last try got.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<Timestamp>,
    /// Who last sent it again after it was parked (`key:<id>`, an operator's name).
    #[serde(default)]
    pub redelivered_by: Option<String>,
    /// When.
    #[serde(default)]
    pub redelivered_at: Option<Timestamp>,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, t: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `payhost-signature` value for `body` sent at `unix_seconds`.
pub fn sign(secret: &str, unix_seconds: i64, body: &[u8]) -> String {
    let digest = mac(secret, unix_seconds, body).finalize().into_bytes();
    format!("t={unix_seconds},v1={}", hex::encode(digest))
}

/// Why a signature was refused. [`SignatureError::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=<seconds>,v1=<hex>`.
    #[error("the signature header is malformed (expected t=<unix seconds>,v1=<hex>)")]
    Malformed,
    /// The timestamp is further from now than the tolerance (a replay, or a skewed clock).
    #[error("the signature's timestamp is {0} s away from now, past the tolerance")]
    Stale(i64),
    /// No `v1` matches the body with this secret.
    #[error("no signature matches the body")]
    Mismatch,
}

impl SignatureError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            SignatureError::Malformed => "signature.malformed",
            SignatureError::Stale(_) => "signature.stale",
            SignatureError::Mismatch => "signature.mismatch",
        }
    }
}

/// Verifies a received event: `header` is the `payhost-signature` value, `body` the raw body,
/// `now_unix_seconds` the receiver's clock; timestamps further than `tolerance` away are refused.
/// Several `v1=` entries (a secret being rotated) are accepted if any matches. Constant-time.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now_unix_seconds: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => {
                signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let skew = (now_unix_seconds - t).abs();
    if skew > tolerance.as_secs() as i64 {
        return Err(SignatureError::Stale(skew));
    }
    if signatures
        .iter()
        .any(|s| mac(secret, t, body).verify_slice(s).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Duration, EventType, HmacSha256, KeyInit, Mac, SignatureError, sign, valid_pattern, verify,
    };

    #[test]
    fn a_signature_verifies_and_any_change_is_refused() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign("whsec_test", 1_700_000_000, body);
        let tol = Duration::from_secs(300);
        assert_eq!(
            verify("whsec_test", &header, body, 1_700_000_100, tol),
            Ok(())
        );
        assert_eq!(
            verify("whsec_other", &header, body, 1_700_000_100, tol),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                "whsec_test",
                &header,
                br#"{"id":"evt_2"}"#,
                1_700_000_100,
                tol
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_test", &header, body, 1_700_001_000, tol),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify("whsec_test", "v1=00", body, 1_700_000_000, tol),
            Err(SignatureError::Malformed)
        );
        // Stripe's documented example shape: the MAC of "<t>.<body>".
        let expected = {
            let mut m = HmacSha256::new_from_slice(b"whsec_test").unwrap();
            m.update(b"1700000000.{\"id\":\"evt_1\"}");
            hex::encode(m.finalize().into_bytes())
        };
        assert_eq!(header, format!("t=1700000000,v1={expected}"));
        // A rotated secret: either signature passes.
        let both = format!("{header},v1={}", "ab".repeat(32));
        assert_eq!(
            verify("whsec_test", &both, body, 1_700_000_000, tol),
            Ok(())
        );
    }

    #[test]
    fn patterns_name_event_types() {
        assert!(EventType::SessionAuthorized.matches("payment_session.*"));
        assert!(EventType::SessionAuthorized.matches("*"));
        assert!(!EventType::PaymentCaptured.matches("payment_session.*"));
        assert!(EventType::PaymentCaptured.matches("payment.*"));
        assert!(!valid_pattern("payment_sesion.*"));
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
        }
    }
}
