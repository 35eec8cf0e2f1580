//! Collections and sessions: create, initiate, update, select, delete, authorize.

use super::{
    AuthorizeRequest, Current, DeleteRequest, EngineError, Host, InitiateRequest, MoneyRequest,
    Outcome, Provider, SessionInput, Step, UpdateRequest, Value, WriteOp, allow, definitive,
    inputs, no_attempt, not_found, provider_data, transitions, with_legacy_input,
};
use crate::domain::*;
use inputs::*;

impl Host {
    // ------------------------------------------------------ collections

    /// Creates a payment collection.
    pub async fn create_collection(
        &self,
        input: NewCollection,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentCollection, EngineError> {
        self.idempotent(
            idempotency_key,
            "create_collection",
            &input,
            no_attempt,
            || async {
                let money =
                    Money::new(input.amount, &input.currency_code).map_err(|e| match e {
                        MoneyError::UnknownCurrency(_) => {
                            EngineError::invalid("currency_code", e.to_string())
                        }
                        _ => EngineError::invalid("amount", e.to_string()),
                    })?;
                let now = self.now();
                let collection = PaymentCollection {
                    id: CollectionId::generate(),
                    amount: money.amount,
                    currency_code: money.currency,
                    metadata: input.metadata.clone(),
                    created_at: now,
                    updated_at: now,
                };
                self.store
                    .write(vec![
                        WriteOp::InsertCollection(collection.clone()),
                        self.collection_event(&collection),
                    ])
                    .await?;
                Ok(collection)
            },
        )
        .await
    }

    // ------------------------------------------------------ sessions

    /// Creates a session for a collection and, unless `initiate` is false (a Medusa v1
    /// placeholder), initiates it with the provider.
    pub async fn create_session(
        &self,
        input: NewSession,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(idempotency_key, "create_session", &input, no_attempt, || async {
            self.open_provider(&input.provider_id)?;
            if let Some(reference) = &input.reference
                && (reference.is_empty() || reference.len() > 255)
            {
                return Err(EngineError::invalid(
                    "reference",
                    "must be 1 to 255 characters",
                ));
            }
            // Without a collection, the session brings its own: created in the same write.
            let (collection, new_collection) = match &input.payment_collection_id {
                Some(id) => {
                    let collection_id = CollectionId::parse(id)
                        .ok_or_else(|| not_found("payment collection", id))?;
                    let collection = self
                        .store
                        .collection(&collection_id)
                        .await?
                        .ok_or_else(|| not_found("payment collection", collection_id.as_str()))?;
                    (collection, false)
                }
                None => (self.own_collection(&input)?, true),
            };
            let collection_id = collection.id.clone();
            if let Some(code) = &input.currency_code {
                let currency = Currency::parse(code).ok_or_else(|| {
                    EngineError::invalid(
                        "currency_code",
                        format!("`{code}` is not an ISO 4217 currency code"),
                    )
                })?;
                if currency != collection.currency_code {
                    return Err(EngineError::invalid(
                        "currency_code",
                        format!(
                            "currency mismatch: the collection is in {}, the session in {currency}",
                            collection.currency_code
                        ),
                    ));
                }
            }
            let amount = input.amount.unwrap_or(collection.amount);
            Money::of(amount, collection.currency_code)
                .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
            if let Some(cart) = &input.cart_id
                && (cart.is_empty() || cart.len() > 255)
            {
                return Err(EngineError::invalid(
                    "cart_id",
                    "must be 1 to 255 characters",
                ));
            }
            if !input.initiate && !input.data.is_null() {
                return Err(EngineError::invalid(
                    "data",
                    "`data` is input for the provider's initiate call, and a session created with `initiate: false` makes none; send it when authorizing",
                ));
            }
            let account_holder_id = match &input.account_holder_id {
                Some(id) => Some(self.holder_for_session(id, &input.provider_id).await?.id),
                None => None,
            };
            let now = self.now();
            let mut session = PaymentSession {
                id: SessionId::generate(),
                payment_collection_id: collection_id,
                cart_id: input.cart_id.clone(),
                cart: input.cart.clone(),
                context: input.context.clone(),
                provider_id: input.provider_id.clone(),
                is_selected: false,
                is_initiated: false,
                status: SessionStatus::Pending,
                // Only provider answers fill it: what the caller sent is input, not state.
                data: Value::Null,
                // Time-ordered (its attempts' keys start with it): a new key lands on the
                // unique indexes' last pages, not on a random page each.
                idempotency_key: format!("psk_{}", uuid::Uuid::now_v7().simple()),
                amount,
                currency_code: collection.currency_code,
                payment_authorized_at: None,
                metadata: input.metadata.clone(),
                reference: input.reference.clone(),
                account_holder_id,
                created_at: now,
                updated_at: now,
                version: 1,
            };
            if input.initiate {
                // Initiating moves no money: the provider is asked first, and the session is
                // stored once, initiated (a failed initiate stores nothing; an initiated one
                // whose insert failed is an unused reference at the processor).
                let provider = &self.provider(&session.provider_id)?;
                let key = format!("{}:initiate:{}", session.idempotency_key, session.amount);
                let holder = self.session_holder_ref(provider, &session).await?;
                let request = Self::initiate_request(provider, &session, key, &input.data, holder);
                let response = definitive(provider.call(request).await, "initiate")?;
                session.is_initiated = true;
                if let Some(data) = provider_data(provider, response.data) {
                    session.data = data;
                }
                session.updated_at = self.now();
            }
            let created = self.session_changed(None, &session, None);
            let mut ops = Vec::with_capacity(4);
            if new_collection {
                ops.push(WriteOp::InsertCollection(collection.clone()));
                ops.push(self.collection_event(&collection));
            }
            ops.push(WriteOp::InsertSession(session.clone()));
            ops.extend(created);
            self.store.write(ops).await?;
            Ok(session)
        })
        .await
    }

    /// The collection a session created without one brings: its `amount` and `currency_code`
    /// (both required then), no metadata of its own.
    fn own_collection(&self, input: &NewSession) -> Result<PaymentCollection, EngineError> {
        let (Some(amount), Some(code)) = (input.amount, input.currency_code.as_deref()) else {
            let missing = if input.amount.is_none() {
                "amount"
            } else {
                "currency_code"
            };
            return Err(EngineError::invalid(
                missing,
                "a session created without `payment_collection_id` needs `amount` and `currency_code` (its collection is created with it)",
            ));
        };
        let money = Money::new(amount, code).map_err(|e| match e {
            MoneyError::UnknownCurrency(_) => EngineError::invalid("currency_code", e.to_string()),
            _ => EngineError::invalid("amount", e.to_string()),
        })?;
        let now = self.now();
        Ok(PaymentCollection {
            id: CollectionId::generate(),
            amount: money.amount,
            currency_code: money.currency,
            metadata: Value::Null,
            created_at: now,
            updated_at: now,
        })
    }

    /// Initiates a placeholder session with its provider (Medusa v1: when it is selected).
    pub async fn initiate_session(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let session = self.session(id).await?;
        let _guard = self.locks.lock(session.id.as_str()).await;
        let session = self.session(id).await?;
        if session.is_initiated {
            return Ok(session);
        }
        self.initiate_locked(session, &Value::Null).await
    }

    /// Initiates a session with its provider, handing it the caller's `input` (transient).
    pub(super) async fn initiate_locked(
        &self,
        mut session: PaymentSession,
        input: &Value,
    ) -> Result<PaymentSession, EngineError> {
        allow(session.status, SessionInput::Update)?;
        let provider = &self.provider(&session.provider_id)?;
        let key = format!("{}:initiate:{}", session.idempotency_key, session.amount);
        let holder = self.session_holder_ref(provider, &session).await?;
        let request = Self::initiate_request(provider, &session, key, input, holder);
        let response = definitive(provider.call(request).await, "initiate")?;
        let expected = session.version;
        session.is_initiated = true;
        if let Some(data) = provider_data(provider, response.data) {
            session.data = data;
        }
        let before = session.status;
        self.save_session(session, expected, before).await
    }

    /// Changes a session's amount, cart, context, data or metadata; the provider is told (or the
    /// payment recreated with it, where it cannot update an amount).
    pub async fn update_session(
        &self,
        id: &str,
        input: SessionUpdate,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("update_session:{id}"),
            &input,
            no_attempt,
            || async {
                let _guard = self.locks.lock(id).await;
                let mut session = self.session(id).await?;
                allow(session.status, SessionInput::Update)?;
                self.refuse_if_open(session.id.as_str()).await?;
                let expected = session.version;
                let amount_changed = match input.amount {
                    Some(a) => {
                        Money::of(a, session.currency_code)
                            .map_err(|e| EngineError::invalid("amount", e.to_string()))?;
                        a != session.amount
                    }
                    None => false,
                };
                if let Some(a) = input.amount {
                    session.amount = a;
                }
                if let Some(cart) = &input.cart {
                    session.cart = cart.clone();
                }
                if let Some(context) = &input.context {
                    session.context = context.clone();
                }
                let update_input = input.data.clone().unwrap_or(Value::Null);
                if !update_input.is_null() && !session.is_initiated {
                    return Err(EngineError::invalid(
                        "data",
                        "`data` is input for the provider, and this session is not initiated yet; send it when authorizing",
                    ));
                }
                if let Some(metadata) = &input.metadata {
                    session.metadata = metadata.clone();
                }
                if session.is_initiated {
                    let provider = &self.provider(&session.provider_id)?;
                    let key = format!("{}:update:{}", session.idempotency_key, session.version);
                    let response = if amount_changed
                        && !provider.manifest().capabilities.update_amount
                    {
                        // Recreate: forget the old payment at the provider, start a new one.
                        definitive(
                            provider
                                .call(DeleteRequest {
                                    session_id: session.id.0.clone(),
                                    idempotency_key: format!("{key}:delete"),
                                    amount: session.amount,
                                    currency_code: session.currency_code.code().to_owned(),
                                    data: session.data.clone(),
                                    deadline_unix_ms: None,
                                })
                                .await,
                            "delete",
                        )?;
                        definitive(
                            provider
                                .call(Self::initiate_request(
                                    provider,
                                    &session,
                                    format!("{key}:initiate"),
                                    &update_input,
                                    self.session_holder_ref(provider, &session).await?,
                                ))
                                .await,
                            "initiate",
                        )?
                    } else {
                        definitive(
                            provider
                                .call(UpdateRequest {
                                    session_id: session.id.0.clone(),
                                    idempotency_key: key,
                                    amount: session.amount,
                                    currency_code: session.currency_code.code().to_owned(),
                                    context: session.context.clone(),
                                    data: with_legacy_input(provider, &session.data, &update_input),
                                    input: update_input.clone(),
                                    deadline_unix_ms: None,
                                })
                                .await,
                            "update",
                        )?
                    };
                    if let Some(data) = provider_data(provider, response.data) {
                        session.data = data;
                    }
                }
                let before = session.status;
                self.save_session(session, expected, before).await
            },
        )
        .await
    }

