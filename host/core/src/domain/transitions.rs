//! The transition tables: the only code that decides a status. A provider's answer is an input
//! here, never the new status by itself, and terminal states never move back.

use payhost_provider_api::{Outcome, WebhookAction};

use super::{CollectionStatus, Payment, PaymentSession, SessionStatus};

/// What may happen to a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SessionInput<'a> {
    /// The caller asks to authorize.
    Authorize,
    /// The caller asks to update amount, cart or context.
    Update,
    /// The caller asks to delete the session.
    Delete,
    /// The provider answered an authorize.
    Authorized(&'a Outcome),
    /// A webhook or a sync reported this.
    Reported(WebhookAction),
}

/// The table's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Allowed; the status becomes (or stays) this.
    To(SessionStatus),
    /// Allowed, nothing changes.
    Unchanged,
    /// Not applied: a late or out-of-order report about a session that has moved on. Logged.
    Ignored(&'static str),
    /// Refused: the caller asked for something this status does not allow.
    Refused(String),
}

/// The session transition table.
pub fn session(status: SessionStatus, input: SessionInput<'_>) -> Step {
    use SessionInput as I;
    use SessionStatus as S;
    let open = matches!(status, S::Pending | S::RequiresMore);
    match (status, input) {
        (S::Pending | S::RequiresMore, I::Authorize | I::Update | I::Delete) => Step::Unchanged,
        (S::Authorized, I::Authorize) => Step::Unchanged, // idempotent: already authorized
        (_, I::Authorize | I::Update | I::Delete) => Step::Refused(format!(
            "a session that is {} cannot be {}",
            status.as_str(),
            match input {
                I::Authorize => "authorized",
                I::Update => "updated",
                _ => "deleted",
            }
        )),

        (S::Pending | S::RequiresMore, I::Authorized(outcome)) => match outcome {
            Outcome::Processed => Step::To(S::Authorized),
            Outcome::RequiresMore { .. } => Step::To(S::RequiresMore),
            Outcome::Pending => Step::To(S::Pending),
            Outcome::Declined { .. } => Step::To(S::Error),
            Outcome::NotAttempted { .. } | Outcome::Unknown { .. } => Step::Unchanged,
        },
        (_, I::Authorized(_)) => Step::Ignored("an authorize answer for a session that moved on"),

        (_, I::Reported(action)) if open => match action {
            WebhookAction::Authorized | WebhookAction::Captured => Step::To(S::Authorized),
            WebhookAction::Failed => Step::To(S::Error),
            WebhookAction::Canceled => Step::To(S::Canceled),
            WebhookAction::RequiresMore => Step::To(S::RequiresMore),
            WebhookAction::Pending | WebhookAction::NotSupported => Step::Unchanged,
        },
        (_, I::Reported(_)) => Step::Ignored("the session is in a terminal state"),
    }
}

/// What may happen to a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentInput {
    /// Capture this much.
    Capture(i64),
    /// Refund this much.
    Refund(i64),
    /// Cancel (void).
    Cancel,
}

/// Checks a payment operation against the payment's amounts and state; `Err` says why not.
/// (The database enforces the same sums; this gives the clear message first.)
pub fn payment(p: &Payment, input: PaymentInput) -> Result<(), String> {
    let captured = p.captured_amount();
    let refunded = p.refunded_amount();
    if p.canceled_at.is_some() {
        return Err("the payment is canceled".into());
    }
    match input {
        // What is left, when nothing is: no amount was asked for, and there is none to take.
        PaymentInput::Capture(0) => Err(format!(
            "nothing is left to capture: {captured} of {} is captured",
            p.amount
        )),
        PaymentInput::Refund(0) => Err(format!(
            "nothing is left to refund: {refunded} of the {captured} captured is refunded"
        )),
        PaymentInput::Capture(amount) => {
            if captured.checked_add(amount).is_none_or(|t| t > p.amount) {
                Err(format!(
                    "capturing {amount} would exceed the authorized {} ({captured} already captured)",
                    p.amount
                ))
            } else {
                Ok(())
            }
        }
        PaymentInput::Refund(amount) => {
            if refunded.checked_add(amount).is_none_or(|t| t > captured) {
                Err(format!(
                    "refunding {amount} would exceed what was captured, {captured} ({refunded} already refunded)"
                ))
            } else {
                Ok(())
            }
        }
        PaymentInput::Cancel => {
            if captured > 0 {
                Err("a payment with captures cannot be canceled; refund it instead".into())
            } else {
                Ok(())
            }
        }
    }
}

/// A collection's totals that cannot be represented: over [`super::MAX_AMOUNT`] minor units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the collection's {what} sums past {} minor units, which no client can represent exactly",
    super::MAX_AMOUNT
)]
pub struct TotalTooLarge {
    /// `authorized`, `captured` or `refunded`.
    pub what: &'static str,
}

/// Σ `amounts`, refused past [`super::MAX_AMOUNT`] (never wrapping).
fn total(what: &'static str, amounts: impl Iterator<Item = i64>) -> Result<i64, TotalTooLarge> {
    let mut sum: i64 = 0;
    for a in amounts {
        sum = sum
            .checked_add(a)
            .filter(|s| *s <= super::MAX_AMOUNT)
            .ok_or(TotalTooLarge { what })?;
    }
    Ok(sum)
}

