//! Test kit for vendors: run a provider in-process through the same JSON envelope, panic guard and
//! options check the host uses, with a host whose clock you control and whose logs you can read.
//!
//! ```
//! use payhost_provider_api::testkit::TestHost;
//! # use payhost_provider_api::*;
//! # struct Free;
//! # impl PaymentProvider for Free {
//! #     type Options = serde_json::Value;
//! #     fn manifest() -> Manifest { Manifest::new("free", "Free", "1.0.0") }
//! #     fn new(_: serde_json::Value, _: ProviderContext) -> Result<Self, ProviderError> { Ok(Free) }
//! #     fn initiate(&self, _: InitiateRequest) -> Result<ProviderResponse, ProviderError> { Ok(ProviderResponse::processed()) }
//! #     fn authorize(&self, _: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> { Ok(ProviderResponse::processed()) }
//! #     fn capture(&self, _: CaptureRequest) -> Result<ProviderResponse, ProviderError> { Ok(ProviderResponse::processed()) }
//! #     fn refund(&self, _: RefundRequest) -> Result<ProviderResponse, ProviderError> { Ok(ProviderResponse::processed()) }
//! #     fn cancel(&self, _: CancelRequest) -> Result<ProviderResponse, ProviderError> { Ok(ProviderResponse::processed()) }
//! #     fn retrieve(&self, _: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> { unimplemented!() }
//! # }
//! let host = TestHost::new();
//! let provider = host.instantiate::<Free>(serde_json::json!({})).unwrap();
//! let answer = provider.authorize(&TestHost::authorize_request("ps_1", 1000, "eur")).unwrap();
//! assert_eq!(answer.outcome, Outcome::Processed);
//! payhost_provider_api::testkit::check_conformance::<Free>(&host, serde_json::json!({})).unwrap();
//! ```

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::dispatch::{self, Instance, InstanceConfig};
use crate::holders::*;
use crate::host::{HostBackend, LogRecord, ops, system_now_unix_ms};
use crate::manifest::Manifest;
use crate::protocol::*;
use crate::provider::PaymentProvider;

/// A host for tests: records log records, and has a clock that stands still unless advanced.
#[derive(Clone)]
pub struct TestHost {
    inner: Arc<TestBackend>,
}

/// A stand-in for the processor in tests: answers the provider's HTTP requests.
pub type HttpStub = Box<
    dyn Fn(&crate::HttpRequest) -> Result<crate::HttpResponse, crate::HttpFailure> + Send + Sync,
>;

struct TestBackend {
    clock_ms: AtomicI64,
    logs: Mutex<Vec<LogRecord>>,
    http: Mutex<Option<HttpStub>>,
    requests: Mutex<Vec<crate::HttpRequest>>,
}

