//! Stripe for payhost: PaymentIntents with manual capture, over the host's HTTP service (the
//! host owns the HTTP client, the deadlines, the logs and the metrics).
//!
//! - initiate: create the intent (amount, currency, `capture_method=manual`, the payhost session
//!   id in `metadata[session_id]`), with payhost's idempotency key as Stripe's `Idempotency-Key`;
//! - update: the intent's amount;
//! - the payment method comes in the caller's transient `input` (`payment_method: "pm_…"`, or
//!   `card: {number, exp_month, exp_year, cvc}` in tests), at initiate or authorize; a card is
//!   sent to Stripe and only the payment method's id is kept in the session's data;
//! - authorize: check the intent is this session's (metadata, amount, currency), attach the
//!   payment method and confirm; `requires_action` (3-D Secure) is `requires_more` with Stripe's
//!   next action, and the next authorize picks up the result;
//! - capture (`amount_to_capture`; one capture per intent, as in Stripe), refund (partial,
//!   several), cancel;
//! - retrieve: the intent's status, and what became of one attempt (a refund is found by its
//!   key through every page of the intent's refunds);
//! - webhooks: `Stripe-Signature` v1 verified (HMAC-SHA256, timestamp tolerance),
//!   `payment_intent.*` events mapped to actions; events without a payhost session are
//!   acknowledged and ignored.
//!
//! - account holders (provider-api 1.4, `holders.rs`): Customers, PaymentMethods attached and
//!   detached, and a saved method charged without the customer (`off_session`) after checking
//!   it is still attached to that customer.
//!
//! A request that never reached Stripe is `not_attempted`; one whose answer was lost (timeout,
//! reset, 5xx) is `unknown`, and payhost reconciles it through `retrieve`.

#![forbid(unsafe_code)]

mod holders;

use hmac::{Hmac, KeyInit, Mac};
use payhost_provider_api::*;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

/// `[providers.<id>.options]` of the Stripe provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeOptions {
    /// A secret key (`sk_test_…` or `sk_live_…`); put it in the environment.
    pub api_key: String,
    /// Stripe's API base; point it at a test server in tests.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// The endpoint's signing secret (`whsec_…`); without it webhooks are refused.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// How old a webhook's timestamp may be, in seconds.
    #[serde(default = "default_tolerance")]
    pub webhook_tolerance_s: i64,
    /// Longest wait for one Stripe request, in ms (never beyond the payhost call's deadline).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: i64,
    /// Confirm a charge of a saved payment method with `off_session=true` (the customer is not
    /// there; Stripe may then ask for 3-D Secure, which is `requires_more`). Default true;
    /// localstripe refuses the parameter on confirm, so tests against it set false.
    #[serde(default = "default_off_session")]
    pub off_session: bool,
}

fn default_off_session() -> bool {
    true
}

fn default_api_base() -> String {
    "https://api.stripe.com".into()
}
fn default_tolerance() -> i64 {
    300
}
fn default_request_timeout() -> i64 {
    20_000
}

/// The Stripe provider.
pub struct StripeProvider {
    options: StripeOptions,
    host: HostServices,
}

/// What one Stripe request gave.
enum Reply {
    /// 2xx with its JSON.
    Ok(Value),
    /// A 402 card error: declined.
    Declined {
        code: Option<String>,
        message: String,
    },
    /// An outcome that ends the operation here (not attempted, unknown).
    Outcome(Outcome),
}

