//! Settling attempts whose outcome is open: at start-up, periodically with a backoff, and by an
//! operator when the backoff runs out. The provider's `retrieve` is asked about the attempt's
//! idempotency key; only a definitive answer settles it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use payhost_provider_api::{Operation, Outcome, ProviderResponse};
use serde::Serialize;

use super::attempts::Current;
use super::no_attempt;
use super::{EngineError, Host, not_found};
use crate::domain::{Attempt, AttemptState, Resolution};
use crate::events::EventType;
use crate::provider::CallError;
use crate::store::WriteOp;

/// How the reconciler paces itself.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// Delay before the first check of a fresh unknown attempt.
    pub first_check_ms: i64,
    /// Backoff: the n-th check waits `base_backoff_ms × 2^n`, at most `max_backoff_ms`.
    pub base_backoff_ms: i64,
    /// Longest wait between checks.
    pub max_backoff_ms: i64,
    /// After this many inconclusive checks the attempt waits for an operator.
    pub max_checks: i64,
    /// An in-flight attempt older than this belongs to a call that died with its process.
    pub stale_after_ms: i64,
    /// How often the background reconciler looks for due attempts.
    pub interval: Duration,
    /// How long after a call's deadline it may still reach the processor (a request already
    /// on the wire, a processor still working on it): until then "not attempted" proves
    /// nothing.
    pub landing_margin_ms: i64,
    /// Attempts one pass asks about at once.
    pub concurrency: usize,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            first_check_ms: 500,
            base_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            max_checks: 12,
            stale_after_ms: 120_000,
            interval: Duration::from_secs(1),
            landing_margin_ms: 10_000,
            concurrency: 8,
        }
    }
}

/// What one reconciliation pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Attempts settled (succeeded or failed).
    pub settled: usize,
    /// Attempts asked about, still open.
    pub still_open: usize,
    /// Attempts that now wait for an operator.
    pub needs_operator: usize,
}

/// How an operator settles an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveAs {
    /// It took effect at the processor.
    Succeeded,
    /// It did not.
    Failed,
}

impl Host {
    /// Start-up recovery: in-flight attempts of a process that is gone become unknown and are
    /// asked about now, and idempotency keys it left without a response are released. On a
    /// store of one host that is every one of them; on a shared store only the stale ones (a
    /// live host finishes its calls well within `stale_after_ms`). Returns what the first pass
    /// settled.
    pub async fn recover(&self) -> Result<ReconcileReport, EngineError> {
        self.take_over_abandoned().await?;
        self.reconcile_due().await
    }

    /// The quick half of [`Host::recover`]: marks the abandoned attempts unknown (due now) and
    /// releases the keys they left, in one write, without asking any provider. The reconciler's
    /// first pass asks; until it is done, [`Host::recovered`] is false.
    pub async fn take_over_abandoned(&self) -> Result<(), EngineError> {
        let now = self.now();
        if self.store.shared() {
            // Other hosts may be live: only the keys of lapsed hosts go; their attempts are
            // taken over one by one by the reconciler's claims, on the database's clock.
            self.store
                .write(vec![WriteOp::ReleasePendingKeys {
                    older_than: now - self.reconcile.stale_after_ms,
                }])
                .await?;
            return Ok(());
        }
        let horizon = if self.store.shared() {
            now - self.reconcile.stale_after_ms
        } else {
            now + 1
        };
        let mut ops = vec![WriteOp::ReleasePendingKeys {
            older_than: horizon,
        }];
        let mut abandoned = 0;
        for t in self.store.open_holder_attempts().await? {
            if t.state == AttemptState::InFlight && !self.live.contains(t.id.as_str()) {
                let mut unknown = t.clone();
                unknown.state = AttemptState::Unknown;
                unknown.next_check_at = Some(now);
                unknown.updated_at = now;
                unknown.version += 1;
                ops.push(WriteOp::UpdateHolderAttempt {
                    attempt: unknown,
                    expected_version: t.version,
                });
                abandoned += 1;
            }
        }
        for mut a in self.store.open_attempts().await? {
            if a.state == AttemptState::InFlight && a.updated_at < horizon {
                a.state = AttemptState::Unknown;
                a.next_check_at = Some(now);
                a.updated_at = now;
                ops.push(self.attempt_event(EventType::AttemptUnknown, &a, None));
                ops.push(WriteOp::UpdateAttempt(a));
                abandoned += 1;
            }
        }
        self.store.write(ops).await?;
        if abandoned > 0 {
            tracing::info!(
                abandoned,
                "in-flight attempts of a previous run are unknown now; the reconciler asks about them"
            );
        }
        Ok(())
    }

