//! Account holders and saved payment methods (since 1.4): a customer's record at the
//! processor (Stripe's Customer) and the payment methods attached to it, so a returning customer
//! pays without entering a card again.
//!
//! The same rules as the payment requests hold: each call that has an effect at the processor
//! carries the host's idempotency key (a host records it before making it, as for money);
//! `input` is transient
//! (a card number may pass through it, and through nothing else); `data` and `reference` hold
//! only what the provider owns (ids, tokens, a card's brand and last four).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::Outcome;

/// The customer an account holder is for, as the embedder knows them (Medusa's customer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// The embedder's own customer id (`cus_…` in Medusa).
    pub id: String,
    /// E-mail address.
    #[serde(default)]
    pub email: Option<String>,
    /// Given name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Family name.
    #[serde(default)]
    pub last_name: Option<String>,
    /// Company name.
    #[serde(default)]
    pub company_name: Option<String>,
    /// Phone number.
    #[serde(default)]
    pub phone: Option<String>,
    /// Billing address, in the embedder's shape.
    #[serde(default)]
    pub billing_address: Value,
}

/// An account holder as the host holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountHolderRef {
    /// The payhost account holder id (`ach_…`).
    pub id: String,
    /// The provider's own id for the customer (Stripe's `cus_…`), from its create answer.
    #[serde(default)]
    pub reference: Option<String>,
    /// The provider data last returned for it.
    #[serde(default)]
    pub data: Value,
}

/// A saved payment method as the host holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentMethodRef {
    /// The payhost payment method id (`pm_…`).
    pub id: String,
    /// The provider's own id for the method (Stripe's `pm_…`), from its save answer.
    #[serde(default)]
    pub reference: Option<String>,
    /// The provider data returned for it (brand, last four, expiry: never the number).
    #[serde(default)]
    pub data: Value,
}

/// Create the customer's record at the processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateAccountHolderRequest {
    /// The payhost account holder id (`ach_…`); providers may store it as their reference back.
    pub account_holder_id: String,
    /// The host's idempotency key for this call; the same key must never create twice.
    pub idempotency_key: String,
    /// Who the customer is.
    pub customer: Customer,
    /// What the caller sent for this call. **Transient**, as for sessions.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Change the customer's record at the processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateAccountHolderRequest {
    /// The account holder.
    pub account_holder: AccountHolderRef,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// Who the customer is now.
    pub customer: Customer,
    /// What the caller sent for this call. **Transient**.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Delete the customer's record at the processor, detaching every payment method saved to it:
/// a later charge with one of them must be refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteAccountHolderRequest {
    /// The account holder.
    pub account_holder: AccountHolderRef,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Ask the provider for the truth about an account holder and, when asked, about one earlier
/// account holder or payment method call (same contract as [`crate::RetrieveRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveAccountHolderRequest {
    /// The account holder. Its `reference` is `None` when the create's outcome is unknown.
    pub account_holder: AccountHolderRef,
    /// The host's idempotency key for this (read-only) call.
    pub idempotency_key: String,
    /// The earlier call to report on, when reconciling (its `amount` is 0).
    #[serde(default)]
    pub attempt: Option<crate::AttemptRef>,
    /// The saved method that call was about (a `delete_payment_method`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<PaymentMethodRef>,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Where an account holder stands at the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderStatus {
    /// The customer exists.
    Active,
    /// The customer was deleted.
    Deleted,
    /// The processor has no record of it.
    NotFound,
    /// A status this version of payhost does not know (sent by a newer plugin).
    #[serde(other)]
    Other,
}

/// The provider's truth about an account holder, and about one attempt when asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveAccountHolderResponse {
    /// Where the account holder stands.
    pub status: HolderStatus,
    /// The provider's id for it, when it exists.
    #[serde(default)]
    pub reference: Option<String>,
    /// What became of the attempt asked about (as in [`crate::RetrieveResponse::attempt`]);
    /// for a create or a save that was processed, `reference` and `data` say what it made.
    #[serde(default)]
    pub attempt: Option<Outcome>,
    /// For an attempt that saved a payment method: the method's provider id.
    #[serde(default)]
    pub attempt_reference: Option<String>,
    /// New provider data for the account holder, or for the method the attempt saved.
    #[serde(default)]
    pub data: Option<Value>,
}

/// List the payment methods saved to an account holder at the processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPaymentMethodsRequest {
    /// The account holder.
    pub account_holder: AccountHolderRef,
    /// The host's idempotency key for this (read-only) call.
    pub idempotency_key: String,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// One payment method saved at the processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedMethod {
    /// The provider's id for the method.
    pub reference: String,
    /// What the provider says of it (brand, last four, expiry: never the number).
    #[serde(default)]
    pub data: Value,
}

/// The payment methods saved to an account holder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentMethodList {
    /// Every method attached now, oldest first.
    pub methods: Vec<SavedMethod>,
}

/// Save a payment method to an account holder (attach it at the processor). The card, or the
/// processor's token for it, is in `input`; answer its id as the response's `reference` and what
/// may be kept of it as `data`. `declined` when the processor refuses the method,
/// `requires_more` when the customer must act first (3-D Secure on a setup).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavePaymentMethodRequest {
    /// The account holder.
    pub account_holder: AccountHolderRef,
    /// The payhost payment method id (`pm_…`) being saved.
    pub payment_method_id: String,
    /// The host's idempotency key for this call; the same key must never attach twice.
    pub idempotency_key: String,
    /// The card or token. **Transient**: never stored, returned or logged by the host.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

/// Delete a saved payment method (detach it at the processor): a later charge with it must be
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletePaymentMethodRequest {
    /// The account holder it is saved to.
    pub account_holder: AccountHolderRef,
    /// The method.
    pub payment_method: PaymentMethodRef,
    /// The host's idempotency key for this call.
    pub idempotency_key: String,
    /// When the host stops waiting for this call (Unix milliseconds).
    #[serde(default)]
    pub deadline_unix_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::{HolderStatus, RetrieveAccountHolderResponse, SavePaymentMethodRequest};

    #[test]
    fn a_newer_peers_holder_status_reads_as_other() {
        let r: RetrieveAccountHolderResponse =
            serde_json::from_str(r#"{"status":"suspended"}"#).unwrap();
        assert_eq!(r.status, HolderStatus::Other);
        assert_eq!(r.attempt, None);
    }

    #[test]
    fn a_save_request_without_input_omits_it() {
        let r = SavePaymentMethodRequest {
            account_holder: Default::default(),
            payment_method_id: "pm_1".into(),
            idempotency_key: "k".into(),
            input: serde_json::Value::Null,
            deadline_unix_ms: None,
        };
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("input").is_none(), "{json}");
    }
}
