//! Account holders and their saved payment methods: the same write-ahead rules as money. Every
//! provider call that changes something at the processor (creating or deleting a customer,
//! attaching or detaching a method) is recorded as a [`HolderAttempt`] before it is made, under
//! the holder's lock and with at most one open per holder; its outcome and effects are written
//! in one write after it; an outcome nobody read is `unknown`, blocks the holder (and charges
//! with its methods), and is settled by asking the provider's `retrieve_account_holder`, never
//! guessed. What the caller sends for a call (`data`: a card, a token) is transient: handed to
//! that call only, never stored, returned or logged.

use std::time::Duration;

use payhost_provider_api::{
    AccountHolderRef, AttemptRef, CreateAccountHolderRequest, Customer, DeleteAccountHolderRequest,
    DeletePaymentMethodRequest, Outcome, PaymentMethodRef, ProviderResponse,
    RetrieveAccountHolderRequest, SavePaymentMethodRequest, UpdateAccountHolderRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{EngineError, Host, no_attempt, not_found, owed, provider_data};
use crate::domain::holders::{self, holder_after, method_after};
use crate::domain::*;
use crate::events::{Event, EventType};
use crate::provider::{CallError, Provider};
use crate::store::{StoreError, WriteOp};

/// Create a customer's account holder at a provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccountHolder {
    /// The operator's provider id; it must declare account holders.
    pub provider_id: String,
    /// Who the customer is (`id`: the embedder's customer id, 1 to 255 characters).
    #[schema(value_type = Object)]
    pub customer: Customer,
    /// Input for the provider's create call. Transient: never stored, returned or logged.
    #[serde(default)]
    pub data: Value,
}

/// Change an account holder's customer details.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountHolderUpdate {
    /// Who the customer is now (its `id` cannot change).
    #[schema(value_type = Object)]
    pub customer: Customer,
    /// Input for the provider's update call (transient).
    #[serde(default)]
    pub data: Value,
}

/// Save a payment method to an account holder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPaymentMethod {
    /// The card or the processor's token for it, as the provider takes it. Transient: handed
    /// to the save call only; the method keeps only what the provider answers.
    #[serde(default)]
    pub data: Value,
}

/// An account holder with its payment methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountHolderView {
    /// The holder.
    #[serde(flatten)]
    pub account_holder: AccountHolder,
    /// Its saved methods (status `saved`), oldest first.
    pub payment_methods: Vec<PaymentMethod>,
    /// Its provider call whose outcome is not known yet, if any: until it is, the holder takes
    /// no change and its methods pay nothing.
    pub open_attempt: Option<HolderAttempt>,
}

/// A holder attempt's effect, as written with its outcome.
struct Effects {
    holder: AccountHolder,
    method: Option<PaymentMethod>,
}

impl Host {
    /// Creates the customer's account holder at a provider (one live per customer and
    /// provider: when it exists already, it is returned as it is).
    pub async fn create_account_holder(
        &self,
        input: NewAccountHolder,
        idempotency_key: Option<&str>,
    ) -> Result<AccountHolder, EngineError> {
        self.idempotent(
            idempotency_key,
            "create_account_holder",
            &input,
            no_attempt,
            || self.create_holder_once(input.clone()),
        )
        .await
    }

    async fn create_holder_once(
        &self,
        input: NewAccountHolder,
    ) -> Result<AccountHolder, EngineError> {
        let provider = self.holder_provider(&input.provider_id)?;
        // A new holder is new work: not for a provider a reload disabled.
        self.open_provider(&input.provider_id)?;
        let customer_id = input.customer.id.clone();
        if customer_id.is_empty() || customer_id.len() > 255 {
            return Err(EngineError::invalid(
                "customer.id",
                "must be 1 to 255 characters",
            ));
        }
        let _guard = self
            .locks
            .lock(&format!("holder:{}:{customer_id}", input.provider_id))
            .await;
        if let Some(live) = self.live_holder(&customer_id, &input.provider_id).await? {
            return self.existing_holder(live).await;
        }
        let now = self.now();
        let holder = AccountHolder {
            id: AccountHolderId::generate(),
            provider_id: input.provider_id.clone(),
            customer_id,
            customer: input.customer.clone(),
            reference: None,
            data: Value::Null,
            status: HolderStatus::Pending,
            idempotency_key: format!("ahk_{}", uuid::Uuid::now_v7().simple()),
            created_at: now,
            updated_at: now,
            version: 1,
        };
        let attempt = self.holder_attempt(
            &holder,
            None,
            &provider,
            Operation::CreateAccountHolder,
            Value::Null,
        );
        let begun = self
            .begin_holder(
                &attempt,
                vec![
                    WriteOp::InsertAccountHolder(holder.clone()),
                    WriteOp::InsertHolderAttempt(attempt.clone()),
                ],
            )
            .await;
        if let Err(EngineError::Store(StoreError::KeyExists(_))) = begun {
            // Another host created it meanwhile.
            if let Some(live) = self
                .live_holder(&holder.customer_id, &holder.provider_id)
                .await?
            {
                return self.existing_holder(live).await;
            }
        }
        begun?;
        let request = CreateAccountHolderRequest {
            account_holder_id: holder.id.0.clone(),
            idempotency_key: attempt.idempotency_key.clone(),
            customer: holder.customer.clone(),
            input: input.data,
            deadline_unix_ms: None,
        };
        let answer = self.call_holder(&provider, &attempt, request).await;
        let effects = Effects {
            holder,
            method: None,
        };
        let effects = self.after_holder_call(attempt, answer, effects).await?;
        Ok(effects.holder)
    }