    /// Whether a reconciliation pass has completed since the host opened: until then attempts
    /// left open by a previous run have not been asked about yet (each blocks only its own
    /// session or payment).
    pub fn recovered(&self) -> bool {
        self.recovered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// One pass: settles attempts with the late answers that arrived, then asks about the
    /// attempts that are due, a few at a time.
    pub async fn reconcile_due(&self) -> Result<ReconcileReport, EngineError> {
        let mut report = ReconcileReport::default();
        // First what is owed to the store, then the answers waiting to be recorded.
        self.owed.flush(&*self.store).await;
        for (attempt_id, answer) in self.late.drain() {
            if self.apply_late(&attempt_id, answer).await {
                report.settled += 1;
            }
        }
        let now = self.now();
        let me = self.store.host_lease();
        let due: Vec<Attempt> = self
            .store
            .open_attempts()
            .await?
            .into_iter()
            .filter(|a| match &me {
                // Another host's attempt: the database decides whether it can be taken over.
                Some(me)
                    if a.owner_host.as_deref() != Some(me.host_id.as_str())
                        || a.owner_epoch != Some(me.epoch) =>
                {
                    a.state != AttemptState::NeedsOperator
                }
                Some(_) => {
                    a.state == AttemptState::Unknown && a.next_check_at.is_none_or(|t| t <= now)
                }
                None => is_due(a, now, self.reconcile.stale_after_ms),
            })
            .collect();
        let mut results = futures_util::stream::iter(due)
            .map(|a| async move { (self.reconcile_one(&a.id.0).await, a) })
            .buffer_unordered(self.reconcile.concurrency.max(1));
        while let Some((result, a)) = results.next().await {
            match result {
                Ok((_, false)) => {}
                Ok((AttemptState::Succeeded | AttemptState::Failed, _)) => report.settled += 1,
                Ok((AttemptState::NeedsOperator, _)) => report.needs_operator += 1,
                Ok(_) => report.still_open += 1,
                Err(e) => {
                    tracing::warn!(attempt = %a.id, code = e.code(), "reconciling failed: {e}");
                    report.still_open += 1;
                }
            }
        }
        let (settled, open) = self.reconcile_holders_due().await?;
        report.settled += settled;
        report.still_open += open;
        if report != ReconcileReport::default() {
            tracing::info!(?report, "reconciliation pass");
        }
        if !self
            .recovered
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::info!("start-up reconciliation done");
        }
        Ok(report)
    }