    /// Selects a session: the one selected for its cart and for its collection (the others are
    /// unselected). A placeholder is initiated on selection.
    pub async fn select_session(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("select_session:{id}"),
            &(),
            no_attempt,
            || self.select_once(id),
        )
        .await
    }

    async fn select_once(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let guard = self.locks.lock(id).await;
        let session = self.session(id).await?;
        if matches!(
            session.status,
            SessionStatus::Error | SessionStatus::Canceled
        ) {
            return Err(EngineError::InvalidTransition(format!(
                "a session that is {} cannot be selected",
                session.status.as_str()
            )));
        }
        self.store
            .write(vec![WriteOp::SelectSession(session.id.clone())])
            .await?;
        drop(guard);
        if !session.is_initiated && session.status == SessionStatus::Pending {
            return self.initiate_session(id).await;
        }
        self.session(id).await
    }

    /// Deletes a session that was never authorized: the provider is told, and the session is kept
    /// as `canceled` (history is never lost).
    pub async fn delete_session(
        &self,
        id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PaymentSession, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("delete_session:{id}"),
            &(),
            no_attempt,
            || self.delete_once(id),
        )
        .await
    }

    async fn delete_once(&self, id: &str) -> Result<PaymentSession, EngineError> {
        let _guard = self.locks.lock(id).await;
        let mut session = self.session(id).await?;
        allow(session.status, SessionInput::Delete)?;
        self.refuse_if_open(session.id.as_str()).await?;
        if session.is_initiated {
            let provider = &self.provider(&session.provider_id)?;
            definitive(
                provider
                    .call(DeleteRequest {
                        session_id: session.id.0.clone(),
                        idempotency_key: format!("{}:delete", session.idempotency_key),
                        amount: session.amount,
                        currency_code: session.currency_code.code().to_owned(),
                        data: session.data.clone(),
                        deadline_unix_ms: None,
                    })
                    .await,
                "delete",
            )?;
        }
        let expected = session.version;
        let before = session.status;
        session.status = SessionStatus::Canceled;
        session.is_selected = false;
        self.save_session(session, expected, before).await
    }

    /// Writes a changed session over the version it was read at (`expected`), bumping it.
    /// `before` is the status it was read with: a new one is an event in the same write.
    pub(super) async fn save_session(
        &self,
        mut session: PaymentSession,
        expected: i64,
        before: SessionStatus,
    ) -> Result<PaymentSession, EngineError> {
        session.version = expected + 1;
        session.updated_at = self.now();
        let changed = self.session_changed(Some(before), &session, None);
        self.store
            .write(
                [WriteOp::UpdateSession {
                    session: session.clone(),
                    expected_version: expected,
                }]
                .into_iter()
                .chain(changed)
                .collect(),
            )
            .await?;
        Ok(session)
    }

    /// The initiate request for a session, under `key`, with the caller's `input`.
    pub(super) fn initiate_request(
        provider: &Provider,
        session: &PaymentSession,
        key: String,
        input: &Value,
        account_holder: Option<payhost_provider_api::AccountHolderRef>,
    ) -> InitiateRequest {
        InitiateRequest {
            session_id: session.id.0.clone(),
            idempotency_key: key,
            amount: session.amount,
            currency_code: session.currency_code.code().to_owned(),
            context: session.context.clone(),
            data: with_legacy_input(provider, &session.data, input),
            input: input.clone(),
            account_holder,
            deadline_unix_ms: None,
        }
    }

    /// Authorizes a session: `processed` makes it authorized and creates its payment in one write;
    /// `requires_more` returns the customer's next action; `pending` waits for a webhook or sync;
    /// a decline leaves it in `error` (see [`AuthorizeResult::decline`]).
    pub async fn authorize_session(
        &self,
        id: &str,
        input: AuthorizeInput,
        idempotency_key: Option<&str>,
    ) -> Result<AuthorizeResult, EngineError> {
        self.idempotent(
            idempotency_key,
            &format!("authorize:{id}"),
            &input,
            |a| self.rebuild_authorize(a),
            || async {
                let _guard = self.locks.lock(id).await;
                let mut session = self.session(id).await?;
                match transitions::session(session.status, SessionInput::Authorize) {
                    Step::Refused(why) => return Err(EngineError::InvalidTransition(why)),
                    _ if session.status == SessionStatus::Authorized => {
                        let payment = self.store.payment_of_session(&session.id).await?;
                        return Ok(AuthorizeResult::of(session, payment));
                    }
                    _ => {}
                }
                // A second open attempt is refused by the store (and explained by `begin`).
                let provider = self.provider(&session.provider_id)?.clone();
                if !session.is_initiated {
                    session = self.initiate_locked(session, &Value::Null).await?;
                }
                if let Some(context) = &input.context {
                    session.context = context.clone();
                }
                let authorize_input = input.data.clone().unwrap_or(Value::Null);
                let payment_method = match &input.payment_method_id {
                    Some(id) => {
                        if !provider.manifest().account_holders {
                            return Err(EngineError::Unsupported(format!(
                                "provider `{}` does not support saved payment methods",
                                provider.id()
                            )));
                        }
                        Some(self.method_for_charge(&session, id).await?)
                    }
                    None => None,
                };
                let account_holder = self.session_holder_ref(&provider, &session).await?;
                let attempt = self.new_attempt(
                    &session,
                    None,
                    &provider,
                    Operation::Authorize,
                    session.amount,
                    None,
                );
                let expected = session.version;
                session.version += 1;
                session.updated_at = self.now();
                self.begin(
                    &attempt,
                    WriteOp::UpdateSession {
                        session: session.clone(),
                        expected_version: expected,
                    },
                )
                .await?;
                let request = MoneyRequest::Authorize(AuthorizeRequest {
                    session_id: session.id.0.clone(),
                    idempotency_key: attempt.idempotency_key.clone(),
                    amount: session.amount,
                    currency_code: session.currency_code.code().to_owned(),
                    context: session.context.clone(),
                    data: with_legacy_input(&provider, &session.data, &authorize_input),
                    input: authorize_input,
                    account_holder,
                    payment_method,
                    deadline_unix_ms: None,
                });
                let answer = self.call_money(&provider, &attempt, request).await;
                let (outcome, settled) = self
                    .after_call(attempt, answer, Current::Session(session))
                    .await?;
                let session = match settled.session {
                    Some(s) => s,
                    None => self.session(id).await?,
                };
                let payment = match settled.payment {
                    Some(p) => Some(p),
                    None if session.status == SessionStatus::Authorized => {
                        self.store.payment_of_session(&session.id).await?
                    }
                    None => None,
                };
                let mut result = AuthorizeResult::of(session, payment);
                match outcome {
                    Outcome::RequiresMore { next_action } => result.next_action = Some(next_action),
                    Outcome::Declined { code, message } => {
                        result.decline = Some(Decline { code, message })
                    }
                    _ => {}
                }
                Ok(result)
            },
        )
        .await
    }
}
