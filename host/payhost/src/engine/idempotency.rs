//! Client idempotency keys: one run per key, replayed results, and keys bound to the attempt
//! their operation started, so a retry never moves money twice.

use super::{
    CLIENT_KEY, DeserializeOwned, Digest, EngineError, Future, Host, Outcome, Serialize, Sha256,
    StoreError, Value, WriteOp, inputs, not_found, owed,
};
use crate::domain::*;
use inputs::*;

impl Host {
    /// Runs `f` once per client idempotency key: a repeated key with the same request replays the
    /// stored result, with another request it is an error. No key: runs `f`.
    ///
    /// A key whose operation started a money movement is linked to that attempt in the same
    /// write, and is never released: if the process dies before the result is stored, or the
    /// outcome was unknown, a retry with the key is answered from the attempt once it is settled
    /// (`rebuild`), or told it is still pending, and never moves money a second time. `rebuild`
    /// returning `None` (the attempt failed, nothing moved) lets the retry run afresh.
    pub(super) async fn idempotent<T, F, Fut, R, RFut>(
        &self,
        key: Option<&str>,
        operation: &str,
        request: &impl Serialize,
        rebuild: R,
        f: F,
    ) -> Result<T, EngineError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<T>, EngineError>>,
    {
        let Some(key) = key else {
            return CLIENT_KEY.scope(None, f()).await;
        };
        // 255 of the client's own, and room for the namespace the HTTP layer puts in front.
        if key.is_empty() || key.len() > 512 {
            return Err(EngineError::invalid(
                "idempotency_key",
                "must be 1 to 512 characters",
            ));
        }
        let mut request = serde_json::to_value(request).unwrap_or_default();
        // A card number must not reach the store, not even as a plain hash a PAN could be
        // guessed back from: the transient input counts by its shape only.
        if let Some(input) = request.get_mut("data") {
            *input = shape(input);
        }
        let hash = hex::encode(Sha256::digest(format!("{operation}\n{request}")));
        let claim_id = uuid::Uuid::new_v4().simple().to_string();
        let release = || WriteOp::ReleaseKey {
            key: key.to_owned(),
            claim_id: claim_id.clone(),
        };
        let claim = WriteOp::ClaimKey {
            key: key.to_owned(),
            operation: operation.to_owned(),
            request_hash: hash.clone(),
            at: self.now(),
            claim_id: claim_id.clone(),
        };
        match self.store.write(vec![claim.clone()]).await {
            Ok(()) => {}
            Err(e) if owed::is_transient(&e) => {
                // The claim may have committed: release it once the store answers (it moved
                // nothing), or every retry would find it "in progress".
                self.owed.push(
                    "releasing a key whose claim was not confirmed",
                    vec![release()],
                );
                return Err(e.into());
            }
            Err(StoreError::KeyExists(_)) => {
                let stored = self.store.key(key).await?;
                let stored = match stored {
                    Some(s) if s.operation != operation || s.request_hash != hash => {
                        return Err(EngineError::IdempotencyMismatch {
                            key: key.to_owned(),
                        });
                    }
                    Some(s) => s,
                    None => {
                        return Err(EngineError::InProgress(format!(
                            "a request with idempotency key `{key}` just finished without effect; retry"
                        )));
                    }
                };
                if let Some(response) = stored.response {
                    return serde_json::from_value(response).map_err(|e| {
                        EngineError::Store(StoreError::Unavailable(format!(
                            "stored response for key `{key}` is unreadable: {e}"
                        )))
                    });
                }
                let Some(attempt_id) = stored.attempt_id else {
                    return Err(EngineError::InProgress(format!(
                        "a request with idempotency key `{key}` is in progress"
                    )));
                };
                let attempt = self
                    .store
                    .attempt(&attempt_id)
                    .await?
                    .ok_or_else(|| not_found("attempt", &attempt_id))?;
                if attempt.state.is_open() {
                    return Err(EngineError::AttemptUnresolved {
                        attempt_id,
                        operation: attempt.operation.as_str().to_owned(),
                    });
                }
                let failed_attempt = attempt.id.0.clone();
                match rebuild(attempt).await? {
                    Some(value) => {
                        self.store
                            .write(vec![WriteOp::CompleteKey {
                                key: key.to_owned(),
                                response: serde_json::to_value(&value).unwrap_or(Value::Null),
                            }])
                            .await?;
                        return Ok(value);
                    }
                    None => {
                        // The attempt failed and moved nothing: this request may run afresh —
                        // once. Of retries racing here, one replaces the key's claim; the
                        // others find it no longer linked to the failed attempt.
                        let forget = WriteOp::ForgetKey {
                            key: key.to_owned(),
                            attempt_id: failed_attempt,
                        };
                        match self.store.write(vec![forget, claim]).await {
                            Ok(()) => {}
                            Err(e) if owed::is_transient(&e) => {
                                self.owed.push(
                                    "releasing a key whose claim was not confirmed",
                                    vec![release()],
                                );
                                return Err(e.into());
                            }
                            Err(StoreError::KeyExists(_)) => {
                                return Err(EngineError::InProgress(format!(
                                    "a request with idempotency key `{key}` is in progress"
                                )));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
        let result = CLIENT_KEY.scope(Some(key.to_owned()), f()).await;
        let write = match &result {
            Ok(value) => WriteOp::CompleteKey {
                key: key.to_owned(),
                response: serde_json::to_value(value).unwrap_or(Value::Null),
            },
            // A key linked to an attempt stays; an unlinked one (nothing moved) is released.
            Err(_) => release(),
        };
        match self.store.write(vec![write.clone()]).await {
            Ok(()) => {}
            // What happened stands; the key's record follows once the store answers (until
            // then a retry with the key is told it is in progress, never run twice).
            Err(e) if owed::is_transient(&e) => {
                let what = match write {
                    WriteOp::CompleteKey { .. } => "completing an idempotency key",
                    _ => "releasing an idempotency key",
                };
                self.owed.push(what, vec![write]);
            }
            Err(e) => return Err(e.into()),
        }
        result
    }

    /// What to answer a retried money request whose first run ended unrecorded: the payment as
    /// it stands if its attempt succeeded; `None` (run again) if it failed.
    pub(super) async fn rebuild_payment(
        &self,
        attempt: Attempt,
    ) -> Result<Option<Payment>, EngineError> {
        if attempt.state != AttemptState::Succeeded {
            return Ok(None);
        }
        let id = attempt.payment_id.map(|p| p.0).unwrap_or_default();
        self.payment(&id).await.map(Some)
    }

    /// What to answer a retried authorize whose first run ended unrecorded: the session as it
    /// stands, with the attempt's next action or decline.
    pub(super) async fn rebuild_authorize(
        &self,
        attempt: Attempt,
    ) -> Result<Option<AuthorizeResult>, EngineError> {
        let outcome: Option<Outcome> = attempt
            .outcome
            .clone()
            .and_then(|o| serde_json::from_value(o).ok());
        if attempt.state == AttemptState::Failed
            && !matches!(outcome, Some(Outcome::Declined { .. }))
        {
            return Ok(None);
        }
        let session = self.session(attempt.session_id.as_str()).await?;
        let payment = self.store.payment_of_session(&session.id).await?;
        let mut result = AuthorizeResult::of(session, payment);
        match outcome {
            Some(Outcome::RequiresMore { next_action }) => result.next_action = Some(next_action),
            Some(Outcome::Declined { code, message }) => {
                result.decline = Some(Decline { code, message })
            }
            _ => {}
        }
        Ok(Some(result))
    }
}

/// A value's structure without its contents: keys kept, every leaf replaced by its type.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(_) => Value::String("string".into()),
        Value::Number(_) => Value::String("number".into()),
        Value::Bool(_) => Value::String("bool".into()),
        Value::Null => Value::Null,
    }
}