    /// An existing live holder, as a create returns it: active, or still pending (refused).
    async fn existing_holder(&self, live: AccountHolder) -> Result<AccountHolder, EngineError> {
        self.refuse_if_holder_open(&live.id).await?;
        match live.status {
            HolderStatus::Active => Ok(live),
            _ => Err(EngineError::InProgress(format!(
                "account holder {} is being created; retry",
                live.id
            ))),
        }
    }

    /// An account holder with its saved methods.
    pub async fn account_holder(&self, id: &str) -> Result<AccountHolderView, EngineError> {
        let holder = self.read_holder(id).await?;
        let payment_methods = self
            .store
            .payment_methods_of(&holder.id)
            .await?
            .into_iter()
            .filter(|m| m.status == MethodStatus::Saved)
            .collect();
        let open_attempt = self
            .store
            .holder_attempts_of(&holder.id)
            .await?
            .into_iter()
            .find(|t| t.state.is_open());
        Ok(AccountHolderView {
            account_holder: holder,
            payment_methods,
            open_attempt,
        })
    }

    /// A customer's account holders, every provider and status, oldest first.
    pub async fn account_holders_of_customer(
        &self,
        customer_id: &str,
    ) -> Result<Vec<AccountHolder>, EngineError> {
        Ok(self.store.account_holders_of_customer(customer_id).await?)
    }

    /// The attempts of an account holder, oldest first.
    pub async fn holder_attempts(&self, id: &str) -> Result<Vec<HolderAttempt>, EngineError> {
        let holder = self.read_holder(id).await?;
        Ok(self.store.holder_attempts_of(&holder.id).await?)
    }