impl StripeProvider {
    fn request(
        &self,
        method: &str,
        path: &str,
        form: &[(&str, String)],
        idempotency_key: Option<&str>,
        deadline: Option<i64>,
    ) -> Result<Reply, ProviderError> {
        let now = self.host.now_unix_ms();
        let own = now + self.options.request_timeout_ms;
        let deadline = Some(deadline.map_or(own, |d| d.min(own)));
        let mut headers = vec![
            (
                "authorization".to_owned(),
                format!("Bearer {}", self.options.api_key),
            ),
            ("stripe-version".to_owned(), "2024-06-20".to_owned()),
        ];
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key".to_owned(), key.to_owned()));
        }
        let body =
            if form.is_empty() {
                None
            } else {
                headers.push((
                    "content-type".to_owned(),
                    "application/x-www-form-urlencoded".to_owned(),
                ));
                Some(serde_urlencoded::to_string(form).map_err(|e| {
                    ProviderError::internal(format!("could not encode the form: {e}"))
                })?)
            };
        let request = HttpRequest {
            method: method.to_owned(),
            url: format!("{}{path}", self.options.api_base.trim_end_matches('/')),
            headers,
            body,
            deadline_unix_ms: deadline,
            secret_headers: vec![],
        };
        let response = match self.host.http(&request) {
            Ok(r) => r,
            Err(HttpFailure::NotSent { message }) => {
                return Ok(Reply::Outcome(Outcome::NotAttempted {
                    reason: format!("Stripe was not reached: {message}"),
                }));
            }
            Err(HttpFailure::Unknown { message, .. }) => {
                return Ok(Reply::Outcome(Outcome::Unknown {
                    reason: format!("Stripe's answer was lost: {message}"),
                }));
            }
            Err(HttpFailure::Invalid { message }) => {
                return Err(ProviderError::internal(message));
            }
            Err(HttpFailure::Unsupported { message }) => {
                return Err(ProviderError::new(
                    ErrorKind::Unsupported,
                    format!("this payhost cannot send HTTP for providers ({message}); upgrade it"),
                ));
            }
        };
        let json: Value = serde_json::from_str(&response.body).unwrap_or(Value::Null);
        if (200..300).contains(&response.status) {
            return Ok(Reply::Ok(json));
        }
        let error = &json["error"];
        let code = error["code"].as_str().map(str::to_owned);
        let message = error["message"]
            .as_str()
            .unwrap_or("Stripe refused the request")
            .to_owned();
        Err(match response.status {
            402 => {
                return Ok(Reply::Declined {
                    code: code.or_else(|| error["decline_code"].as_str().map(str::to_owned)),
                    message,
                });
            }
            401 | 403 => ProviderError::new(ErrorKind::Authentication, message),
            404 => ProviderError::new(ErrorKind::NotFound, message),
            409 => ProviderError::new(ErrorKind::Conflict, message).retryable(true),
            429 => {
                return Ok(Reply::Outcome(Outcome::NotAttempted {
                    reason: format!("Stripe rate-limited the request: {message}"),
                }));
            }
            _ => ProviderError::new(ErrorKind::Processor, message),
        }
        .code(code.unwrap_or_else(|| format!("http_{}", response.status))))
    }

    fn intent_id(data: &Value) -> Result<String, ProviderError> {
        data.get("payment_intent_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                ProviderError::invalid_request(
                    "the session has no Stripe payment intent (it was not initiated)",
                )
                .param("data.payment_intent_id")
            })
    }

    /// Refuses an intent that is not this session's, for this amount and currency: an intent
    /// found at Stripe proves nothing about this payment otherwise.
    fn belongs(
        intent: &Value,
        session_id: &str,
        amount: i64,
        currency: &str,
    ) -> Result<(), ProviderError> {
        let wrong = |what: String| {
            Err(ProviderError::invalid_request(format!(
                "the payment intent {} {what}; refusing to authorize with it",
                intent["id"].as_str().unwrap_or("?")
            ))
            .code("intent_mismatch"))
        };
        if intent["metadata"]["session_id"].as_str() != Some(session_id) {
            return wrong(format!("belongs to another session, not {session_id}"));
        }
        if minor_units(&intent["amount"]) != Some(amount) {
            return wrong(format!(
                "is for {} while the session is for {amount}",
                intent["amount"]
            ));
        }
        if !intent["currency"]
            .as_str()
            .is_some_and(|c| c.eq_ignore_ascii_case(currency))
        {
            return wrong(format!(
                "is in {} while the session is in {currency}",
                intent["currency"]
            ));
        }
        Ok(())
    }

    /// The Stripe payment method the caller's input names (`payment_method: "pm_…"`), or one
    /// made from the card it carries (`card: {number, exp_month, exp_year, cvc}`, for tests:
    /// in production cards are tokenized in the browser). The card is sent to Stripe and
    /// forgotten. `Ok(Err(reply))`: Stripe's answer ends the call.
    fn payment_method(
        &self,
        input: &Value,
        key: &str,
        deadline: Option<i64>,
    ) -> Result<Result<Option<String>, Reply>, ProviderError> {
        match (input.get("payment_method"), input.get("card")) {
            (Some(Value::String(pm)), _) => Ok(Ok(Some(pm.clone()))),
            (_, Some(card)) => {
                let s = |k: &str| match &card[k] {
                    Value::String(v) => v.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => String::new(),
                };
                let form = [
                    ("type", "card".to_owned()),
                    ("card[number]", s("number")),
                    ("card[exp_month]", s("exp_month")),
                    ("card[exp_year]", s("exp_year")),
                    ("card[cvc]", s("cvc")),
                ];
                match self.request(
                    "POST",
                    "/v1/payment_methods",
                    &form,
                    Some(&format!("{key}:pm")),
                    deadline,
                )? {
                    Reply::Ok(pm) => Ok(Ok(pm["id"].as_str().map(str::to_owned))),
                    other => Ok(Err(other)),
                }
            }
            _ => Ok(Ok(None)),
        }
    }

    /// Whether the intent has a refund made under `key`, looking through every page of its
    /// refunds (newest first). `Err(reply)`: Stripe did not answer in full, so nobody knows.
    fn find_refund(
        &self,
        intent: &str,
        key: &str,
        deadline: Option<i64>,
    ) -> Result<Result<bool, Reply>, ProviderError> {
        self.pages(
            &format!("/v1/refunds?payment_intent={intent}"),
            deadline,
            |refund| refund["metadata"]["payhost_key"] == key,
        )
    }

    /// Walks a Stripe list page by page (100 a page) until `stop` holds for an object
    /// (`Ok(true)`) or the list ends (`Ok(false)`). Past 100 pages the answer is `unknown`,
    /// never "not there"; `Err(reply)` also when a page did not come back in full.
    fn pages(
        &self,
        list: &str,
        deadline: Option<i64>,
        mut stop: impl FnMut(&Value) -> bool,
    ) -> Result<Result<bool, Reply>, ProviderError> {
        /// 100 pages of 100: past that, say "unknown" rather than "not found".
        const MAX_PAGES: usize = 100;
        let sep = if list.contains('?') { "&" } else { "?" };
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let path = match &after {
                None => format!("{list}{sep}limit=100"),
                Some(last) => format!("{list}{sep}limit=100&starting_after={last}"),
            };
            let page = match self.request("GET", &path, &[], None, deadline)? {
                Reply::Ok(page) => page,
                other => return Ok(Err(other)),
            };
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if data.iter().any(&mut stop) {
                return Ok(Ok(true));
            }
            if page["has_more"].as_bool() != Some(true) {
                return Ok(Ok(false));
            }
            // More to read but no id to read on from: the list was not read in full.
            after = data
                .last()
                .and_then(|o| o["id"].as_str())
                .map(str::to_owned);
            if after.is_none() {
                return Ok(Err(Reply::Outcome(Outcome::Unknown {
                    reason: "a list page said there was more but gave no id to read on from".into(),
                })));
            }
        }
        Ok(Err(Reply::Outcome(Outcome::Unknown {
            reason: format!("more than {} objects to look through", MAX_PAGES * 100),
        })))
    }

    /// Authorizes the intent `id` with the customer's saved method: refused (declined) unless
    /// the method is still attached to that customer; then set on the intent with the customer
    /// and confirmed without the customer present.
    fn charge_saved(
        &self,
        r: &AuthorizeRequest,
        id: &str,
        method: &PaymentMethodRef,
    ) -> Result<ProviderResponse, ProviderError> {
        let key = &r.idempotency_key;
        let deadline = r.deadline_unix_ms;
        let customer = r
            .account_holder
            .as_ref()
            .ok_or_else(|| {
                ProviderError::invalid_request(
                    "a saved payment method is charged with its account holder",
                )
                .param("account_holder")
            })
            .and_then(holders::customer_id)?;
        let pm = method.reference.as_deref().ok_or_else(|| {
            ProviderError::invalid_request("the payment method has no Stripe id")
                .param("payment_method.reference")
        })?;
        match self.attached(customer, pm, deadline)? {
            Ok(true) => {}
            Ok(false) => {
                return Ok(ProviderResponse::with_outcome(Outcome::Declined {
                    code: Some("payment_method_unavailable".into()),
                    message: format!(
                        "the payment method {pm} is not attached to customer {customer}"
                    ),
                }));
            }
            Err(other) => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        }
        match self.request(
            "POST",
            &format!("/v1/payment_intents/{id}"),
            &[
                ("payment_method", pm.to_owned()),
                ("customer", customer.to_owned()),
            ],
            Some(&format!("{key}:attach")),
            deadline,
        )? {
            Reply::Ok(_) => {}
            other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        }
        let confirm = if self.options.off_session {
            vec![("off_session", "true".to_owned())]
        } else {
            Vec::new()
        };
        let reply = self.request(
            "POST",
            &format!("/v1/payment_intents/{id}/confirm"),
            &confirm,
            Some(&format!("{key}:confirm")),
            deadline,
        )?;
        Ok(Self::answer(reply, |intent| {
            let outcome = authorize_outcome(&intent).unwrap_or(Outcome::Pending);
            ProviderResponse::with_outcome(outcome).reference(id.to_owned())
        }))
    }

    fn answer(reply: Reply, on_ok: impl FnOnce(Value) -> ProviderResponse) -> ProviderResponse {
        match reply {
            Reply::Ok(json) => on_ok(json),
            Reply::Declined { code, message } => {
                ProviderResponse::with_outcome(Outcome::Declined { code, message })
            }
            Reply::Outcome(outcome) => ProviderResponse::with_outcome(outcome),
        }
    }
}

