//! Account holders (a customer's record at one provider) and the payment methods saved to them,
//! with the attempts that record every provider call changing them before it is made.
//!
//! Their statuses move only through [`holder_after`] and [`method_after`]: a provider's answer
//! is an input, never the new status by itself, and `deleted` and `failed` never move back.

use payhost_provider_api::{Customer, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AttemptId, AttemptState, Operation, Timestamp};

id_type!(/// An account holder id (`ach_…`).
    AccountHolderId, "ach_");
id_type!(/// A saved payment method id (`pm_…`).
    PaymentMethodId, "pm_");

/// Where an account holder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HolderStatus {
    /// Its create is in flight or its outcome unknown.
    Pending,
    /// The provider has the customer.
    Active,
    /// Deleted at the provider (with every method saved to it); terminal.
    Deleted,
    /// The create was refused or never reached the processor; terminal.
    Failed,
}

impl HolderStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            HolderStatus::Pending => "pending",
            HolderStatus::Active => "active",
            HolderStatus::Deleted => "deleted",
            HolderStatus::Failed => "failed",
        }
    }

    /// The status with this stored name.
    pub fn parse(s: &str) -> Option<HolderStatus> {
        [
            HolderStatus::Pending,
            HolderStatus::Active,
            HolderStatus::Deleted,
            HolderStatus::Failed,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// Whether it still holds its (customer, provider) slot: at most one such per pair.
    pub const fn is_live(self) -> bool {
        matches!(self, HolderStatus::Pending | HolderStatus::Active)
    }
}

/// A customer's record at one provider (Medusa's AccountHolder). One live per (customer,
/// provider).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountHolder {
    /// `ach_…`.
    pub id: AccountHolderId,
    /// The operator's provider id.
    pub provider_id: String,
    /// The embedder's customer id.
    pub customer_id: String,
    /// Who the customer is, as last confirmed by the provider.
    #[schema(value_type = Object)]
    pub customer: Customer,
    /// The provider's id for the customer (Stripe's `cus_…`), once known.
    pub reference: Option<String>,
    /// The provider's data (ids and tokens only).
    pub data: Value,
    /// Status, moved only by [`holder_after`].
    pub status: HolderStatus,
    /// Generated key; every call's key derives from it.
    pub idempotency_key: String,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Optimistic-concurrency version, bumped by every write.
    pub version: i64,
}

/// Where a saved payment method stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MethodStatus {
    /// Its save is in flight or its outcome unknown.
    Pending,
    /// Attached at the processor: a session of its holder may be paid with it.
    Saved,
    /// Detached (or its holder deleted); terminal.
    Deleted,
    /// The save was refused or never reached the processor; terminal.
    Failed,
}

impl MethodStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            MethodStatus::Pending => "pending",
            MethodStatus::Saved => "saved",
            MethodStatus::Deleted => "deleted",
            MethodStatus::Failed => "failed",
        }
    }

    /// The status with this stored name.
    pub fn parse(s: &str) -> Option<MethodStatus> {
        [
            MethodStatus::Pending,
            MethodStatus::Saved,
            MethodStatus::Deleted,
            MethodStatus::Failed,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// A payment method saved to an account holder. Never holds a card number: only what the
/// provider answered (its id, brand, last four, expiry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentMethod {
    /// `pm_…`.
    pub id: PaymentMethodId,
    /// The holder it is saved to.
    pub account_holder_id: AccountHolderId,
    /// The provider.
    pub provider_id: String,
    /// The provider's id for it (Stripe's `pm_…`), once saved.
    pub reference: Option<String>,
    /// The provider's data about it.
    pub data: Value,
    /// Status, moved only by [`method_after`].
    pub status: MethodStatus,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Optimistic-concurrency version.
    pub version: i64,
}

/// One provider call that changes an account holder or its methods, recorded before it is made.
/// At most one is open per holder: an unknown one blocks its holder's changes, and charges
/// with its methods, until it is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HolderAttempt {
    /// `att_…`.
    pub id: AttemptId,
    /// The holder concerned.
    pub account_holder_id: AccountHolderId,
    /// The method concerned (a save or a delete of one).
    pub payment_method_id: Option<PaymentMethodId>,
    /// The provider.
    pub provider_id: String,
    /// What was asked.
    #[schema(value_type = String, example = "save_payment_method")]
    pub operation: Operation,
    /// The idempotency key sent to the provider.
    pub idempotency_key: String,
    /// Where it stands.
    pub state: AttemptState,
    /// What the call asked for that the holder takes only once it succeeded (an update's new
    /// customer details); never a card.
    #[schema(value_type = Object)]
    pub detail: Value,
    /// The provider's answer, when one was read.
    pub outcome: Option<Value>,
    /// The error, when the call failed or could not be settled yet.
    pub error: Option<Value>,
    /// How many times the reconciler asked without an answer.
    pub checks: i64,
    /// When the reconciler asks next.
    pub next_check_at: Option<Timestamp>,
    /// When the host stops waiting for the call; until this plus a margin it may still land.
    pub call_deadline_at: Timestamp,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
    /// Optimistic-concurrency version (a reconciler claims it by bumping it).
    pub version: i64,
}

