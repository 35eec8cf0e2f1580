//! What providers report: webhooks and syncs, applied monotonically.

use super::{
    CallError, EngineError, Host, RemoteStatus, RetrieveRequest, SessionInput, Step, StoreError,
    WebhookAction, WebhookEvent, WriteOp, call_error, inputs, no_attempt, transitions,
};
use crate::domain::*;
use inputs::*;

/// A webhook its provider verified: only [`Host::verify_webhook`] makes one.
#[derive(Debug)]
pub struct VerifiedWebhook {
    provider_id: String,
    body: String,
    event: WebhookEvent,
}

impl Host {
    /// Applies what a provider reports about a session (a verified webhook, or a sync). Monotone:
    /// a report about a session that moved on is ignored and logged.
    pub async fn apply_report(
        &self,
        id: &str,
        action: WebhookAction,
    ) -> Result<PaymentSession, EngineError> {
        let _guard = self.locks.lock(id).await;
        let mut session = self.session(id).await?;
        let step = transitions::session(session.status, SessionInput::Reported(action));
        let to = match step {
            Step::To(to) if to != session.status => to,
            Step::Ignored(why) => {
                tracing::info!(session = %session.id, ?action, "report ignored: {why}");
                return Ok(session);
            }
            _ => return Ok(session),
        };
        // A session with an attempt in flight is left to that attempt's outcome.
        self.refuse_if_open(session.id.as_str()).await?;
        let now = self.now();
        let expected = session.version;
        let before = session.status;
        let mut ops = Vec::new();
        let mut payment_id = None;
        if to == SessionStatus::Authorized {
            session.payment_authorized_at = Some(now);
            let payment = self.payment_for(&session, now);
            payment_id = Some(payment.id.clone());
            ops.push(WriteOp::InsertPayment(payment));
        }
        session.status = to;
        session.version += 1;
        session.updated_at = now;
        ops.push(WriteOp::UpdateSession {
            session: session.clone(),
            expected_version: expected,
        });
        ops.extend(self.session_changed(Some(before), &session, payment_id.as_ref()));
        self.store.write(ops).await?;
        Ok(session)
    }

    /// Receives a webhook: the provider verifies and translates it, the event is stored once per
    /// (provider, event id), and applied through the engine. A duplicate of an applied event is
    /// acknowledged and changes nothing; an event that could not be applied yet (an operation on
    /// its session is in flight) is kept and applied when the provider sends it again.
    pub async fn receive_webhook(
        &self,
        provider_id: &str,
        body: String,
        headers: Vec<(String, String)>,
    ) -> Result<WebhookReceipt, EngineError> {
        let verified = self.verify_webhook(provider_id, body, headers).await?;
        self.accept_webhook(verified).await
    }

    /// The first half of [`Host::receive_webhook`]: the provider verifies the signature and
    /// translates the event. Nothing is stored; an intake can spend a verified event's budget
    /// apart from the failures'.
    pub async fn verify_webhook(
        &self,
        provider_id: &str,
        body: String,
        headers: Vec<(String, String)>,
    ) -> Result<VerifiedWebhook, EngineError> {
        let provider = self.provider(provider_id)?.clone();
        if !provider.manifest().capabilities.webhooks {
            return Err(EngineError::Unsupported(format!(
                "provider `{provider_id}` does not take webhooks"
            )));
        }
        let event = provider
            .call(payhost_provider_api::WebhookRequest {
                body: body.clone(),
                headers,
                received_at_unix_ms: self.now(),
            })
            .await
            .map_err(|e| match e {
                CallError::Provider(pe)
                    if pe.kind == payhost_provider_api::ErrorKind::InvalidSignature =>
                {
                    EngineError::Unverified(pe.message)
                }
                CallError::Provider(pe) => EngineError::invalid("body", pe.message),
                other => call_error(other),
            })?;
        if event.event_id.is_empty() {
            return Err(EngineError::invalid("body", "the event has no id"));
        }
        Ok(VerifiedWebhook {
            provider_id: provider_id.to_owned(),
            body,
            event,
        })
    }

    /// The second half of [`Host::receive_webhook`]: stores a verified event once per
    /// (provider, event id) and applies it.
    pub async fn accept_webhook(
        &self,
        verified: VerifiedWebhook,
    ) -> Result<WebhookReceipt, EngineError> {
        let VerifiedWebhook {
            provider_id,
            body,
            event,
        } = verified;
        let provider_id = provider_id.as_str();
        let action = serde_json::to_value(event.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let record = crate::store::WebhookEventRecord {
            provider_id: provider_id.to_owned(),
            event_id: event.event_id.clone(),
            body,
            session_id: event.session_id.clone(),
            action,
            received_at: self.now(),
            applied_at: None,
        };
        match self
            .store
            .write(vec![WriteOp::InsertWebhookEvent(record)])
            .await
        {
            Ok(()) => {}
            Err(StoreError::KeyExists(_)) => {
                let stored = self
                    .store
                    .webhook_event(provider_id, &event.event_id)
                    .await?;
                if stored.is_some_and(|s| s.applied_at.is_some()) {
                    return Ok(WebhookReceipt::of(&event, true));
                }
            }
            Err(e) => return Err(e.into()),
        }
        match self.apply_webhook(provider_id, &event).await {
            Ok(_) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let at = self.now();
        self.store
            .write(vec![
                WriteOp::MarkWebhookApplied {
                    provider_id: provider_id.to_owned(),
                    event_id: event.event_id.clone(),
                    at,
                },
                self.webhook_event(provider_id, &event, at),
            ])
            .await?;
        Ok(WebhookReceipt::of(&event, false))
    }

    /// Applies a verified webhook event of `provider_id`.
    pub async fn apply_webhook(
        &self,
        provider_id: &str,
        event: &WebhookEvent,
    ) -> Result<Option<PaymentSession>, EngineError> {
        let Some(session_id) = &event.session_id else {
            return Ok(None);
        };
        let session = self.session(session_id).await?;
        if session.provider_id != provider_id {
            return Err(EngineError::invalid(
                "session_id",
                format!(
                    "session {session_id} belongs to provider `{}`",
                    session.provider_id
                ),
            ));
        }
        self.apply_report(session_id, event.action).await.map(Some)
    }

    /// Asks the provider where a session stands and applies it (monotone).
    pub async fn sync_session(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("sync_session:{id}"),
            &(),
            no_attempt,
            || self.sync_once(id),
        )
        .await
    }

    async fn sync_once(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let session = self.session(id).await?;
        let provider = &self.provider(&session.provider_id)?;
        let truth = provider
            .call(RetrieveRequest {
                session_id: session.id.0.clone(),
                payment_id: None,
                idempotency_key: format!("{}:sync:{}", session.idempotency_key, session.version),
                amount: session.amount,
                currency_code: session.currency_code.code().to_owned(),
                data: session.data.clone(),
                attempt: None,
                deadline_unix_ms: None,
            })
            .await
            .map_err(call_error)?;
        let action = match truth.status {
            RemoteStatus::Authorized | RemoteStatus::Captured => WebhookAction::Authorized,
            RemoteStatus::Error => WebhookAction::Failed,
            RemoteStatus::Canceled => WebhookAction::Canceled,
            RemoteStatus::RequiresMore => WebhookAction::RequiresMore,
            _ => WebhookAction::Pending,
        };
        self.apply_report(id, action).await
    }
}