    /// Changes the customer's details at the provider; the holder takes them once it confirmed.
    pub async fn update_account_holder(
        &self,
        id: &str,
        input: AccountHolderUpdate,
        idempotency_key: Option<&str>,
    ) -> Result<AccountHolder, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("update_account_holder:{id}"),
            &input,
            no_attempt,
            || async {
                let _guard = self.locks.lock(id).await;
                let holder = self.active_holder(id).await?;
                if input.customer.id != holder.customer_id {
                    return Err(EngineError::invalid(
                        "customer.id",
                        format!(
                            "an account holder's customer cannot change (it is {})",
                            holder.customer_id
                        ),
                    ));
                }
                let provider = self.holder_provider(&holder.provider_id)?.clone();
                let detail = serde_json::to_value(&input.customer).unwrap_or(Value::Null);
                let attempt = self.holder_attempt(
                    &holder,
                    None,
                    &provider,
                    Operation::UpdateAccountHolder,
                    detail,
                );
                self.begin_holder(
                    &attempt,
                    vec![WriteOp::InsertHolderAttempt(attempt.clone())],
                )
                .await?;
                let request = UpdateAccountHolderRequest {
                    account_holder: holder_ref(&holder),
                    idempotency_key: attempt.idempotency_key.clone(),
                    customer: input.customer.clone(),
                    input: input.data.clone(),
                    deadline_unix_ms: None,
                };
                let answer = self.call_holder(&provider, &attempt, request).await;
                let effects = Effects {
                    holder,
                    method: None,
                };
                Ok(self
                    .after_holder_call(attempt, answer, effects)
                    .await?
                    .holder)
            },
        )
        .await
    }

    /// Deletes the account holder at the provider, which detaches every method saved to it:
    /// they are deleted with it, and a later charge with one is refused.
    pub async fn delete_account_holder(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<AccountHolder, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("delete_account_holder:{id}"),
            &Value::Null,
            no_attempt,
            || async {
                let _guard = self.locks.lock(id).await;
                let holder = self.read_holder(id).await?;
                if holder.status == HolderStatus::Deleted {
                    return Ok(holder);
                }
                let holder = self.active_holder(id).await?;
                let provider = self.holder_provider(&holder.provider_id)?.clone();
                let attempt = self.holder_attempt(
                    &holder,
                    None,
                    &provider,
                    Operation::DeleteAccountHolder,
                    Value::Null,
                );
                self.begin_holder(
                    &attempt,
                    vec![WriteOp::InsertHolderAttempt(attempt.clone())],
                )
                .await?;
                let request = DeleteAccountHolderRequest {
                    account_holder: holder_ref(&holder),
                    idempotency_key: attempt.idempotency_key.clone(),
                    deadline_unix_ms: None,
                };
                let answer = self.call_holder(&provider, &attempt, request).await;
                let effects = Effects {
                    holder,
                    method: None,
                };
                Ok(self
                    .after_holder_call(attempt, answer, effects)
                    .await?
                    .holder)
            },
        )
        .await
    }

    /// Saves a payment method to an account holder (attaches it at the processor).
    pub async fn save_payment_method(
        &self,
        holder_id: &str,
        input: NewPaymentMethod,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentMethod, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("save_payment_method:{holder_id}"),
            &input,
            no_attempt,
            || async {
                let _guard = self.locks.lock(holder_id).await;
                let holder = self.active_holder(holder_id).await?;
                let provider = self.holder_provider(&holder.provider_id)?.clone();
                let now = self.now();
                let method = PaymentMethod {
                    id: PaymentMethodId::generate(),
                    account_holder_id: holder.id.clone(),
                    provider_id: holder.provider_id.clone(),
                    reference: None,
                    data: Value::Null,
                    status: MethodStatus::Pending,
                    created_at: now,
                    updated_at: now,
                    version: 1,
                };
                let attempt = self.holder_attempt(
                    &holder,
                    Some(&method),
                    &provider,
                    Operation::SavePaymentMethod,
                    Value::Null,
                );
                self.begin_holder(
                    &attempt,
                    vec![
                        WriteOp::InsertPaymentMethod(method.clone()),
                        WriteOp::InsertHolderAttempt(attempt.clone()),
                    ],
                )
                .await?;
                let request = SavePaymentMethodRequest {
                    account_holder: holder_ref(&holder),
                    payment_method_id: method.id.0.clone(),
                    idempotency_key: attempt.idempotency_key.clone(),
                    input: input.data.clone(),
                    deadline_unix_ms: None,
                };
                let answer = self.call_holder(&provider, &attempt, request).await;
                let effects = Effects {
                    holder,
                    method: Some(method),
                };
                let effects = self.after_holder_call(attempt, answer, effects).await?;
                Ok(effects.method.expect("a save's effects carry its method"))
            },
        )
        .await
    }

    /// The methods saved to an account holder now (status `saved`), oldest first.
    pub async fn payment_methods(
        &self,
        holder_id: &str,
    ) -> Result<Vec<PaymentMethod>, EngineError> {
        Ok(self.account_holder(holder_id).await?.payment_methods)
    }

    /// Deletes a saved payment method (detaches it at the processor).
    pub async fn delete_payment_method(
        &self,
        holder_id: &str,
        method_id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentMethod, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("delete_payment_method:{holder_id}:{method_id}"),
            &Value::Null,
            no_attempt,
            || async {
                let _guard = self.locks.lock(holder_id).await;
                let method = self.read_method(holder_id, method_id).await?;
                if method.status == MethodStatus::Deleted {
                    return Ok(method);
                }
                let holder = self.active_holder(holder_id).await?;
                if method.status != MethodStatus::Saved {
                    return Err(EngineError::InvalidTransition(format!(
                        "payment method {} is {}; only a saved one can be deleted",
                        method.id,
                        method.status.as_str()
                    )));
                }
                let provider = self.holder_provider(&holder.provider_id)?.clone();
                let attempt = self.holder_attempt(
                    &holder,
                    Some(&method),
                    &provider,
                    Operation::DeletePaymentMethod,
                    Value::Null,
                );
                self.begin_holder(
                    &attempt,
                    vec![WriteOp::InsertHolderAttempt(attempt.clone())],
                )
                .await?;
                let request = DeletePaymentMethodRequest {
                    account_holder: holder_ref(&holder),
                    payment_method: method_ref(&method),
                    idempotency_key: attempt.idempotency_key.clone(),
                    deadline_unix_ms: None,
                };
                let answer = self.call_holder(&provider, &attempt, request).await;
                let effects = Effects {
                    holder,
                    method: Some(method),
                };
                let effects = self.after_holder_call(attempt, answer, effects).await?;
                Ok(effects.method.expect("a delete's effects carry its method"))
            },
        )
        .await
    }

    // ------------------------------------------------------------ for sessions

    /// The holder a session pays through, checked for a session of `provider_id`: it exists,
    /// is active, at that provider, which declares account holders.
    pub(super) async fn holder_for_session(
        &self,
        id: &str,
        provider_id: &str,
    ) -> Result<AccountHolder, EngineError> {
        let holder = self.read_holder(id).await.map_err(|_| {
            EngineError::invalid("account_holder_id", format!("no account holder `{id}`"))
        })?;
        if holder.provider_id != provider_id {
            return Err(EngineError::invalid(
                "account_holder_id",
                format!(
                    "account holder {id} is at provider `{}`, the session at `{provider_id}`",
                    holder.provider_id
                ),
            ));
        }
        self.holder_provider(provider_id)?;
        if holder.status != HolderStatus::Active {
            return Err(EngineError::InvalidTransition(format!(
                "account holder {id} is {}",
                holder.status.as_str()
            )));
        }
        Ok(holder)
    }

    /// What a session's provider calls carry of its holder: its reference, when the session
    /// has one and the provider declares account holders (an older plugin gets nothing).
    pub(super) async fn session_holder_ref(
        &self,
        provider: &Provider,
        session: &PaymentSession,
    ) -> Result<Option<AccountHolderRef>, EngineError> {
        let Some(id) = &session.account_holder_id else {
            return Ok(None);
        };
        if !provider.manifest().account_holders {
            return Ok(None);
        }
        let holder = self
            .store
            .account_holder(id)
            .await?
            .ok_or_else(|| not_found("account holder", id.as_str()))?;
        Ok(Some(holder_ref(&holder)))
    }

    /// The saved method an authorize charges: saved to the session's holder, which is active
    /// and has no provider call of unknown outcome (a detach in doubt may have happened).
    pub(super) async fn method_for_charge(
        &self,
        session: &PaymentSession,
        method_id: &str,
    ) -> Result<PaymentMethodRef, EngineError> {
        let Some(holder_id) = &session.account_holder_id else {
            return Err(EngineError::invalid(
                "payment_method_id",
                "the session has no account holder: create it with `account_holder_id` to pay with a saved method",
            ));
        };
        let method = self
            .read_method(holder_id.as_str(), method_id)
            .await
            .map_err(|_| {
                EngineError::invalid(
                    "payment_method_id",
                    format!(
                        "no payment method `{method_id}` is saved to account holder {holder_id}"
                    ),
                )
            })?;
        self.refuse_if_holder_open(holder_id).await?;
        let holder = self
            .store
            .account_holder(holder_id)
            .await?
            .ok_or_else(|| not_found("account holder", holder_id.as_str()))?;
        if holder.status != HolderStatus::Active || method.status != MethodStatus::Saved {
            return Err(EngineError::InvalidTransition(format!(
                "payment method {method_id} is {} (account holder {holder_id} is {}): only a saved method of an active holder can pay",
                method.status.as_str(),
                holder.status.as_str()
            )));
        }
        Ok(method_ref(&method))
    }

    // ------------------------------------------------------------ reconciling

    /// Asks about the open holder attempts that are due; returns how many were settled and how
    /// many are still open.
    pub(super) async fn reconcile_holders_due(&self) -> Result<(usize, usize), EngineError> {
        let now = self.now();
        let stale = self.reconcile.stale_after_ms;
        let due: Vec<HolderAttempt> = self
            .store
            .open_holder_attempts()
            .await?
            .into_iter()
            .filter(|t| match t.state {
                AttemptState::InFlight => {
                    t.updated_at + stale <= now && !self.live.contains(t.id.as_str())
                }
                _ => t.next_check_at.is_none_or(|at| at <= now),
            })
            .collect();
        let (mut settled, mut open) = (0, 0);
        for t in due {
            match self.reconcile_holder_attempt(t.clone()).await {
                Ok(true) => settled += 1,
                Ok(false) => open += 1,
                Err(e) => {
                    open += 1;
                    tracing::warn!(attempt = %t.id, code = e.code(), "reconciling a holder attempt failed: {e}");
                }
            }
        }
        Ok((settled, open))
    }

    /// Claims one open holder attempt, asks the provider about it and settles it when the
    /// answer is definitive (`true`); otherwise backs off.
    async fn reconcile_holder_attempt(&self, t: HolderAttempt) -> Result<bool, EngineError> {
        let _guard = self.locks.lock(t.account_holder_id.as_str()).await;
        let now = self.now();
        let mut claimed = t.clone();
        claimed.state = match t.state {
            AttemptState::NeedsOperator => AttemptState::NeedsOperator,
            _ => AttemptState::Unknown,
        };
        claimed.next_check_at = Some(now + self.reconcile.stale_after_ms);
        claimed.updated_at = now;
        claimed.version += 1;
        match self
            .store
            .write(vec![WriteOp::UpdateHolderAttempt {
                attempt: claimed.clone(),
                expected_version: t.version,
            }])
            .await
        {
            Ok(()) => {}
            // Another host claimed or settled it.
            Err(StoreError::VersionConflict(_) | StoreError::Invariant(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let mut attempt = claimed;
        let holder = self
            .store
            .account_holder(&attempt.account_holder_id)
            .await?
            .ok_or_else(|| not_found("account holder", attempt.account_holder_id.as_str()))?;
        let method = match &attempt.payment_method_id {
            Some(id) => self.store.payment_method(id).await?,
            None => None,
        };
        let provider = self.provider(&attempt.provider_id)?.clone();
        let request = RetrieveAccountHolderRequest {
            account_holder: holder_ref(&holder),
            idempotency_key: format!(
                "{}:retrieve:{}",
                holder.idempotency_key,
                uuid::Uuid::now_v7().simple()
            ),
            attempt: Some(AttemptRef {
                operation: attempt.operation,
                idempotency_key: attempt.idempotency_key.clone(),
                amount: 0,
            }),
            payment_method: method.as_ref().map(method_ref),
            deadline_unix_ms: None,
        };
        let asked = provider.call(request).await;
        let store_now = self.store_now().await?;
        let may_land = self.live.contains(attempt.id.as_str())
            || store_now < attempt.call_deadline_at + self.reconcile.landing_margin_ms;
        let verdict = match asked {
            Ok(answer) => match answer.attempt {
                Some(Outcome::NotAttempted { reason }) if may_land => Err(format!(
                    "the provider has no record of it ({reason}), but the call may still land"
                )),
                Some(Outcome::Pending) => Err("the provider is still processing it".to_owned()),
                Some(Outcome::Unknown { reason }) => Err(reason),
                Some(outcome) => {
                    // What the asked-about call made: a save's method, a create's customer.
                    let reference = match attempt.operation {
                        Operation::SavePaymentMethod => answer.attempt_reference,
                        _ => answer.reference.or(answer.attempt_reference),
                    };
                    Ok(ProviderResponse {
                        outcome,
                        data: answer.data,
                        reference,
                    })
                }
                None => Err("the provider said nothing of the attempt".to_owned()),
            },
            Err(e) => Err(format!("retrieve_account_holder: {e}")),
        };
        match verdict {
            Ok(response) => {
                tracing::info!(attempt = %attempt.id, operation = %attempt.operation, outcome = response.outcome.name(), "holder attempt reconciled");
                let effects = Effects { holder, method };
                self.settle_holder(attempt, response, effects, true).await?;
                Ok(true)
            }
            Err(why) => {
                let horizon = attempt.call_deadline_at + self.reconcile.landing_margin_ms;
                let mut wait = (self.reconcile.base_backoff_ms << (attempt.checks + 1).min(20))
                    .min(self.reconcile.max_backoff_ms);
                if store_now < horizon {
                    wait = wait.min(horizon + 1 - store_now).max(1);
                } else {
                    attempt.checks += 1;
                }
                let was = attempt.state;
                if attempt.checks >= self.reconcile.max_checks {
                    // No operator tool settles a holder attempt: it is still asked about, at
                    // the longest backoff, and shows as needing attention.
                    attempt.state = AttemptState::NeedsOperator;
                    if was != AttemptState::NeedsOperator {
                        tracing::error!(attempt = %attempt.id, operation = %attempt.operation, "holder attempt still unknown after {} checks; its holder is blocked until the provider answers", attempt.checks);
                    }
                }
                let now = self.now();
                attempt.next_check_at = Some(now + wait);
                attempt.updated_at = now;
                attempt.error = Some(Value::String(why));
                let expected = attempt.version;
                attempt.version += 1;
                self.store
                    .write(vec![WriteOp::UpdateHolderAttempt {
                        attempt,
                        expected_version: expected,
                    }])
                    .await?;
                Ok(false)
            }
        }
    }

    // ------------------------------------------------------------ write-ahead core

    fn holder_attempt(
        &self,
        holder: &AccountHolder,
        method: Option<&PaymentMethod>,
        provider: &Provider,
        operation: Operation,
        detail: Value,
    ) -> HolderAttempt {
        let id = AttemptId::generate();
        let now = self.now();
        HolderAttempt {
            idempotency_key: format!("{}:{}", holder.idempotency_key, id),
            id,
            account_holder_id: holder.id.clone(),
            payment_method_id: method.map(|m| m.id.clone()),
            provider_id: holder.provider_id.clone(),
            operation,
            state: AttemptState::InFlight,
            detail,
            outcome: None,
            error: None,
            checks: 0,
            next_check_at: None,
            call_deadline_at: now + provider.timeout().as_millis() as i64,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }

    /// Records the attempt (with `inserted`, which insert it and the rows it makes) before its
    /// call.
    async fn begin_holder(
        &self,
        attempt: &HolderAttempt,
        inserted: Vec<WriteOp>,
    ) -> Result<(), EngineError> {
        match self.store.write(inserted.clone()).await {
            Ok(()) => Ok(()),
            Err(StoreError::AttemptOpen(_)) => {
                self.refuse_if_holder_open(&attempt.account_holder_id)
                    .await?;
                Err(EngineError::InProgress(format!(
                    "account holder {} has a provider call in progress; retry when it completes",
                    attempt.account_holder_id
                )))
            }
            Err(e) if owed::is_transient(&e) => {
                // Maybe it committed: no call was made, so it must not stay in flight.
                let mut never_called = attempt.clone();
                never_called.state = AttemptState::Failed;
                never_called.error = Some(Value::String(format!(
                    "the store did not confirm this attempt ({e}); the provider was not called"
                )));
                never_called.version += 1;
                let mut ops = vec![WriteOp::UpdateHolderAttempt {
                    attempt: never_called,
                    expected_version: attempt.version,
                }];
                // A holder or method inserted with it fails with it (the write is moot, and
                // dropped, if none of them was inserted).
                for op in &inserted {
                    match op {
                        WriteOp::InsertAccountHolder(h) => {
                            let mut failed = h.clone();
                            failed.status = HolderStatus::Failed;
                            failed.version += 1;
                            ops.push(WriteOp::UpdateAccountHolder {
                                holder: failed,
                                expected_version: h.version,
                            });
                        }
                        WriteOp::InsertPaymentMethod(m) => {
                            let mut failed = m.clone();
                            failed.status = MethodStatus::Failed;
                            failed.version += 1;
                            ops.push(WriteOp::UpdatePaymentMethod {
                                method: failed,
                                expected_version: m.version,
                            });
                        }
                        _ => {}
                    }
                }
                self.owed.push(
                    "closing a holder attempt whose start was not confirmed",
                    ops,
                );
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a holder attempt's call under its recorded deadline; the call counts as live
    /// until its thread returns (its late answer is left to the reconciler, which asks).
    async fn call_holder<R>(
        &self,
        provider: &Provider,
        attempt: &HolderAttempt,
        request: R,
    ) -> Result<ProviderResponse, CallError>
    where
        R: payhost_provider_api::Request<Response = ProviderResponse> + Send + 'static,
    {
        let live = self.live.enter(attempt.id.as_str());
        let remaining =
            Duration::from_millis((attempt.call_deadline_at - self.now()).max(0) as u64);
        let (answer, late) = provider
            .call_until(request, std::time::Instant::now() + remaining)
            .await;
        match late {
            None => drop(live),
            Some(late) => {
                tokio::spawn(async move {
                    let _ = late.wait().await;
                    drop(live);
                });
            }
        }
        answer
    }

    /// Records what a holder call gave: a definitive answer settles it with its effects; an
    /// unreadable one leaves it `unknown` for the reconciler; an error fails it.
    async fn after_holder_call(
        &self,
        mut attempt: HolderAttempt,
        answer: Result<ProviderResponse, CallError>,
        effects: Effects,
    ) -> Result<Effects, EngineError> {
        let attempt_id = attempt.id.0.clone();
        let response = match answer {
            Ok(response) => response,
            Err(e) if e.outcome_is_unknown() => ProviderResponse::with_outcome(Outcome::Unknown {
                reason: e.to_string(),
            }),
            Err(e) => {
                let error = match &e {
                    CallError::Provider(pe) => serde_json::to_value(pe).unwrap_or(Value::Null),
                    other => Value::String(other.to_string()),
                };
                attempt.error = Some(error);
                let response = ProviderResponse::with_outcome(Outcome::NotAttempted {
                    reason: e.to_string(),
                });
                self.settle_holder(attempt, response, effects, false)
                    .await?;
                return Err(match e {
                    CallError::Provider(pe) => EngineError::Provider(pe),
                    other => EngineError::NotAttempted {
                        reason: other.to_string(),
                    },
                });
            }
        };
        match holders::settles(&response.outcome) {
            Some(_) => {
                let outcome = response.outcome.clone();
                let effects = self
                    .settle_holder(attempt, response, effects, false)
                    .await?;
                match outcome {
                    Outcome::Declined { code, message } => {
                        Err(EngineError::Declined { code, message })
                    }
                    Outcome::NotAttempted { reason } => Err(EngineError::NotAttempted { reason }),
                    Outcome::RequiresMore { .. } => Err(EngineError::Declined {
                        code: Some("requires_customer_action".into()),
                        message: "the provider needs the customer to act before it saves this method; payhost saves only methods it can charge without them".into(),
                    }),
                    _ => Ok(effects),
                }
            }
            None => {
                let reason = match &response.outcome {
                    Outcome::Unknown { reason } => reason.clone(),
                    _ => "the provider is still processing it".to_owned(),
                };
                let now = self.now();
                attempt.state = AttemptState::Unknown;
                attempt.error = Some(Value::String(reason.clone()));
                attempt.next_check_at = Some(now + self.reconcile.first_check_ms);
                attempt.updated_at = now;
                let expected = attempt.version;
                attempt.version += 1;
                self.write_or_owe(
                    "marking a holder attempt unknown",
                    vec![WriteOp::UpdateHolderAttempt {
                        attempt,
                        expected_version: expected,
                    }],
                )
                .await?;
                tracing::warn!(attempt = %attempt_id, "provider outcome unknown: {reason}");
                Err(EngineError::OutcomeUnknown { attempt_id, reason })
            }
        }
    }

    /// Writes a definitive outcome of a holder attempt and its effects (the holder's and the
    /// methods' new statuses, their events) in one write; kept and written later if the store
    /// does not answer.
    async fn settle_holder(
        &self,
        mut attempt: HolderAttempt,
        response: ProviderResponse,
        effects: Effects,
        reconciled: bool,
    ) -> Result<Effects, EngineError> {
        let Effects { mut holder, method } = effects;
        let provider = self.provider(&attempt.provider_id).ok();
        let data = match &provider {
            Some(p) => provider_data(p, response.data.clone()),
            None => response.data.clone(),
        };
        let outcome = response.outcome.clone();
        let now = self.now();
        attempt.state = holders::settles(&outcome).unwrap_or(AttemptState::Failed);
        attempt.outcome = serde_json::to_value(&outcome).ok();
        if reconciled {
            attempt.error = None;
        }
        attempt.next_check_at = None;
        attempt.updated_at = now;
        let attempt_version = attempt.version;
        attempt.version += 1;
        let mut ops = vec![WriteOp::UpdateHolderAttempt {
            attempt: attempt.clone(),
            expected_version: attempt_version,
        }];
        let operation = attempt.operation;
        // The holder.
        let before = holder.clone();
        if let Some(status) = holder_after(holder.status, operation, &outcome) {
            holder.status = status;
        }
        if outcome == Outcome::Processed {
            match operation {
                Operation::CreateAccountHolder => {
                    holder.reference = response.reference.clone().or(holder.reference);
                    if let Some(d) = &data {
                        holder.data = d.clone();
                    }
                }
                Operation::UpdateAccountHolder => {
                    if let Ok(customer) = serde_json::from_value(attempt.detail.clone()) {
                        holder.customer = customer;
                    }
                    if let Some(d) = &data {
                        holder.data = d.clone();
                    }
                }
                _ => {}
            }
        }
        if holder != before {
            holder.updated_at = now;
            holder.version = before.version + 1;
            ops.push(WriteOp::UpdateAccountHolder {
                holder: holder.clone(),
                expected_version: before.version,
            });
            match holder.status {
                HolderStatus::Active if before.status == HolderStatus::Pending => {
                    ops.push(self.holder_event(EventType::AccountHolderCreated, &holder));
                }
                HolderStatus::Deleted => {
                    ops.push(self.holder_event(EventType::AccountHolderDeleted, &holder));
                }
                _ => {}
            }
        }
        // The methods: the one the attempt is about, or every one of a deleted holder.
        let methods = match (&method, operation) {
            (_, Operation::DeleteAccountHolder) => {
                self.store.payment_methods_of(&holder.id).await?
            }
            (Some(m), _) => {
                // Re-read: the caller's copy may be older than the store's.
                vec![
                    self.store
                        .payment_method(&m.id)
                        .await?
                        .unwrap_or_else(|| m.clone()),
                ]
            }
            (None, _) => Vec::new(),
        };
        let mut changed_method = None;
        for mut m in methods {
            let before = m.clone();
            if let Some(status) = method_after(m.status, operation, &outcome) {
                m.status = status;
            }
            if operation == Operation::SavePaymentMethod && outcome == Outcome::Processed {
                m.reference = response.reference.clone().or(m.reference);
                if let Some(d) = &data {
                    m.data = d.clone();
                }
            }
            if m != before {
                m.updated_at = now;
                m.version = before.version + 1;
                ops.push(WriteOp::UpdatePaymentMethod {
                    method: m.clone(),
                    expected_version: before.version,
                });
                match m.status {
                    MethodStatus::Saved => {
                        ops.push(self.method_event(EventType::PaymentMethodSaved, &m))
                    }
                    MethodStatus::Deleted if before.status == MethodStatus::Saved => {
                        ops.push(self.method_event(EventType::PaymentMethodDeleted, &m))
                    }
                    _ => {}
                }
            }
            if method.as_ref().is_some_and(|x| x.id == m.id) {
                changed_method = Some(m);
            }
        }
        // A pending create or save that failed needs no event: nothing was made.
        self.write_or_owe("settling a holder attempt", ops).await?;
        Ok(Effects {
            holder,
            method: changed_method.or(method),
        })
    }

    // ------------------------------------------------------------ helpers

    /// The provider of an account holder call: loaded, and declaring account holders.
    fn holder_provider(&self, id: &str) -> Result<std::sync::Arc<Provider>, EngineError> {
        let provider = self.provider(id)?;
        if !provider.manifest().account_holders {
            return Err(EngineError::Unsupported(format!(
                "provider `{id}` does not support account holders (its plugin does not declare them)"
            )));
        }
        Ok(provider)
    }

    async fn read_holder(&self, id: &str) -> Result<AccountHolder, EngineError> {
        let hid = AccountHolderId::parse(id).ok_or_else(|| not_found("account holder", id))?;
        self.store
            .account_holder(&hid)
            .await?
            .ok_or_else(|| not_found("account holder", id))
    }

    /// The holder, active and without an open attempt.
    async fn active_holder(&self, id: &str) -> Result<AccountHolder, EngineError> {
        let holder = self.read_holder(id).await?;
        self.refuse_if_holder_open(&holder.id).await?;
        if holder.status != HolderStatus::Active {
            return Err(EngineError::InvalidTransition(format!(
                "account holder {id} is {}",
                holder.status.as_str()
            )));
        }
        Ok(holder)
    }

    async fn read_method(&self, holder_id: &str, id: &str) -> Result<PaymentMethod, EngineError> {
        let mid = PaymentMethodId::parse(id).ok_or_else(|| not_found("payment method", id))?;
        self.store
            .payment_method(&mid)
            .await?
            .filter(|m| m.account_holder_id.as_str() == holder_id)
            .ok_or_else(|| not_found("payment method", id))
    }

    async fn live_holder(
        &self,
        customer_id: &str,
        provider_id: &str,
    ) -> Result<Option<AccountHolder>, EngineError> {
        Ok(self
            .store
            .account_holders_of_customer(customer_id)
            .await?
            .into_iter()
            .find(|h| h.provider_id == provider_id && h.status.is_live()))
    }

    async fn refuse_if_holder_open(&self, id: &AccountHolderId) -> Result<(), EngineError> {
        if let Some(open) = self
            .store
            .holder_attempts_of(id)
            .await?
            .into_iter()
            .find(|t| t.state.is_open())
        {
            return Err(EngineError::AttemptUnresolved {
                attempt_id: open.id.0,
                operation: open.operation.as_str().to_owned(),
            });
        }
        Ok(())
    }

    fn holder_event(&self, kind: EventType, holder: &AccountHolder) -> WriteOp {
        let e = Event::new(
            kind,
            holder.updated_at,
            serde_json::to_value(holder).unwrap_or(Value::Null),
        );
        self.event_op(e, Some(&holder.provider_id))
    }

    fn method_event(&self, kind: EventType, method: &PaymentMethod) -> WriteOp {
        let e = Event::new(
            kind,
            method.updated_at,
            serde_json::to_value(method).unwrap_or(Value::Null),
        );
        self.event_op(e, Some(&method.provider_id))
    }
}

fn holder_ref(h: &AccountHolder) -> AccountHolderRef {
    AccountHolderRef {
        id: h.id.0.clone(),
        reference: h.reference.clone(),
        data: h.data.clone(),
    }
}

fn method_ref(m: &PaymentMethod) -> PaymentMethodRef {
    PaymentMethodRef {
        id: m.id.0.clone(),
        reference: m.reference.clone(),
        data: m.data.clone(),
    }
}