    /// Settles an attempt with the answer its call gave after the deadline, if it is still open:
    /// an answer read in full is the truth about the call.
    async fn apply_late(
        &self,
        attempt_id: &str,
        answer: Result<ProviderResponse, CallError>,
    ) -> bool {
        let tells = match &answer {
            Ok(response) => !matches!(response.outcome, Outcome::Unknown { .. }),
            Err(e) => !e.outcome_is_unknown(),
        };
        if !tells {
            return false;
        }
        let applied = async {
            let (_guard, attempt) = match self.lock_attempt(attempt_id).await {
                Ok(locked) => locked,
                Err(EngineError::Store(e)) if super::owed::is_transient(&e) => {
                    // Not readable now: the answer waits for the next pass.
                    self.late.requeue(attempt_id.to_owned(), answer);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if !attempt.state.is_open() {
                return Ok(false);
            }
            // after_call keeps a known answer itself when the store fails to record it.
            match self.after_call(attempt, answer, Current::Unknown).await {
                Err(EngineError::Store(e)) => Err(EngineError::Store(e)),
                _ => Ok(true),
            }
        }
        .await;
        match applied {
            Ok(true) => {
                tracing::info!(attempt = attempt_id, "attempt settled by its late answer");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(
                    attempt = attempt_id,
                    code = e.code(),
                    "a late answer could not be recorded: {e}"
                );
                false
            }
        }
    }

    /// Asks the provider about one open attempt and settles it if the answer is definitive;
    /// otherwise backs off (and after the last check leaves it to an operator).
    pub async fn reconcile_attempt(&self, id: &str) -> Result<AttemptState, EngineError> {
        Ok(self.reconcile_one(id).await?.0)
    }

    /// [`Host::reconcile_attempt`], and whether this host could claim the attempt (it is not
    /// due, or it belongs to another live host, or it is settled already: `false`).
    async fn reconcile_one(&self, id: &str) -> Result<(AttemptState, bool), EngineError> {
        let (_guard, mut attempt) = self.lock_attempt(id).await?;
        if !attempt.state.is_open() {
            return Ok((attempt.state, false));
        }
        // Claim it, so another host does not ask and settle it at the same time.
        let now = self.now();
        let was = attempt.state;
        let mut claimed = attempt.clone();
        claimed.state = AttemptState::Unknown;
        claimed.next_check_at = Some(now + self.reconcile.stale_after_ms);
        claimed.updated_at = now;
        let mut ops = vec![WriteOp::ClaimAttempt {
            id: attempt.id.clone(),
            until: now + self.reconcile.stale_after_ms,
            now,
            stale_before: now - self.reconcile.stale_after_ms,
        }];
        if was == AttemptState::InFlight {
            // Abandoned by its run (or a host whose lease lapsed): unknown from now on.
            ops.push(self.attempt_event(EventType::AttemptUnknown, &claimed, None));
        }
        let claim = self.store.write(ops).await;
        match claim {
            Ok(()) => {
                attempt.state = claimed.state;
                attempt.next_check_at = claimed.next_check_at;
            }
            Err(crate::store::StoreError::VersionConflict(_)) => return Ok((attempt.state, false)),
            Err(e) => return Err(e.into()),
        }
        let asked = self.ask_about(&attempt).await;
        // Whether the call can still land is decided on the store's clock, and with the
        // attempt as stored (its deadline as the database recorded it).
        let store_now = self.store_now().await?;
        if let Some(stored) = self.store.attempt(attempt.id.as_str()).await? {
            attempt.call_deadline_at = stored.call_deadline_at;
        }
        let verdict = match asked {
            Ok(Outcome::NotAttempted { reason }) if self.may_still_land(&attempt, store_now) => {
                let why = format!(
                    "the provider has no record of it ({reason}), but the call may still land"
                );
                match self.replays(&attempt) {
                    true => match self.resend(attempt.clone()).await {
                        Ok(o)
                            if !matches!(
                                o,
                                Outcome::Unknown { .. } | Outcome::NotAttempted { .. }
                            ) =>
                        {
                            Ok(o)
                        }
                        Ok(_) => Err(why),
                        Err(e) => Err(format!("{why}; sending it again: {e}")),
                    },
                    false => Err(why),
                }
            }
            Ok(Outcome::Pending) if attempt.operation != Operation::Authorize => {
                Err("the provider is still processing it".to_owned())
            }
            Ok(Outcome::Unknown { reason }) => Err(reason),
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(format!("retrieve: {e}")),
        };
        match verdict {
            Ok(outcome) => {
                tracing::info!(attempt = %attempt.id, operation = %attempt.operation, outcome = outcome.name(), "attempt reconciled");
                let entity = attempt.id.0.clone();
                self.settle(attempt, outcome, None, None, Current::Unknown)
                    .await?;
                let settled = self
                    .store
                    .attempt(&entity)
                    .await?
                    .map_or(AttemptState::Unknown, |a| a.state);
                Ok((settled, true))
            }
            Err(why) => {
                let now = self.now();
                let horizon = self.landing_horizon(&attempt);
                let mut wait = (self.reconcile.base_backoff_ms << (attempt.checks + 1).min(20))
                    .min(self.reconcile.max_backoff_ms);
                let live = self.live.contains(attempt.id.as_str());
                if live {
                    // Its call is still running here: its answer will settle it. An operator
                    // could not decide it either, so no check of theirs is spent.
                    wait = wait.max(self.reconcile.first_check_ms).max(1);
                    if store_now >= horizon {
                        tracing::warn!(attempt = %attempt.id, provider = %attempt.provider_id, "a provider call is still running long after its deadline; it keeps its slot and its attempt stays unknown until it returns");
                    }
                } else if store_now < horizon {
                    // Nobody can know before the call can no longer land: ask again then, and
                    // do not spend the operator's budget of checks on it.
                    wait = wait.min(horizon + 1 - store_now).max(1);
                } else {
                    attempt.checks += 1;
                }
                attempt.state = if attempt.checks >= self.reconcile.max_checks {
                    AttemptState::NeedsOperator
                } else {
                    AttemptState::Unknown
                };
                attempt.next_check_at = Some(now + wait);
                attempt.updated_at = now;
                attempt.error = Some(serde_json::Value::String(why));
                if attempt.state == AttemptState::NeedsOperator {
                    tracing::error!(attempt = %attempt.id, operation = %attempt.operation, "attempt still unknown after {} checks; an operator must resolve it (payhost attempts resolve)", attempt.checks);
                }
                let state = attempt.state;
                let event = (state == AttemptState::NeedsOperator
                    && was != AttemptState::NeedsOperator)
                    .then(|| self.attempt_event(EventType::AttemptNeedsOperator, &attempt, None));
                self.store
                    .write(
                        [WriteOp::UpdateAttempt(attempt)]
                            .into_iter()
                            .chain(event)
                            .collect(),
                    )
                    .await?;
                Ok((state, true))
            }
        }
    }

    /// Whether the reconciler may send an attempt again with its idempotency key: it has not
    /// yet, and its provider declares that its processor replays a repeated key for this
    /// operation.
    fn replays(&self, attempt: &Attempt) -> bool {
        // Once: every call sent may land, and pushes the horizon out again.
        attempt.resends == 0
            && attempt.payment_id.is_some()
            && self
                .providers()
                .get(&attempt.provider_id)
                .is_some_and(|p| p.replays(attempt.operation))
    }

    /// Takes the lock of an attempt's session or payment and reads the attempt under it.
    async fn lock_attempt(
        &self,
        id: &str,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Attempt), EngineError> {
        let read = || async {
            self.store
                .attempt(id)
                .await?
                .ok_or_else(|| not_found("attempt", id))
        };
        let entity = read().await?.entity();
        let guard = self.locks.lock(&entity).await;
        Ok((guard, read().await?))
    }

    /// Runs [`Host::reconcile_due`] every `interval` until the returned task is aborted.
    pub fn spawn_reconciler(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let host = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(host.reconcile.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let arrived = host.late.arrived.clone();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = arrived.notified() => {}
                }
                if let Err(e) = host.reconcile_due().await {
                    tracing::warn!(code = e.code(), "reconciliation pass failed: {e}");
                }
            }
        })
    }

    /// An operator settles an open attempt: recorded with who, when and why, and applied like a
    /// provider's answer (succeeded: as processed; failed: as never made).
    pub async fn resolve_attempt(
        &self,
        id: &str,
        as_: ResolveAs,
        by: &str,
        note: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Attempt, EngineError> {
        let request = serde_json::json!({ "as": format!("{as_:?}"), "by": by, "note": note });
        self.idempotent(
            idempotency_key,
            &format!("resolve_attempt:{id}"),
            &request,
            no_attempt,
            || self.resolve_once(id, as_, by, note),
        )
        .await
    }

    async fn resolve_once(
        &self,
        id: &str,
        as_: ResolveAs,
        by: &str,
        note: &str,
    ) -> Result<Attempt, EngineError> {
        let (_guard, attempt) = self.lock_attempt(id).await?;
        if !attempt.state.is_open() {
            return Err(EngineError::InvalidTransition(format!(
                "attempt {id} is already settled ({})",
                attempt.state.as_str()
            )));
        }
        if self.may_still_land(&attempt, self.store_now().await?) {
            return Err(EngineError::CallMayLand {
                attempt_id: attempt.id.0.clone(),
                until: (!self.live.contains(attempt.id.as_str()))
                    .then(|| self.landing_horizon(&attempt)),
            });
        }
        if by.trim().is_empty() || note.trim().is_empty() {
            return Err(EngineError::invalid(
                "note",
                "say who resolves the attempt and why",
            ));
        }
        let outcome = match as_ {
            ResolveAs::Succeeded => Outcome::Processed,
            ResolveAs::Failed => Outcome::NotAttempted {
                reason: format!("resolved as failed by {by}: {note}"),
            },
        };
        let resolution = Resolution {
            by: by.to_owned(),
            note: note.to_owned(),
            at: self.now(),
        };
        self.settle(attempt, outcome, None, Some(resolution), Current::Unknown)
            .await?;
        tracing::warn!(attempt = id, by, note, "attempt resolved by an operator");
        self.store
            .attempt(id)
            .await?
            .ok_or_else(|| not_found("attempt", id))
    }
}

/// Whether an attempt is open and due for a check now.
fn is_due(a: &Attempt, now: i64, stale_after_ms: i64) -> bool {
    match a.state {
        AttemptState::Unknown => a.next_check_at.is_none_or(|t| t <= now),
        AttemptState::InFlight => a.updated_at + stale_after_ms <= now,
        _ => false,
    }
}