/// What an intent's status means for an authorization.
/// An amount in minor units as Stripe sends it: an integer (localstripe echoes an updated
/// amount back as the string it was sent as; that string is read as the same integer).
fn minor_units(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn authorize_outcome(intent: &Value) -> Option<Outcome> {
    match intent["status"].as_str()? {
        "requires_capture" | "succeeded" => Some(Outcome::Processed),
        "requires_action" => Some(Outcome::RequiresMore {
            next_action: intent["next_action"].clone(),
        }),
        "processing" => Some(Outcome::Pending),
        "canceled" => Some(Outcome::Declined {
            code: Some("payment_intent_canceled".into()),
            message: "the payment intent was canceled".into(),
        }),
        "requires_payment_method" if !intent["last_payment_error"].is_null() => {
            Some(Outcome::Declined {
                code: intent["last_payment_error"]["code"]
                    .as_str()
                    .map(str::to_owned),
                message: intent["last_payment_error"]["message"]
                    .as_str()
                    .unwrap_or("declined")
                    .to_owned(),
            })
        }
        _ => None,
    }
}

fn remote_status(intent: &Value) -> RemoteStatus {
    match intent["status"].as_str().unwrap_or("") {
        "requires_payment_method" if !intent["last_payment_error"].is_null() => RemoteStatus::Error,
        "requires_payment_method" | "requires_confirmation" | "processing" => RemoteStatus::Pending,
        "requires_action" => RemoteStatus::RequiresMore,
        "requires_capture" => RemoteStatus::Authorized,
        "succeeded" => RemoteStatus::Captured,
        "canceled" => RemoteStatus::Canceled,
        _ => RemoteStatus::Other,
    }
}

impl PaymentProvider for StripeProvider {
    type Options = StripeOptions;

    fn manifest() -> Manifest {
        Manifest::new("stripe", "Stripe", env!("CARGO_PKG_VERSION"))
            .description("Stripe PaymentIntents with manual capture")
            .capabilities(Capabilities {
                partial_capture: true,
                multiple_captures: false,
                partial_refund: true,
                update_amount: true,
                async_authorization: true,
                webhooks: true,
            })
            .account_holders()
            // Stripe answers a repeated Idempotency-Key with the first request's result (and a
            // 409 while that one is still running). localstripe does not: test against it with
            // `resend_unknown = false`.
            .replays_idempotency_keys(&[Operation::Capture, Operation::Refund, Operation::Cancel])
    }

    fn new(options: StripeOptions, ctx: ProviderContext) -> Result<Self, ProviderError> {
        if !(options.api_key.starts_with("sk_") || options.api_key.starts_with("rk_")) {
            return Err(ProviderError::invalid_options(
                "api_key must be a Stripe secret or restricted key (sk_… or rk_…)",
            )
            .param("options.api_key"));
        }
        if !(options.api_base.starts_with("https://") || options.api_base.starts_with("http://")) {
            return Err(
                ProviderError::invalid_options("api_base must be an http(s) URL")
                    .param("options.api_base"),
            );
        }
        // A secret anyone can read in an example config is no secret: with it, anybody could
        // sign webhooks that authorize sessions.
        let placeholder = |v: &str| {
            let v = v.to_ascii_lowercase();
            [
                "replace_me",
                "change_me",
                "changeme",
                "placeholder",
                "example",
                "your_",
            ]
            .iter()
            .any(|p| v.contains(p))
        };
        if placeholder(&options.api_key) {
            return Err(ProviderError::invalid_options(
                "api_key is a placeholder: set your Stripe secret key (STRIPE_API_KEY)",
            )
            .param("options.api_key"));
        }
        match options.webhook_secret.as_deref() {
            Some(secret) if secret.trim().is_empty() => {
                return Err(ProviderError::invalid_options(
                    "webhook_secret is empty: set the endpoint's signing secret (whsec_…) or leave it out to refuse webhooks",
                )
                .param("options.webhook_secret"));
            }
            Some(secret) if placeholder(secret) => {
                return Err(ProviderError::invalid_options(
                    "webhook_secret is a placeholder: set the endpoint's signing secret (STRIPE_WEBHOOK_SECRET), or anyone can forge webhooks",
                )
                .param("options.webhook_secret"));
            }
            _ => {}
        }
        if options.request_timeout_ms <= 0 || options.webhook_tolerance_s <= 0 {
            return Err(ProviderError::invalid_options(
                "request_timeout_ms and webhook_tolerance_s must be positive",
            ));
        }
        Ok(StripeProvider {
            options,
            host: ctx.host,
        })
    }

    fn initiate(&self, r: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        let mut form = vec![
            ("amount", r.amount.to_string()),
            ("currency", r.currency_code.clone()),
            ("capture_method", "manual".to_owned()),
            ("metadata[session_id]", r.session_id.clone()),
        ];
        // A customer's session: the intent is theirs, so their saved methods can pay it.
        if let Some(holder) = &r.account_holder {
            form.push(("customer", holders::customer_id(holder)?.to_owned()));
        }
        let reply = self.request(
            "POST",
            "/v1/payment_intents",
            &form,
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        let intent = match reply {
            Reply::Ok(intent) => intent,
            other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        };
        let mut data = match r.data {
            Value::Object(map) => map,
            _ => Default::default(),
        };
        data.insert("payment_intent_id".into(), intent["id"].clone());
        data.insert("client_secret".into(), intent["client_secret"].clone());
        // A payment method given now is kept by its Stripe id, never as card data.
        match self.payment_method(&r.input, &r.idempotency_key, r.deadline_unix_ms)? {
            Ok(Some(pm)) => {
                data.insert("payment_method".into(), Value::String(pm));
            }
            Ok(None) => {}
            Err(other) => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        }
        Ok(ProviderResponse::processed()
            .data(Value::Object(data))
            .reference(intent["id"].as_str().unwrap_or_default()))
    }

    fn update(&self, r: UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        let id = Self::intent_id(&r.data)?;
        let reply = self.request(
            "POST",
            &format!("/v1/payment_intents/{id}"),
            &[("amount", r.amount.to_string())],
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |_| ProviderResponse::processed()))
    }

    fn authorize(&self, r: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        let id = Self::intent_id(&r.data)?;
        let key = &r.idempotency_key;
        let deadline = r.deadline_unix_ms;
        // Where the intent stands: a retry, or the authorize after 3-D Secure, reads the result.
        let intent = match self.request(
            "GET",
            &format!("/v1/payment_intents/{id}"),
            &[],
            None,
            deadline,
        )? {
            Reply::Ok(intent) => intent,
            other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        };
        Self::belongs(&intent, &r.session_id, r.amount, &r.currency_code)?;
        if let Some(outcome) = authorize_outcome(&intent) {
            return Ok(ProviderResponse::with_outcome(outcome).reference(id));
        }
        if let Some(method) = &r.payment_method {
            return self.charge_saved(&r, &id, method);
        }
        let payment_method = match self.payment_method(&r.input, key, deadline)? {
            Ok(Some(pm)) => pm,
            Ok(None) => match r.data.get("payment_method") {
                Some(Value::String(pm)) => pm.clone(),
                _ => {
                    return Err(ProviderError::invalid_request(
                        "no payment method: give payment_method (pm_…) or card in the input",
                    )
                    .param("data.payment_method"));
                }
            },
            Err(other) => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        };
        match self.request(
            "POST",
            &format!("/v1/payment_intents/{id}"),
            &[("payment_method", payment_method)],
            Some(&format!("{key}:attach")),
            deadline,
        )? {
            Reply::Ok(_) => {}
            other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        }
        let reply = self.request(
            "POST",
            &format!("/v1/payment_intents/{id}/confirm"),
            &[],
            Some(&format!("{key}:confirm")),
            deadline,
        )?;
        Ok(Self::answer(reply, |intent| {
            let outcome = authorize_outcome(&intent).unwrap_or(Outcome::Pending);
            ProviderResponse::with_outcome(outcome).reference(id.clone())
        }))
    }

    fn create_account_holder(
        &self,
        r: CreateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.create_customer(r)
    }

    fn update_account_holder(
        &self,
        r: UpdateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.update_customer(r)
    }

    fn delete_account_holder(
        &self,
        r: DeleteAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.delete_customer(r)
    }

    fn retrieve_account_holder(
        &self,
        r: RetrieveAccountHolderRequest,
    ) -> Result<RetrieveAccountHolderResponse, ProviderError> {
        self.retrieve_customer(r)
    }

    fn list_payment_methods(
        &self,
        r: ListPaymentMethodsRequest,
    ) -> Result<PaymentMethodList, ProviderError> {
        self.list_methods(r)
    }

    fn save_payment_method(
        &self,
        r: SavePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.save_method(r)
    }

    fn delete_payment_method(
        &self,
        r: DeletePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.delete_method(r)
    }

    fn capture(&self, r: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        let id = Self::intent_id(&r.data)?;
        let reply = self.request(
            "POST",
            &format!("/v1/payment_intents/{id}/capture"),
            &[("amount_to_capture", r.amount.to_string())],
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |_| {
            ProviderResponse::processed().reference(id.clone())
        }))
    }

    fn refund(&self, r: RefundRequest) -> Result<ProviderResponse, ProviderError> {
        let id = Self::intent_id(&r.data)?;
        let mut form = vec![
            ("payment_intent", id),
            ("amount", r.amount.to_string()),
            ("metadata[payhost_key]", r.idempotency_key.clone()),
        ];
        if let Some(reason) = &r.reason {
            form.push(("metadata[reason]", reason.clone()));
        }
        let reply = self.request(
            "POST",
            "/v1/refunds",
            &form,
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |refund| {
            ProviderResponse::processed().reference(refund["id"].as_str().unwrap_or_default())
        }))
    }

    fn cancel(&self, r: CancelRequest) -> Result<ProviderResponse, ProviderError> {
        let id = Self::intent_id(&r.data)?;
        let reply = self.request(
            "POST",
            &format!("/v1/payment_intents/{id}/cancel"),
            &[],
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |_| {
            ProviderResponse::processed().reference(id.clone())
        }))
    }

    fn retrieve(&self, r: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        let Ok(id) = Self::intent_id(&r.data) else {
            return Ok(RetrieveResponse {
                status: RemoteStatus::NotFound,
                amount_authorized: None,
                amount_captured: None,
                amount_refunded: None,
                attempt: r.attempt.map(|_| Outcome::NotAttempted {
                    reason: "no payment intent was ever created".into(),
                }),
                data: None,
            });
        };
        let unknown = |reply: Reply| match reply {
            Reply::Outcome(o) => o,
            _ => Outcome::Unknown {
                reason: "Stripe did not answer the status request".into(),
            },
        };
        let intent = match self.request(
            "GET",
            &format!("/v1/payment_intents/{id}"),
            &[],
            None,
            r.deadline_unix_ms,
        )? {
            Reply::Ok(intent) => intent,
            other => {
                return Ok(RetrieveResponse {
                    status: RemoteStatus::Other,
                    amount_authorized: None,
                    amount_captured: None,
                    amount_refunded: None,
                    attempt: Some(unknown(other)),
                    data: None,
                });
            }
        };
        let status = intent["status"].as_str().unwrap_or("");
        let not_attempted = |what: &str| Outcome::NotAttempted {
            reason: format!("Stripe shows no {what} for this key"),
        };
        let attempt = match &r.attempt {
            None => None,
            Some(a) => Some(match a.operation {
                Operation::Authorize => {
                    authorize_outcome(&intent).unwrap_or_else(|| not_attempted("authorization"))
                }
                Operation::Capture if status == "succeeded" => Outcome::Processed,
                Operation::Capture => not_attempted("capture"),
                Operation::Cancel if status == "canceled" => Outcome::Processed,
                Operation::Cancel => not_attempted("cancelation"),
                Operation::Refund => {
                    match self.find_refund(&id, &a.idempotency_key, r.deadline_unix_ms)? {
                        Ok(true) => Outcome::Processed,
                        Ok(false) => not_attempted("refund"),
                        Err(other) => unknown(other),
                    }
                }
                _ => not_attempted("such operation"),
            }),
        };
        Ok(RetrieveResponse {
            status: remote_status(&intent),
            amount_authorized: minor_units(&intent["amount"]),
            amount_captured: minor_units(&intent["amount_received"]),
            amount_refunded: None,
            attempt,
            data: None,
        })
    }

    fn parse_webhook(&self, r: WebhookRequest) -> Result<WebhookEvent, ProviderError> {
        let bad = |m: &str| {
            ProviderError::new(ErrorKind::InvalidSignature, format!("Stripe webhook: {m}"))
        };
        let secret = self
            .options
            .webhook_secret
            .as_deref()
            .ok_or_else(|| bad("no webhook_secret is configured for this provider"))?;
        let header = r
            .header("stripe-signature")
            .ok_or_else(|| bad("no Stripe-Signature header"))?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
                Some(("v1", v)) => signatures.push(v.to_owned()),
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or_else(|| bad("the signature has no timestamp"))?;
        let age = (r.received_at_unix_ms / 1000 - timestamp).abs();
        if age > self.options.webhook_tolerance_s {
            return Err(bad(&format!(
                "the timestamp is {age} s away from now (tolerance {} s)",
                self.options.webhook_tolerance_s
            )));
        }
        let verified = signatures.iter().any(|sig| {
            let Ok(sig) = hex::decode(sig) else {
                return false;
            };
            let mut mac =
                Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
            mac.update(format!("{timestamp}.{}", r.body).as_bytes());
            mac.verify_slice(&sig).is_ok()
        });
        if !verified {
            return Err(bad("no v1 signature matches"));
        }
        let event: Value = serde_json::from_str(&r.body)
            .map_err(|e| ProviderError::invalid_request(format!("Stripe webhook body: {e}")))?;
        let object = &event["data"]["object"];
        let action = match event["type"].as_str().unwrap_or("") {
            "payment_intent.amount_capturable_updated" => WebhookAction::Authorized,
            "payment_intent.succeeded" => WebhookAction::Captured,
            "payment_intent.payment_failed" => WebhookAction::Failed,
            "payment_intent.canceled" => WebhookAction::Canceled,
            "payment_intent.requires_action" => WebhookAction::RequiresMore,
            "payment_intent.processing" => WebhookAction::Pending,
            _ => WebhookAction::NotSupported,
        };
        let session_id = if object["object"] == "payment_intent" {
            object["metadata"]["session_id"].as_str().map(str::to_owned)
        } else {
            None
        };
        Ok(WebhookEvent {
            event_id: event["id"].as_str().unwrap_or_default().to_owned(),
            // Events about intents payhost did not create carry no session: acknowledged, ignored.
            session_id,
            reference: object["id"].as_str().map(str::to_owned),
            action,
            amount: minor_units(&object["amount"]),
            currency_code: object["currency"].as_str().map(str::to_owned),
            data: None,
        })
    }

    fn custom(&self, name: &str, _payload: Value) -> Result<Value, ProviderError> {
        match name {
            // A cheap authenticated request, for operators checking credentials and reachability.
            "ping" => match self.request("GET", "/v1/payment_intents?limit=1", &[], None, None)? {
                Reply::Ok(_) => Ok(json!({"ok": true})),
                Reply::Declined { message, .. } => Ok(json!({"ok": false, "error": message})),
                Reply::Outcome(o) => Ok(json!({"ok": false, "error": o.name()})),
            },
            other => Err(ProviderError::unsupported(&format!("x.{other}"))),
        }
    }
}

