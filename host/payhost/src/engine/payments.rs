//! Payments: capture, refund, cancel.

use super::{
    CancelRequest, CaptureRequest, Current, EngineError, Host, MoneyRequest, Outcome, PaymentInput,
    ProviderError, RefundRequest, Settled, Value, WriteOp, inputs, not_found, transitions,
};
use crate::domain::*;
use inputs::*;

impl Host {
    pub(super) async fn payment_op(
        &self,
        id: &str,
        operation: Operation,
        amount: Option<i64>,
        reason: Option<String>,
    ) -> Result<Payment, EngineError> {
        let _guard = self.locks.lock(id).await;
        let pid = PaymentId::parse(id).ok_or_else(|| not_found("payment", id))?;
        let (mut payment, session) = self
            .store
            .payment_and_session(&pid)
            .await?
            .ok_or_else(|| not_found("payment", id))?;
        // An open outcome comes first: until it resolves, the amounts are not the truth, so a
        // refusal below is checked against it (and the database refuses a second open attempt).
        let amount = match self.check_payment_op(&payment, operation, amount) {
            Ok(amount) => amount,
            Err(refused) => {
                self.refuse_if_open(payment.id.as_str()).await?;
                return Err(refused);
            }
        };
        let provider = self.provider(&payment.provider_id)?.clone();
        let attempt = self.new_attempt(
            &session,
            Some(&payment),
            &provider,
            operation,
            amount,
            reason.clone(),
        );
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
        let request = Self::payment_request(&session, &payment, &attempt);
        let answer = self.call_money(&provider, &attempt, request).await;
        let attempt_id = attempt.id.0.clone();
        match self
            .after_call(attempt, answer, Current::Payment(payment))
            .await
        {
            Ok((Outcome::Declined { code, message }, _)) => {
                Err(EngineError::Declined { code, message })
            }
            Ok((Outcome::Pending, _)) => Err(EngineError::OutcomeUnknown {
                attempt_id,
                reason: "the provider will finish it later".into(),
            }),
            Ok((Outcome::RequiresMore { .. }, _)) => {
                Err(EngineError::Provider(ProviderError::new(
                    payhost_provider_api::ErrorKind::InvalidRequest,
                    format!("the provider asked for customer action on a {operation}"),
                )))
            }
            Ok((
                _,
                Settled {
                    payment: Some(p), ..
                },
            )) => Ok(p),
            Ok(_) => self.payment(id).await,
            Err(EngineError::OutcomeUnknown { reason, .. }) => {
                Err(EngineError::OutcomeUnknown { attempt_id, reason })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the payment's state, the amount and the provider's capabilities allow the
    /// operation; the amount it moves (a capture or refund without one: what remains).
    fn check_payment_op(
        &self,
        payment: &Payment,
        operation: Operation,
        amount: Option<i64>,
    ) -> Result<i64, EngineError> {
        let provider = self.provider(&payment.provider_id)?.clone();
        let caps = provider.manifest().capabilities;
        let captured = payment.captured_amount();
        let refunded = payment.refunded_amount();
        let given_none = amount.is_none();
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
        // No amount asked for and nothing left: the transition says so (invalid state), not an
        // amount nobody sent.
        let nothing_left = given_none && amount == 0;
        if operation != Operation::Cancel && !nothing_left {
            Money::of(amount, payment.currency_code)
                .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
        }
        transitions::payment(payment, input).map_err(EngineError::InvalidTransition)?;
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
        Ok(amount)
    }

    /// The provider request an attempt on a payment makes: the same every time it is sent.
    pub(super) fn payment_request(
        session: &PaymentSession,
        payment: &Payment,
        attempt: &Attempt,
    ) -> MoneyRequest {
        let currency_code = payment.currency_code.code().to_owned();
        match attempt.operation {
            Operation::Capture => MoneyRequest::Capture(CaptureRequest {
                session_id: session.id.0.clone(),
                payment_id: payment.id.0.clone(),
                idempotency_key: attempt.idempotency_key.clone(),
                amount: attempt.amount,
                currency_code,
                data: payment.data.clone(),
                deadline_unix_ms: None,
            }),
            Operation::Refund => MoneyRequest::Refund(RefundRequest {
                session_id: session.id.0.clone(),
                payment_id: payment.id.0.clone(),
                idempotency_key: attempt.idempotency_key.clone(),
                amount: attempt.amount,
                currency_code,
                data: payment.data.clone(),
                reason: attempt.reason.clone(),
                deadline_unix_ms: None,
            }),
            _ => MoneyRequest::Cancel(CancelRequest {
                session_id: session.id.0.clone(),
                payment_id: Some(payment.id.0.clone()),
                idempotency_key: attempt.idempotency_key.clone(),
                amount: attempt.amount,
                currency_code,
                data: payment.data.clone(),
                deadline_unix_ms: None,
            }),
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
}