/// What an outcome does to a holder, given the operation that produced it: `None` leaves it
/// as it is. Only a `pending` holder can become `active` or `failed`; only a live one `deleted`.
pub fn holder_after(
    status: HolderStatus,
    operation: Operation,
    outcome: &Outcome,
) -> Option<HolderStatus> {
    use HolderStatus as H;
    let done = matches!(outcome, Outcome::Processed);
    let refused = matches!(
        outcome,
        Outcome::Declined { .. } | Outcome::NotAttempted { .. }
    );
    match (status, operation) {
        (H::Pending, Operation::CreateAccountHolder) if done => Some(H::Active),
        (H::Pending, Operation::CreateAccountHolder) if refused => Some(H::Failed),
        (H::Active, Operation::DeleteAccountHolder) if done => Some(H::Deleted),
        _ => None,
    }
}

/// What an outcome does to a saved method (`None`: nothing). A save that needs the customer to
/// act first (3-D Secure on a setup) fails: the host has no flow to finish it, and a method
/// that cannot be charged off-session is no saved method.
pub fn method_after(
    status: MethodStatus,
    operation: Operation,
    outcome: &Outcome,
) -> Option<MethodStatus> {
    use MethodStatus as M;
    match (status, operation, outcome) {
        (M::Pending, Operation::SavePaymentMethod, Outcome::Processed) => Some(M::Saved),
        (
            M::Pending,
            Operation::SavePaymentMethod,
            Outcome::Declined { .. } | Outcome::NotAttempted { .. } | Outcome::RequiresMore { .. },
        ) => Some(M::Failed),
        (M::Pending | M::Saved, Operation::DeletePaymentMethod, Outcome::Processed) => {
            Some(M::Deleted)
        }
        // The holder's delete detaches every method.
        (M::Pending | M::Saved, Operation::DeleteAccountHolder, Outcome::Processed) => {
            Some(M::Deleted)
        }
        _ => None,
    }
}

/// Whether an outcome settles a holder attempt: `pending` and `unknown` leave it open.
pub fn settles(outcome: &Outcome) -> Option<AttemptState> {
    match outcome {
        Outcome::Processed => Some(AttemptState::Succeeded),
        Outcome::Declined { .. } | Outcome::NotAttempted { .. } | Outcome::RequiresMore { .. } => {
            Some(AttemptState::Failed)
        }
        Outcome::Pending | Outcome::Unknown { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{HolderStatus as H, MethodStatus as M, holder_after, method_after, settles};
    use crate::domain::{AttemptState, Operation};
    use payhost_provider_api::Outcome;

    fn declined() -> Outcome {
        Outcome::Declined {
            code: None,
            message: "no".into(),
        }
    }

    #[test]
    fn terminal_holders_never_move_back() {
        for s in [H::Deleted, H::Failed] {
            for op in Operation::ACCOUNT_HOLDER {
                assert_eq!(holder_after(s, op, &Outcome::Processed), None, "{s:?} {op}");
            }
        }
        assert_eq!(
            holder_after(H::Pending, Operation::CreateAccountHolder, &declined()),
            Some(H::Failed)
        );
        // An unknown create stays pending; a declined delete leaves the holder active.
        let unknown = Outcome::Unknown { reason: "t".into() };
        assert_eq!(
            holder_after(H::Pending, Operation::CreateAccountHolder, &unknown),
            None
        );
        assert_eq!(
            holder_after(H::Active, Operation::DeleteAccountHolder, &declined()),
            None
        );
    }

    #[test]
    fn a_method_is_saved_only_by_a_processed_save() {
        assert_eq!(
            method_after(
                M::Pending,
                Operation::SavePaymentMethod,
                &Outcome::Processed
            ),
            Some(M::Saved)
        );
        let more = Outcome::RequiresMore {
            next_action: serde_json::Value::Null,
        };
        assert_eq!(
            method_after(M::Pending, Operation::SavePaymentMethod, &more),
            Some(M::Failed)
        );
        assert_eq!(
            method_after(
                M::Deleted,
                Operation::SavePaymentMethod,
                &Outcome::Processed
            ),
            None
        );
        assert_eq!(
            method_after(
                M::Saved,
                Operation::DeleteAccountHolder,
                &Outcome::Processed
            ),
            Some(M::Deleted)
        );
        assert_eq!(settles(&Outcome::Pending), None);
        assert_eq!(settles(&declined()), Some(AttemptState::Failed));
    }
}