export_provider!(StripeProvider);

#[cfg(test)]
mod tests {
    use super::{
        Hmac, KeyInit, Mac, Sha256, StripeProvider, authorize_outcome, json, remote_status,
    };
    use payhost_provider_api::testkit::{TestHost, check_conformance};
    use payhost_provider_api::*;

    fn sign(secret: &str, body: &str, t: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn provider(host: &TestHost) -> payhost_provider_api::testkit::TestProvider<StripeProvider> {
        host.instantiate::<StripeProvider>(json!({
            "api_key": "sk_test_x",
            "api_base": "http://127.0.0.1:9",
            "webhook_secret": "whsec_test",
        }))
        .unwrap()
    }

    #[test]
    fn placeholder_and_empty_secrets_are_refused() {
        for (options, param) in [
            (json!({"api_key": "sk_test_replace_me"}), "options.api_key"),
            (
                json!({"api_key": "sk_test_x", "webhook_secret": "whsec_replace_me"}),
                "options.webhook_secret",
            ),
            (
                json!({"api_key": "sk_test_x", "webhook_secret": ""}),
                "options.webhook_secret",
            ),
        ] {
            let e = TestHost::new()
                .instantiate::<StripeProvider>(options)
                .err()
                .unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        }
    }

    #[test]
    fn options_are_checked() {
        let e = TestHost::new()
            .instantiate::<StripeProvider>(json!({"api_key": "pk_live_oops"}))
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("options.api_key"));
        let e = TestHost::new()
            .instantiate::<StripeProvider>(json!({"api_key": "sk_test_x", "apikey": 1}))
            .err()
            .unwrap();
        assert!(e.message.contains("apikey"));
    }

