//! The write-ahead core: record an attempt before the call, record its outcome
//! and effects after, in one write each; and ask a provider about an earlier attempt.

use super::{
    AttemptRef, CLIENT_KEY, CallError, Duration, EngineError, EventType, Host, MoneyRequest,
    Outcome, Provider, ProviderResponse, RetrieveRequest, SessionInput, Step, StoreError, Value,
    WriteOp, current_actor, late_boxed, not_found, owed, provider_data, settled_state, transitions,
};
use crate::domain::*;

/// The entity an attempt's outcome applies to, as this host last wrote it: settling writes over
/// its version without reading it again, and reads afresh only if it changed meanwhile.
pub(super) enum Current {
    /// Not at hand: read it.
    Unknown,
    /// The session of an authorize.
    Session(PaymentSession),
    /// The payment of a capture, refund or cancel.
    Payment(Payment),
}

/// What settling an outcome left, as written.
#[derive(Default)]
pub(super) struct Settled {
    /// The session, after an authorize.
    pub session: Option<PaymentSession>,
    /// The payment: created by an authorize, or after a capture, refund or cancel.
    pub payment: Option<Payment>,
}

impl Host {
    pub(super) async fn refuse_if_open(&self, entity: &str) -> Result<(), EngineError> {
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
    pub(super) async fn begin(&self, attempt: &Attempt, bump: WriteOp) -> Result<(), EngineError> {
        let mut ops = vec![WriteOp::InsertAttempt(attempt.clone()), bump];
        if let Ok(Some(key)) = CLIENT_KEY.try_with(Clone::clone) {
            ops.push(WriteOp::LinkKey {
                key,
                attempt_id: attempt.id.0.clone(),
            });
        }
        match self.store.write(ops).await {
            Ok(()) => Ok(()),
            Err(StoreError::AttemptOpen(what)) => {
                // Another attempt is open: say which, if its outcome is what blocks this one.
                self.refuse_if_open(&attempt.entity()).await?;
                Err(StoreError::AttemptOpen(what).into())
            }
            Err(e) if owed::is_transient(&e) => {
                // Maybe it committed, maybe not; either way no call was made: an attempt that
                // did get recorded must not stay in flight, blocking its payment.
                let mut never_called = attempt.clone();
                never_called.state = AttemptState::Failed;
                never_called.error = Some(Value::String(format!(
                    "the store did not confirm this attempt ({e}); the provider was not called"
                )));
                self.owed.push(
                    "closing an attempt whose start was not confirmed",
                    vec![WriteOp::UpdateAttempt(never_called)],
                );
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn new_attempt(
        &self,
        session: &PaymentSession,
        payment: Option<&Payment>,
        provider: &Provider,
        operation: Operation,
        amount: i64,
        reason: Option<String>,
    ) -> Attempt {
        let id = AttemptId::generate();
        let now = self.now();
        let call_deadline_at = now + provider.timeout().as_millis() as i64;
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
            call_deadline_at: Some(call_deadline_at),
            requested_by: current_actor(),
            // The store records the owner (this host, on a shared store).
            owner_host: None,
            owner_epoch: None,
            resends: 0,
        }
    }

    /// Makes an attempt's provider call under the deadline recorded with it. The call counts as
    /// live until its thread returns, even after the deadline; an overrun call's late answer is
    /// queued for the reconciler, which settles the attempt with it.
    pub(super) async fn call_money(
        &self,
        provider: &Provider,
        attempt: &Attempt,
        request: MoneyRequest,
    ) -> Result<ProviderResponse, CallError> {
        let live = self.live.enter(attempt.id.as_str());
        let remaining = attempt.call_deadline_at.map_or(provider.timeout(), |at| {
            Duration::from_millis((at - self.now()).max(0) as u64)
        });
        let deadline = std::time::Instant::now() + remaining;
        let (answer, late) = match request {
            MoneyRequest::Authorize(r) => late_boxed(provider.call_until(r, deadline).await),
            MoneyRequest::Capture(r) => late_boxed(provider.call_until(r, deadline).await),
            MoneyRequest::Refund(r) => late_boxed(provider.call_until(r, deadline).await),
            MoneyRequest::Cancel(r) => late_boxed(provider.call_until(r, deadline).await),
        };
        match late {
            None => drop(live),
            Some(late) => {
                let queue = self.late.clone();
                let attempt_id = attempt.id.0.clone();
                tokio::spawn(async move {
                    let answer = late.await;
                    drop(live);
                    queue.push(attempt_id, answer);
                });
            }
        }
        answer
    }

    /// Whether an attempt's call may still reach the processor: it is running in this process,
    /// or its deadline plus the landing margin has not passed. While it may, "not attempted"
    /// proves nothing.
    pub(super) fn may_still_land(&self, attempt: &Attempt, now: Timestamp) -> bool {
        self.live.contains(attempt.id.as_str()) || now < self.landing_horizon(attempt)
    }

    /// When an attempt's call can no longer land, if it is not running in this process.
    pub(super) fn landing_horizon(&self, attempt: &Attempt) -> Timestamp {
        attempt
            .call_deadline_at
            .unwrap_or(attempt.created_at + crate::config::MAX_TIMEOUT_MS as i64)
            + self.reconcile.landing_margin_ms
    }

    /// Records what a provider call gave: a definitive outcome through [`Host::settle`]; an
    /// unreadable or late one as `unknown` for the reconciler; an error as a failed attempt.
    /// Returns the outcome, or the error the caller should see.
    pub(super) async fn after_call(
        &self,
        mut attempt: Attempt,
        answer: Result<ProviderResponse, CallError>,
        current: Current,
    ) -> Result<(Outcome, Settled), EngineError> {
        let attempt_id = attempt.id.0.clone();
        match answer {
            Ok(response) => {
                let outcome = response.outcome.clone();
                let data = match self.providers().get(&attempt.provider_id) {
                    Some(p) => provider_data(p, response.data.clone()),
                    None => response.data.clone(),
                };
                let settled = match self
                    .settle(attempt, outcome.clone(), data, None, current)
                    .await
                {
                    Ok(settled) => settled,
                    // The answer is known: kept, and recorded as soon as the store answers.
                    Err(EngineError::Store(e)) if owed::is_transient(&e) => {
                        self.late.requeue(attempt_id.clone(), Ok(response));
                        return Err(EngineError::Store(StoreError::Unavailable(format!(
                            "the provider answered {} for attempt {attempt_id}, and the store failed to record it ({e}); it is kept and recorded once the store answers — retry with your idempotency key",
                            outcome.name()
                        ))));
                    }
                    Err(e) => return Err(e),
                };
                match outcome {
                    Outcome::Unknown { reason } => {
                        Err(EngineError::OutcomeUnknown { attempt_id, reason })
                    }
                    Outcome::NotAttempted { reason } => Err(EngineError::NotAttempted { reason }),
                    other => Ok((other, settled)),
                }
            }
            Err(e) if e.outcome_is_unknown() => {
                attempt.state = AttemptState::Unknown;
                attempt.error = serde_json::to_value(e.to_string()).ok();
                attempt.next_check_at = Some(self.now() + self.reconcile.first_check_ms);
                attempt.updated_at = self.now();
                let event = self.attempt_event(EventType::AttemptUnknown, &attempt, None);
                self.write_or_owe(
                    "marking an attempt unknown",
                    vec![WriteOp::UpdateAttempt(attempt), event],
                )
                .await?;
                tracing::warn!(attempt = %attempt_id, "provider outcome unknown: {e}");
                Err(EngineError::OutcomeUnknown {
                    attempt_id,
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                // A late answer can settle an attempt that was unknown: that resolves it.
                let was_unknown = matches!(
                    attempt.state,
                    AttemptState::Unknown | AttemptState::NeedsOperator
                );
                attempt.state = AttemptState::Failed;
                attempt.error = Some(match &e {
                    CallError::Provider(pe) => serde_json::to_value(pe).unwrap_or(Value::Null),
                    other => Value::String(other.to_string()),
                });
                attempt.updated_at = self.now();
                let event = was_unknown.then(|| {
                    self.attempt_event(EventType::AttemptResolved, &attempt, Some("late answer"))
                });
                self.write_or_owe(
                    "recording a failed attempt",
                    [WriteOp::UpdateAttempt(attempt)]
                        .into_iter()
                        .chain(event)
                        .collect(),
                )
                .await?;
                Err(match e {
                    CallError::NotAttempted { reason } => EngineError::NotAttempted { reason },
                    CallError::Provider(pe) => EngineError::Provider(pe),
                    // Unknown outcomes took the branch above.
                    e @ (CallError::Unknown { .. } | CallError::AnswerTooLarge { .. }) => {
                        EngineError::NotAttempted {
                            reason: e.to_string(),
                        }
                    }
                })
            }
        }
    }

    /// Writes `ops`, or, when the store does not answer, keeps them to write once it does.
    pub(super) async fn write_or_owe(
        &self,
        what: &'static str,
        ops: Vec<WriteOp>,
    ) -> Result<(), EngineError> {
        match self.store.write(ops.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if owed::is_transient(&e) => {
                self.owed.push(what, ops);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Applies a definitive `outcome` of `attempt` and its effects in one write. Used after a call,
    /// by the reconciler, and by an operator's resolution. An `unknown` outcome keeps the attempt
    /// open for the reconciler. A concurrent change of the entity (a selection, another host's
    /// write) makes it read again and retry: an outcome once known is not dropped.
    pub(super) async fn settle(
        &self,
        attempt: Attempt,
        outcome: Outcome,
        data: Option<Value>,
        resolution: Option<Resolution>,
        current: Current,
    ) -> Result<Settled, EngineError> {
        let mut tries = 0;
        let mut current = current;
        loop {
            let result = self
                .settle_once(
                    attempt.clone(),
                    outcome.clone(),
                    data.clone(),
                    resolution.clone(),
                    std::mem::replace(&mut current, Current::Unknown),
                )
                .await;
            match result {
                Err(EngineError::Store(StoreError::VersionConflict(_))) if tries < 8 => tries += 1,
                other => return other,
            }
        }
    }

    pub(super) async fn settle_once(
        &self,
        mut attempt: Attempt,
        outcome: Outcome,
        data: Option<Value>,
        resolution: Option<Resolution>,
        current: Current,
    ) -> Result<Settled, EngineError> {
        let now = self.now();
        // Whether it was unknown (or with an operator) before: then this write resolves it.
        let was_unknown = matches!(
            attempt.state,
            AttemptState::Unknown | AttemptState::NeedsOperator
        );
        let resolved_by = match &resolution {
            Some(r) => r.by.clone(),
            None => "reconciler".to_owned(),
        };
        attempt.updated_at = now;
        attempt.outcome = serde_json::to_value(&outcome).ok();
        attempt.resolution = resolution;
        attempt.state = settled_state(&outcome);
        if attempt.state == AttemptState::Unknown {
            attempt.next_check_at = Some(now + self.reconcile.first_check_ms);
            let event = (!was_unknown)
                .then(|| self.attempt_event(EventType::AttemptUnknown, &attempt, None));
            self.store
                .write(
                    [WriteOp::UpdateAttempt(attempt)]
                        .into_iter()
                        .chain(event)
                        .collect(),
                )
                .await?;
            return Ok(Settled::default());
        }
        let mut ops = Vec::new();
        let mut events = Vec::new();
        let mut settled = Settled::default();
        match attempt.operation {
            Operation::Authorize => {
                let mut session = match current {
                    Current::Session(s) if s.id == attempt.session_id => s,
                    _ => self
                        .store
                        .session(&attempt.session_id)
                        .await?
                        .ok_or_else(|| not_found("payment session", attempt.session_id.as_str()))?,
                };
                let expected = session.version;
                let before = session.status;
                let mut payment_id = None;
                match transitions::session(session.status, SessionInput::Authorized(&outcome)) {
                    Step::To(status) => {
                        if status == SessionStatus::Authorized && session.status != status {
                            session.payment_authorized_at = Some(now);
                            let payment = self.payment_for(&session, now);
                            payment_id = Some(payment.id.clone());
                            settled.payment = Some(payment.clone());
                            ops.push(WriteOp::InsertPayment(payment));
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
                events.extend(self.session_changed(Some(before), &session, payment_id.as_ref()));
                settled.session = Some(session.clone());
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
                let mut payment = match current {
                    Current::Payment(p) if p.id == payment_id => p,
                    _ => self
                        .store
                        .payment(&payment_id)
                        .await?
                        .ok_or_else(|| not_found("payment", payment_id.as_str()))?,
                };
                if outcome == Outcome::Processed {
                    let expected = payment.version;
                    let kind = match attempt.operation {
                        Operation::Capture => EventType::PaymentCaptured,
                        Operation::Refund => EventType::PaymentRefunded,
                        _ => EventType::PaymentCanceled,
                    };
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
                            payment.captures.push(capture.clone());
                            ops.push(WriteOp::InsertCapture(payment.id.clone(), capture));
                        }
                        Operation::Refund => {
                            let refund = Refund {
                                id: RefundId::generate(),
                                amount: attempt.amount,
                                reason: attempt.reason.clone(),
                                attempt_id: attempt.id.clone(),
                                created_at: now,
                            };
                            payment.refunds.push(refund.clone());
                            ops.push(WriteOp::InsertRefund(payment.id.clone(), refund));
                        }
                        _ => payment.canceled_at = Some(now),
                    }
                    if let Some(data) = data {
                        payment.data = data;
                    }
                    payment.version += 1;
                    payment.updated_at = now;
                    events.push(self.payment_event(kind, &payment, attempt.amount, &attempt.id));
                    ops.push(WriteOp::UpdatePayment {
                        payment: payment.clone(),
                        expected_version: expected,
                    });
                } else if matches!(outcome, Outcome::Pending) {
                    // A capture, refund or cancel the processor will finish later: keep asking.
                    attempt.state = AttemptState::Unknown;
                    attempt.next_check_at = Some(now + self.reconcile.first_check_ms);
                } else if matches!(outcome, Outcome::RequiresMore { .. }) {
                    attempt.state = AttemptState::Failed;
                }
                settled.payment = Some(payment);
            }
            _ => {}
        }
        // The attempt's own event comes first: what became of the call, then its effects.
        if attempt.state == AttemptState::Unknown && !was_unknown {
            // A pending capture, refund or cancel: asked about until it ends.
            events.insert(
                0,
                self.attempt_event(EventType::AttemptUnknown, &attempt, None),
            );
        } else if attempt.state != AttemptState::Unknown && was_unknown {
            events.insert(
                0,
                self.attempt_event(EventType::AttemptResolved, &attempt, Some(&resolved_by)),
            );
        }
        ops.insert(0, WriteOp::UpdateAttempt(attempt));
        ops.extend(events);
        // Raw store errors: `settle` retries a version conflict.
        self.store.write(ops).await.map_err(EngineError::Store)?;
        Ok(settled)
    }

    pub(super) fn payment_for(&self, session: &PaymentSession, now: Timestamp) -> Payment {
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

    /// Sends an attempt's request again with its idempotency key, to a provider whose processor
    /// replays a repeated key: the answer is the first call's. The new deadline is recorded
    /// first, like any call.
    pub(super) async fn resend(&self, mut attempt: Attempt) -> Result<Outcome, CallError> {
        let not_sent = |reason: String| CallError::NotAttempted { reason };
        let provider = self
            .providers()
            .get(&attempt.provider_id)
            .ok_or_else(|| not_sent(format!("provider `{}` is not loaded", attempt.provider_id)))?
            .clone();
        let payment_id = attempt
            .payment_id
            .clone()
            .ok_or_else(|| not_sent("only payment operations are sent again".into()))?;
        let read = |e: StoreError| not_sent(format!("cannot read the payment: {e}"));
        let payment = self
            .store
            .payment(&payment_id)
            .await
            .map_err(read)?
            .ok_or_else(|| not_sent(format!("payment {payment_id} is gone")))?;
        let session = self
            .store
            .session(&payment.payment_session_id)
            .await
            .map_err(read)?
            .ok_or_else(|| not_sent("the payment's session is gone".into()))?;
        let now = self.now();
        let call_ms = provider.timeout().as_millis() as i64;
        self.store
            .write(vec![WriteOp::ExtendDeadline {
                id: attempt.id.clone(),
                call_ms,
                now,
            }])
            .await
            .map_err(|e| not_sent(format!("cannot record the new deadline: {e}")))?;
        attempt.call_deadline_at = Some(now + call_ms);
        tracing::info!(attempt = %attempt.id, operation = %attempt.operation, "sending the attempt again with its idempotency key");
        let request = Self::payment_request(&session, &payment, &attempt);
        let response = self.call_money(&provider, &attempt, request).await?;
        Ok(response.outcome)
    }

    /// The provider's answer to an earlier attempt.
    pub(super) async fn ask_about(&self, attempt: &Attempt) -> Result<Outcome, CallError> {
        let provider = self
            .providers()
            .get(&attempt.provider_id)
            .cloned()
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