impl HostBackend for TestBackend {
    fn call(&self, op: &str, request: &str) -> Result<String, String> {
        match op {
            ops::CLOCK_NOW => Ok(format!(
                "{{\"unix_ms\":{}}}",
                self.clock_ms.load(Ordering::SeqCst)
            )),
            ops::LOG => {
                let record: LogRecord = serde_json::from_str(request).map_err(|e| e.to_string())?;
                self.logs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(record);
                Ok("null".into())
            }
            ops::HTTP => {
                let request: crate::HttpRequest =
                    serde_json::from_str(request).map_err(|e| e.to_string())?;
                self.requests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(request.clone());
                let stub = self.http.lock().unwrap_or_else(|e| e.into_inner());
                let Some(stub) = stub.as_ref() else {
                    return Err(format!(
                        "unsupported host service `{}` (no TestHost::on_http stub)",
                        ops::HTTP
                    ));
                };
                match stub(&request) {
                    Ok(response) => serde_json::to_string(&response).map_err(|e| e.to_string()),
                    Err(failure) => Err(serde_json::to_string(&failure).unwrap_or_default()),
                }
            }
            other => Err(format!("unsupported host service `{other}`")),
        }
    }
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

impl TestHost {
    /// A host whose clock reads the current time and then stands still.
    pub fn new() -> Self {
        TestHost {
            inner: Arc::new(TestBackend {
                clock_ms: AtomicI64::new(system_now_unix_ms()),
                logs: Mutex::new(Vec::new()),
                http: Mutex::new(None),
                requests: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Answers the provider's HTTP requests with `stub` (without one, the HTTP service is
    /// unsupported, as in a host that predates it).
    pub fn on_http(
        &self,
        stub: impl Fn(&crate::HttpRequest) -> Result<crate::HttpResponse, crate::HttpFailure>
        + Send
        + Sync
        + 'static,
    ) {
        *self.inner.http.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(stub));
    }

    /// Every HTTP request the provider asked the host to send, oldest first.
    pub fn http_requests(&self) -> Vec<crate::HttpRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Moves the clock forward.
    pub fn advance_ms(&self, ms: i64) {
        self.inner.clock_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// The clock's reading.
    pub fn now_unix_ms(&self) -> i64 {
        self.inner.clock_ms.load(Ordering::SeqCst)
    }

    /// Every record logged so far through [`crate::HostServices::log`].
    pub fn logs(&self) -> Vec<LogRecord> {
        self.inner
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Host services backed by this test host, to build a provider's [`crate::ProviderContext`]
    /// by hand in a unit test.
    pub fn services(&self) -> crate::HostServices {
        crate::HostServices::new(self.inner.clone())
    }

    /// Instantiates `P` with these options as the host would (instance id `test`, config folder
    /// the current directory). `Err` is what the operator would see at load.
    pub fn instantiate<P: PaymentProvider>(
        &self,
        options: Value,
    ) -> Result<TestProvider<P>, ProviderError> {
        self.instantiate_as::<P>("test", options)
    }

    /// Like [`TestHost::instantiate`], with an instance id of your choice.
    pub fn instantiate_as<P: PaymentProvider>(
        &self,
        instance_id: &str,
        options: Value,
    ) -> Result<TestProvider<P>, ProviderError> {
        let config = InstanceConfig {
            instance_id: instance_id.to_owned(),
            protocol: PROTOCOL_VERSION,
            options,
            config_dir: std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            log_level: "trace".into(),
        };
        let instance = dispatch::instantiate::<P>(&config, self.inner.clone())?;
        Ok(TestProvider {
            instance,
            _p: PhantomData,
        })
    }

    /// An initiate request with fresh ids.
    pub fn initiate_request(session_id: &str, amount: i64, currency: &str) -> InitiateRequest {
        InitiateRequest {
            session_id: session_id.into(),
            idempotency_key: fresh_key("init"),
            amount,
            currency_code: currency.into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            deadline_unix_ms: None,
        }
    }

    /// An authorize request with a fresh idempotency key.
    pub fn authorize_request(session_id: &str, amount: i64, currency: &str) -> AuthorizeRequest {
        AuthorizeRequest {
            session_id: session_id.into(),
            idempotency_key: fresh_key("auth"),
            amount,
            currency_code: currency.into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            payment_method: None,
            deadline_unix_ms: None,
        }
    }

    /// A capture request with a fresh idempotency key.
    pub fn capture_request(session_id: &str, amount: i64, currency: &str) -> CaptureRequest {
        CaptureRequest {
            session_id: session_id.into(),
            payment_id: format!("pay_{session_id}"),
            idempotency_key: fresh_key("capt"),
            amount,
            currency_code: currency.into(),
            data: Value::Null,
            deadline_unix_ms: None,
        }
    }

    /// A refund request with a fresh idempotency key.
    pub fn refund_request(session_id: &str, amount: i64, currency: &str) -> RefundRequest {
        RefundRequest {
            session_id: session_id.into(),
            payment_id: format!("pay_{session_id}"),
            idempotency_key: fresh_key("ref"),
            amount,
            currency_code: currency.into(),
            data: Value::Null,
            reason: None,
            deadline_unix_ms: None,
        }
    }

    /// A cancel request with a fresh idempotency key.
    pub fn cancel_request(session_id: &str, amount: i64, currency: &str) -> CancelRequest {
        CancelRequest {
            session_id: session_id.into(),
            payment_id: None,
            idempotency_key: fresh_key("cancel"),
            amount,
            currency_code: currency.into(),
            data: Value::Null,
            deadline_unix_ms: None,
        }
    }

    /// A retrieve request, asking about `attempt` when given.
    pub fn retrieve_request(
        session_id: &str,
        amount: i64,
        currency: &str,
        attempt: Option<AttemptRef>,
    ) -> RetrieveRequest {
        RetrieveRequest {
            session_id: session_id.into(),
            payment_id: None,
            idempotency_key: fresh_key("retr"),
            amount,
            currency_code: currency.into(),
            data: Value::Null,
            attempt,
            deadline_unix_ms: None,
        }
    }
}

/// Account holder and payment method requests (since 1.4).
impl TestHost {
    /// A customer with this id and e-mail address.
    pub fn customer(id: &str, email: &str) -> Customer {
        Customer {
            id: id.into(),
            email: Some(email.into()),
            ..Customer::default()
        }
    }

    /// A create request for a new account holder `account_holder_id`, with a fresh key.
    pub fn create_account_holder_request(
        account_holder_id: &str,
        customer: Customer,
    ) -> CreateAccountHolderRequest {
        CreateAccountHolderRequest {
            account_holder_id: account_holder_id.into(),
            idempotency_key: fresh_key("ach"),
            customer,
            input: Value::Null,
            deadline_unix_ms: None,
        }
    }

    /// The host's view of an account holder after its create answered `answer`.
    pub fn account_holder(account_holder_id: &str, answer: &ProviderResponse) -> AccountHolderRef {
        AccountHolderRef {
            id: account_holder_id.into(),
            reference: answer.reference.clone(),
            data: answer.data.clone().unwrap_or(Value::Null),
        }
    }

    /// An update request with a fresh key.
    pub fn update_account_holder_request(
        holder: &AccountHolderRef,
        customer: Customer,
    ) -> UpdateAccountHolderRequest {
        UpdateAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: fresh_key("achu"),
            customer,
            input: Value::Null,
            deadline_unix_ms: None,
        }
    }

    /// A delete request with a fresh key.
    pub fn delete_account_holder_request(holder: &AccountHolderRef) -> DeleteAccountHolderRequest {
        DeleteAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: fresh_key("achd"),
            deadline_unix_ms: None,
        }
    }

    /// A retrieve request, asking about `attempt` when given.
    pub fn retrieve_account_holder_request(
        holder: &AccountHolderRef,
        attempt: Option<AttemptRef>,
    ) -> RetrieveAccountHolderRequest {
        RetrieveAccountHolderRequest {
            account_holder: holder.clone(),
            idempotency_key: fresh_key("achr"),
            attempt,
            payment_method: None,
            deadline_unix_ms: None,
        }
    }

    /// A list request with a fresh key.
    pub fn list_payment_methods_request(holder: &AccountHolderRef) -> ListPaymentMethodsRequest {
        ListPaymentMethodsRequest {
            account_holder: holder.clone(),
            idempotency_key: fresh_key("pml"),
            deadline_unix_ms: None,
        }
    }

    /// A save request for payment method `payment_method_id` with this `input` (a card or a
    /// token), with a fresh key.
    pub fn save_payment_method_request(
        holder: &AccountHolderRef,
        payment_method_id: &str,
        input: Value,
    ) -> SavePaymentMethodRequest {
        SavePaymentMethodRequest {
            account_holder: holder.clone(),
            payment_method_id: payment_method_id.into(),
            idempotency_key: fresh_key("pms"),
            input,
            deadline_unix_ms: None,
        }
    }

    /// The host's view of a payment method after its save answered `answer`.
    pub fn payment_method(payment_method_id: &str, answer: &ProviderResponse) -> PaymentMethodRef {
        PaymentMethodRef {
            id: payment_method_id.into(),
            reference: answer.reference.clone(),
            data: answer.data.clone().unwrap_or(Value::Null),
        }
    }

    /// A delete request for a saved method, with a fresh key.
    pub fn delete_payment_method_request(
        holder: &AccountHolderRef,
        method: &PaymentMethodRef,
    ) -> DeletePaymentMethodRequest {
        DeletePaymentMethodRequest {
            account_holder: holder.clone(),
            payment_method: method.clone(),
            idempotency_key: fresh_key("pmd"),
            deadline_unix_ms: None,
        }
    }
}

fn fresh_key(prefix: &str) -> String {
    static COUNTER: AtomicI64 = AtomicI64::new(0);
    format!(
        "test_{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A provider instance under test. Every call is serialized to JSON and back, exactly as across
/// the real boundary, so a type that does not round-trip fails here first.
pub struct TestProvider<P> {
    instance: Instance<P>,
    _p: PhantomData<fn() -> P>,
}

impl<P: PaymentProvider> TestProvider<P> {
    /// Calls an operation by wire name with a raw JSON request and returns raw JSON.
    pub fn call_raw(&self, op: &str, request: &str) -> Result<String, ProviderError> {
        dispatch::dispatch(&self.instance, op, request)
    }

    /// Calls the operation of `request`'s type, through the JSON envelope.
    pub fn call<R: Request>(&self, request: &R) -> Result<R::Response, ProviderError> {
        let json = serde_json::to_string(request)
            .map_err(|e| ProviderError::internal(format!("request did not serialize: {e}")))?;
        let op = R::OPERATION;
        let answer = self.call_raw(op.as_str(), &json)?;
        serde_json::from_str(&answer).map_err(|e| {
            ProviderError::internal(format!("the {op} response does not read back: {e}"))
        })
    }

    /// Initiates.
    pub fn initiate(&self, r: &InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Updates.
    pub fn update(&self, r: &UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Authorizes.
    pub fn authorize(&self, r: &AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Captures.
    pub fn capture(&self, r: &CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Refunds.
    pub fn refund(&self, r: &RefundRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Cancels.
    pub fn cancel(&self, r: &CancelRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Deletes.
    pub fn delete(&self, r: &DeleteRequest) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Retrieves.
    pub fn retrieve(&self, r: &RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        self.call(r)
    }
    /// Parses a webhook.
    pub fn parse_webhook(&self, r: &WebhookRequest) -> Result<WebhookEvent, ProviderError> {
        self.call(r)
    }
    /// Creates an account holder.
    pub fn create_account_holder(
        &self,
        r: &CreateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Updates an account holder.
    pub fn update_account_holder(
        &self,
        r: &UpdateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Deletes an account holder.
    pub fn delete_account_holder(
        &self,
        r: &DeleteAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Retrieves an account holder.
    pub fn retrieve_account_holder(
        &self,
        r: &RetrieveAccountHolderRequest,
    ) -> Result<RetrieveAccountHolderResponse, ProviderError> {
        self.call(r)
    }
    /// Lists saved payment methods.
    pub fn list_payment_methods(
        &self,
        r: &ListPaymentMethodsRequest,
    ) -> Result<PaymentMethodList, ProviderError> {
        self.call(r)
    }
    /// Saves a payment method.
    pub fn save_payment_method(
        &self,
        r: &SavePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Deletes a saved payment method.
    pub fn delete_payment_method(
        &self,
        r: &DeletePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        self.call(r)
    }
    /// Calls a custom `x.<name>` operation.
    pub fn custom(&self, name: &str, payload: &Value) -> Result<Value, ProviderError> {
        let answer = self.call_raw(&format!("x.{name}"), &payload.to_string())?;
        serde_json::from_str(&answer)
            .map_err(|e| ProviderError::internal(format!("x.{name} answered bad JSON: {e}")))
    }
}

/// Checks what every provider must do to be loaded and driven by payhost: a valid manifest, a
/// clean instantiation with `options`, `unsupported` for unknown operations, `invalid_request`
/// naming the field for malformed requests, and answers that survive the JSON round trip.
/// `Err` lists every failure found.
pub fn check_conformance<P: PaymentProvider>(
    host: &TestHost,
    options: Value,
) -> Result<(), String> {
    let mut failures = Vec::new();
    match dispatch::manifest::<P>() {
        Ok(m) => {
            if let Err(e) = Manifest::validate(&m).and_then(|()| m.check_replays()) {
                failures.push(format!("manifest: {e}"));
            }
        }
        Err(e) => failures.push(format!("manifest(): {e}")),
    }
    let provider = match host.instantiate::<P>(options) {
        Ok(p) => p,
        Err(e) => {
            failures.push(format!("instantiate with the given options: {e}"));
            return Err(failures.join("\n"));
        }
    };
    match provider.call_raw("no_such_operation", "{}") {
        Err(e) if e.kind == ErrorKind::Unsupported => {}
        other => failures.push(format!(
            "an unknown operation must answer `unsupported`, got {other:?}"
        )),
    }
    match provider.call_raw("authorize", r#"{"session_id": 5}"#) {
        Err(e) if e.kind == ErrorKind::InvalidRequest && e.param.is_some() => {}
        other => failures.push(format!(
            "a malformed authorize must answer `invalid_request` naming the field, got {other:?}"
        )),
    }
    let init = TestHost::initiate_request("ps_conformance", 1000, "eur");
    if let Err(e) = provider.initiate(&init) {
        failures.push(format!("initiate of a plain 10.00 EUR payment failed: {e}"));
    }
    let declared = dispatch::manifest::<P>()
        .map(|m| m.account_holders)
        .unwrap_or(false);
    if !declared {
        for op in Operation::ACCOUNT_HOLDER {
            match provider.call_raw(op.as_str(), "{}") {
                Err(e) if e.kind == ErrorKind::Unsupported => {}
                other => failures.push(format!(
                    "`{op}` is not declared (Manifest::account_holders) so it must answer \
                     `unsupported`, got {other:?}"
                )),
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Checks a provider that declares [`crate::Manifest::account_holders`] with its own
/// processor behind it (options and `card`: a card or token `input` its save accepts): an
/// account holder is created (with a `reference`), read back active, a method saved to it (with
/// a `reference`) is listed, a repeated save key saves once, the method is deleted and no longer
/// listed, and the holder is deleted and read back deleted. `Err` lists every failure found.
pub fn check_account_holders<P: PaymentProvider>(
    host: &TestHost,
    options: Value,
    card: Value,
) -> Result<(), String> {
    let mut failures = Vec::new();
    let provider = host
        .instantiate::<P>(options)
        .map_err(|e| format!("instantiate with the given options: {e}"))?;
    let create = TestHost::create_account_holder_request(
        "ach_conformance",
        TestHost::customer("cus_conformance", "kit@example.com"),
    );
    let created = provider
        .create_account_holder(&create)
        .map_err(|e| format!("create_account_holder: {e}"))?;
    if created.outcome != Outcome::Processed || created.reference.is_none() {
        return Err(format!(
            "create_account_holder must answer processed with the processor's id as `reference`, \
             got {created:?}"
        ));
    }
    let holder = TestHost::account_holder("ach_conformance", &created);
    match provider
        .retrieve_account_holder(&TestHost::retrieve_account_holder_request(&holder, None))
    {
        Ok(r) if r.status == HolderStatus::Active => {}
        other => failures.push(format!(
            "a created account holder must retrieve as active, got {other:?}"
        )),
    }
    let save = TestHost::save_payment_method_request(&holder, "pm_conformance", card);
    let saved = match provider.save_payment_method(&save) {
        Ok(r) if r.outcome == Outcome::Processed && r.reference.is_some() => r,
        other => {
            failures.push(format!(
                "save_payment_method must answer processed with the method's id as `reference`, \
                 got {other:?}"
            ));
            return Err(failures.join("\n"));
        }
    };
    match provider.save_payment_method(&save) {
        Ok(again) if again.reference == saved.reference => {}
        other => failures.push(format!(
            "a repeated save key must answer the first save ({:?}), got {other:?}",
            saved.reference
        )),
    }
    let method = TestHost::payment_method("pm_conformance", &saved);
    let listed = |p: &TestProvider<P>| -> Result<Vec<String>, String> {
        p.list_payment_methods(&TestHost::list_payment_methods_request(&holder))
            .map(|l| l.methods.into_iter().map(|m| m.reference).collect())
            .map_err(|e| format!("list_payment_methods: {e}"))
    };
    match listed(&provider) {
        Ok(refs) if refs == [saved.reference.clone().unwrap_or_default()] => {}
        other => failures.push(format!(
            "after one save, exactly that method must be listed, got {other:?}"
        )),
    }
    match provider.delete_payment_method(&TestHost::delete_payment_method_request(&holder, &method))
    {
        Ok(r) if r.outcome == Outcome::Processed => {}
        other => failures.push(format!("delete_payment_method: {other:?}")),
    }
    match listed(&provider) {
        Ok(refs) if refs.is_empty() => {}
        other => failures.push(format!(
            "a deleted method must no longer be listed, got {other:?}"
        )),
    }
    match provider.delete_account_holder(&TestHost::delete_account_holder_request(&holder)) {
        Ok(r) if r.outcome == Outcome::Processed => {}
        other => failures.push(format!("delete_account_holder: {other:?}")),
    }
    match provider
        .retrieve_account_holder(&TestHost::retrieve_account_holder_request(&holder, None))
    {
        Ok(r) if r.status == HolderStatus::Deleted || r.status == HolderStatus::NotFound => {}
        other => failures.push(format!(
            "a deleted account holder must retrieve as deleted or not_found, got {other:?}"
        )),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}