    #[test]
    fn it_conforms_and_initiates_with_the_idempotency_key() {
        let host = TestHost::new();
        host.on_http(|_| {
            Ok(HttpResponse {
                status: 200,
                headers: vec![],
                body: json!({"id": "pi_1", "client_secret": "pi_1_secret", "status": "requires_payment_method"}).to_string(),
            })
        });
        check_conformance::<StripeProvider>(&host, json!({"api_key": "sk_test_x"})).unwrap();
        let sent = host.http_requests();
        let create = sent
            .iter()
            .find(|r| r.url.ends_with("/v1/payment_intents"))
            .unwrap();
        assert!(create.headers.iter().any(|(k, _)| k == "idempotency-key"));
        assert!(
            create
                .body
                .as_deref()
                .unwrap()
                .contains("capture_method=manual")
        );
        assert!(
            create
                .body
                .as_deref()
                .unwrap()
                .contains("metadata%5Bsession_id%5D=ps_conformance")
        );
    }

    #[test]
    fn failures_before_and_after_sending_are_kept_apart() {
        let host = TestHost::new();
        let p = provider(&host);
        host.on_http(|_| {
            Err(HttpFailure::NotSent {
                message: "refused".into(),
            })
        });
        let r = p
            .initiate(&TestHost::initiate_request("ps_1", 100, "eur"))
            .unwrap();
        assert!(matches!(r.outcome, Outcome::NotAttempted { .. }));
        host.on_http(|_| {
            Err(HttpFailure::Unknown {
                message: "reset".into(),
                status: None,
            })
        });
        let r = p
            .initiate(&TestHost::initiate_request("ps_1", 100, "eur"))
            .unwrap();
        assert!(matches!(r.outcome, Outcome::Unknown { .. }));
        host.on_http(|_| {
            Ok(HttpResponse {
                status: 402,
                headers: vec![],
                body: json!({"error": {"code": "card_declined", "message": "Your card was declined."}}).to_string(),
            })
        });
        let mut capture = TestHost::capture_request("ps_1", 100, "eur");
        capture.data = json!({"payment_intent_id": "pi_1"});
        let r = p.capture(&capture).unwrap();
        assert!(
            matches!(r.outcome, Outcome::Declined { code: Some(ref c), .. } if c == "card_declined")
        );
    }