/// A collection's status and its authorized, captured and refunded totals, derived.
pub fn collection(
    amount: i64,
    sessions: &[PaymentSession],
    payments: &[Payment],
) -> Result<(CollectionStatus, i64, i64, i64), TotalTooLarge> {
    let live: Vec<&Payment> = payments
        .iter()
        .filter(|p| p.canceled_at.is_none())
        .collect();
    let authorized = total("authorized amount", live.iter().map(|p| p.amount))?;
    let captured = total(
        "captured amount",
        payments.iter().map(|p| p.captured_amount()),
    )?;
    let refunded = total(
        "refunded amount",
        payments.iter().map(|p| p.refunded_amount()),
    )?;
    let status = if !payments.is_empty() && live.is_empty() {
        CollectionStatus::Canceled
    } else if captured >= amount {
        CollectionStatus::Completed
    } else if authorized >= amount {
        CollectionStatus::Authorized
    } else if authorized > 0 {
        CollectionStatus::PartiallyAuthorized
    } else if sessions.iter().any(|s| {
        matches!(
            s.status,
            SessionStatus::Pending | SessionStatus::RequiresMore
        ) && s.is_initiated
    }) {
        CollectionStatus::Awaiting
    } else {
        CollectionStatus::NotPaid
    };
    Ok((status, authorized, captured, refunded))
}

#[cfg(test)]
mod tests {
    use super::{Outcome, SessionInput, SessionStatus, Step, WebhookAction, session};
    use SessionStatus as S;

    #[test]
    fn terminal_session_states_never_move_back() {
        for terminal in [S::Authorized, S::Error, S::Canceled] {
            for action in [
                WebhookAction::Pending,
                WebhookAction::Authorized,
                WebhookAction::Failed,
                WebhookAction::RequiresMore,
                WebhookAction::Canceled,
            ] {
                assert!(matches!(
                    session(terminal, SessionInput::Reported(action)),
                    Step::Ignored(_)
                ));
            }
            assert!(matches!(
                session(terminal, SessionInput::Authorized(&Outcome::Pending)),
                Step::Ignored(_)
            ));
        }
    }

    #[test]
    fn an_answer_is_an_input_not_the_status() {
        assert_eq!(
            session(S::Pending, SessionInput::Authorized(&Outcome::Processed)),
            Step::To(S::Authorized)
        );
        let declined = Outcome::Declined {
            code: None,
            message: String::new(),
        };
        assert_eq!(
            session(S::RequiresMore, SessionInput::Authorized(&declined)),
            Step::To(S::Error)
        );
        let unknown = Outcome::Unknown {
            reason: String::new(),
        };
        assert_eq!(
            session(S::Pending, SessionInput::Authorized(&unknown)),
            Step::Unchanged
        );
        assert!(matches!(
            session(S::Error, SessionInput::Authorize),
            Step::Refused(_)
        ));
        assert_eq!(
            session(S::Authorized, SessionInput::Authorize),
            Step::Unchanged
        );
    }
}

#[cfg(test)]
mod totals {
    use super::{CollectionStatus, Payment, PaymentInput, collection};
    use crate::domain::{
        AttemptId, Capture, CaptureId, CollectionId, Currency, MAX_AMOUNT, PaymentId, SessionId,
    };

    fn payment(amount: i64) -> Payment {
        Payment {
            id: PaymentId::generate(),
            payment_session_id: SessionId::generate(),
            payment_collection_id: CollectionId::generate(),
            provider_id: "system".into(),
            amount,
            currency_code: Currency::parse("eur").unwrap(),
            data: serde_json::Value::Null,
            captures: Vec::new(),
            refunds: Vec::new(),
            captured_at: None,
            canceled_at: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
        }
    }

    /// 1,024 payments of 2^53 once wrapped an i64 to a small, wrong total; past what a client
    /// can represent the total is refused instead.
    #[test]
    fn totals_past_what_a_client_represents_are_refused_not_wrapped() {
        let many: Vec<Payment> = (0..1024).map(|_| payment(MAX_AMOUNT)).collect();
        let e = collection(MAX_AMOUNT, &[], &many).unwrap_err();
        assert_eq!(e.what, "authorized amount");
        let two = [payment(MAX_AMOUNT), payment(1)];
        assert!(collection(MAX_AMOUNT, &[], &two).is_err());
        let fits = [payment(MAX_AMOUNT - 1), payment(1)];
        let (status, authorized, _, _) = collection(MAX_AMOUNT, &[], &fits).unwrap();
        assert_eq!(
            (status, authorized),
            (CollectionStatus::Authorized, MAX_AMOUNT)
        );
    }

    /// Asked for "what is left" (no amount) when nothing is, the answer says so: an invalid
    /// state, not an amount nobody sent.
    #[test]
    fn nothing_left_is_named_as_such() {
        let mut p = payment(500);
        p.captures.push(Capture {
            id: CaptureId::generate(),
            amount: 500,
            attempt_id: AttemptId::generate(),
            created_at: 1,
        });
        let e = super::payment(&p, PaymentInput::Capture(0)).unwrap_err();
        assert_eq!(e, "nothing is left to capture: 500 of 500 is captured");
        assert!(super::payment(&p, PaymentInput::Refund(500)).is_ok());
        let e = super::payment(&payment(500), PaymentInput::Refund(0)).unwrap_err();
        assert!(e.starts_with("nothing is left to refund"), "{e}");
        let e = super::payment(&p, PaymentInput::Capture(1)).unwrap_err();
        assert!(e.contains("would exceed"), "{e}");
    }
}