    #[test]
    fn webhooks_verify_the_stripe_signature_and_map_events() {
        let host = TestHost::new();
        let p = provider(&host);
        let now = host.now_unix_ms();
        let body = json!({
            "id": "evt_1", "type": "payment_intent.amount_capturable_updated",
            "data": {"object": {"object": "payment_intent", "id": "pi_1", "amount": 500, "currency": "eur", "metadata": {"session_id": "ps_1"}}}
        })
        .to_string();
        let request = |body: &str, sig: String, at: i64| WebhookRequest {
            body: body.to_owned(),
            headers: vec![("Stripe-Signature".into(), sig)],
            received_at_unix_ms: at,
        };
        let event = p
            .parse_webhook(&request(&body, sign("whsec_test", &body, now / 1000), now))
            .unwrap();
        assert_eq!(event.action, WebhookAction::Authorized);
        assert_eq!(event.session_id.as_deref(), Some("ps_1"));
        assert_eq!(event.amount, Some(500));
        let forged = p
            .parse_webhook(&request(&body, sign("whsec_other", &body, now / 1000), now))
            .unwrap_err();
        assert_eq!(forged.kind, ErrorKind::InvalidSignature);
        let stale = p
            .parse_webhook(&request(
                &body,
                sign("whsec_test", &body, now / 1000 - 3600),
                now,
            ))
            .unwrap_err();
        assert!(stale.message.contains("tolerance"));
        let foreign = json!({"id": "evt_2", "type": "charge.refunded", "data": {"object": {"object": "charge", "id": "ch_1"}}}).to_string();
        let event = p
            .parse_webhook(&request(
                &foreign,
                sign("whsec_test", &foreign, now / 1000),
                now,
            ))
            .unwrap();
        assert_eq!(event.session_id, None);
        assert_eq!(event.action, WebhookAction::NotSupported);
    }

    #[test]
    fn authorize_refuses_an_intent_that_is_not_this_sessions_amount_and_currency() {
        for (metadata_session, amount, currency) in [
            ("ps_other", 1500, "eur"),
            ("ps_1", 100, "eur"),
            ("ps_1", 1500, "usd"),
        ] {
            let host = TestHost::new();
            host.on_http(move |_| {
                Ok(HttpResponse {
                    status: 200,
                    headers: vec![],
                    body: json!({"id": "pi_old", "status": "requires_capture", "amount": amount,
                        "currency": currency, "metadata": {"session_id": metadata_session}})
                    .to_string(),
                })
            });
            let stripe = provider(&host);
            let mut request = TestHost::authorize_request("ps_1", 1500, "eur");
            request.data = json!({"payment_intent_id": "pi_old"});
            let e = stripe.authorize(&request).unwrap_err();
            assert_eq!(e.code.as_deref(), Some("intent_mismatch"), "{e:?}");
        }
    }

    #[test]
    fn intent_statuses_map_to_payhost_outcomes() {
        assert_eq!(
            authorize_outcome(&json!({"status": "requires_capture"})),
            Some(Outcome::Processed)
        );
        assert!(matches!(
            authorize_outcome(&json!({"status": "requires_action", "next_action": {"type": "x"}})),
            Some(Outcome::RequiresMore { .. })
        ));
        assert_eq!(
            authorize_outcome(&json!({"status": "processing"})),
            Some(Outcome::Pending)
        );
        assert!(matches!(
            authorize_outcome(
                &json!({"status": "requires_payment_method", "last_payment_error": {"code": "card_declined"}})
            ),
            Some(Outcome::Declined { .. })
        ));
        assert_eq!(
            authorize_outcome(
                &json!({"status": "requires_payment_method", "last_payment_error": null})
            ),
            None
        );
        assert_eq!(
            remote_status(&json!({"status": "succeeded"})),
            RemoteStatus::Captured
        );
        assert_eq!(
            remote_status(&json!({"status": "requires_confirmation"})),
            RemoteStatus::Pending
        );
    }
}
