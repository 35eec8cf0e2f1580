//! The sandbox provider: a deterministic card-processor simulator for tests, demos and vendors.
//!
//! What it does on a call is chosen by the request (see README.md beside this file):
//! - a test card number in the caller's `input.card_number` (kept only as its last four digits
//!   and kind), or
//! - `sandbox` switches in the caller's `input` (kept in the sandbox's data for later calls) or
//!   the cart's `context`: `{"authorize": "declined"}`,
//!   `{"capture": {"outcome": "unknown", "delay_ms": 200}}`, `{"delay_ms": 50}` for every call.
//!
//! Outcomes: `processed`, `declined`, `requires_more` (then processed on the next authorize),
//! `pending` (then a webhook from `x.settle`), `not_attempted` (nothing recorded), `unknown` (done,
//! but the answer is lost), `panic`, and `error` (a retryable processor error).
//!
//! It keeps a ledger of every effect, keyed by idempotency key, in `<state_dir>/<id>.ledger.jsonl`:
//! a repeated key replays the first answer, and after a crash `retrieve` tells the truth. Its
//! webhooks are signed like Stripe's: `sandbox-signature: t=<unix s>,v1=<hex HMAC-SHA256 of
//! "t.body">` with the configured `webhook_secret`.

#![forbid(unsafe_code)]

pub mod ledger;

use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use payhost_provider_api::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use ledger::{Entry, Ledger, Locked};

/// The signature header of sandbox webhooks.
pub const SIGNATURE_HEADER: &str = "sandbox-signature";

/// Test cards, Stripe-like. Any other number is processed.
pub mod cards {
    /// Authorizes.
    pub const OK: &str = "4242424242424242";
    /// Declined: `card_declined`.
    pub const DECLINED: &str = "4000000000000002";
    /// Declined: `insufficient_funds`.
    pub const INSUFFICIENT_FUNDS: &str = "4000000000009995";
    /// 3-D Secure: requires_more, then authorized on the next authorize.
    pub const THREE_DS: &str = "4000002500003155";
    /// Asynchronous: pending until `x.settle`.
    pub const PENDING: &str = "4000000000000051";
    /// Authorized at the processor, but the answer is lost: unknown.
    pub const UNKNOWN: &str = "4000000000000119";
    /// Never reaches the processor: not_attempted.
    pub const NOT_ATTEMPTED: &str = "4000000000000101";
}

/// `[providers.<id>.options]` of the sandbox.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxOptions {
    /// Folder of the ledger (relative to the config's folder).
    pub state_dir: PathBuf,
    /// Secret that signs and verifies webhooks.
    pub webhook_secret: String,
    /// fsync every ledger line (survives power loss, not just a crash). Default false.
    #[serde(default)]
    pub fsync: bool,
    /// How old a webhook's timestamp may be, in seconds. Default 300.
    #[serde(default = "default_tolerance")]
    pub webhook_tolerance_s: i64,
}

fn default_tolerance() -> i64 {
    300
}

/// The sandbox provider.
pub struct SandboxProvider {
    ledger: Ledger,
    secret: String,
    tolerance_s: i64,
    host: HostServices,
}

/// What a call was told to do.
#[derive(Debug, Clone, PartialEq, Default)]
struct Behaviour {
    outcome: Option<String>,
    /// The outcome was set by a `sandbox` switch (which wins over a saved card's kind).
    switched: bool,
    delay_ms: u64,
    /// After acting: a processor that did it, but whose answer is slow.
    delay_after_ms: u64,
}

/// What a test card does on authorize (`ok` for any other number).
fn card_kind(number: &str) -> &'static str {
    match number {
        cards::DECLINED => "declined",
        cards::INSUFFICIENT_FUNDS => "insufficient_funds",
        cards::THREE_DS => "three_ds",
        cards::PENDING => "pending",
        cards::UNKNOWN => "unknown",
        cards::NOT_ATTEMPTED => "not_attempted",
        _ => "ok",
    }
}

/// The authorize outcome of a kind of test card.
fn card_outcome(kind: &str) -> Option<&'static str> {
    match kind {
        "declined" | "insufficient_funds" => Some("declined"),
        "three_ds" => Some("requires_more"),
        "pending" => Some("pending"),
        "unknown" => Some("unknown"),
        "not_attempted" => Some("not_attempted"),
        _ => None,
    }
}

/// The card a call is about: a number in the caller's transient `input` (never kept), else the
/// card kept in the sandbox's own data (its last four digits and its test kind).
fn card_of(input: &Value, data: &Value) -> Option<String> {
    input
        .get("card_number")
        .and_then(Value::as_str)
        .map(|n| card_kind(n).to_owned())
        .or_else(|| {
            data.pointer("/card/kind")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
}

/// What the sandbox keeps of a card: never the number.
fn kept_card(number: &str) -> Value {
    let last4: String = number
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    json!({"last4": last4, "kind": card_kind(number)})
}

fn behaviour(op: Operation, input: &Value, data: &Value, context: &Value) -> Behaviour {
    let mut b = Behaviour::default();
    if op == Operation::Authorize
        && let Some(outcome) = card_of(input, data).as_deref().and_then(card_outcome)
    {
        b.outcome = Some(outcome.into());
    }
    b.switched = sandbox_switch(op, [context, data, input]);
    // Later sources win: the cart's context, the sandbox's data, the caller's input.
    for source in [context, data, input] {
        let Some(sandbox) = source.get("sandbox") else {
            continue;
        };
        if let Some(ms) = sandbox.get("delay_ms").and_then(Value::as_u64) {
            b.delay_ms = ms;
        }
        match sandbox.get(op.as_str()) {
            Some(Value::String(outcome)) => b.outcome = Some(outcome.clone()),
            Some(spec @ Value::Object(_)) => {
                if let Some(outcome) = spec.get("outcome").and_then(Value::as_str) {
                    b.outcome = Some(outcome.into());
                }
                if let Some(ms) = spec.get("delay_ms").and_then(Value::as_u64) {
                    b.delay_ms = ms;
                }
                if let Some(ms) = spec.get("delay_after_ms").and_then(Value::as_u64) {
                    b.delay_after_ms = ms;
                }
            }
            _ => {}
        }
    }
    b.delay_ms = b.delay_ms.min(600_000);
    b.delay_after_ms = b.delay_after_ms.min(600_000);
    b
}

/// Whether any of `sources` has a `sandbox` switch naming an outcome for `op`.
fn sandbox_switch(op: Operation, sources: [&Value; 3]) -> bool {
    sources.iter().any(|source| {
        source
            .get("sandbox")
            .and_then(|s| s.get(op.as_str()))
            .is_some_and(|spec| spec.is_string() || spec.get("outcome").is_some())
    })
}

/// The data the sandbox keeps after a call with this input: its test switches and the card's
/// kind, so later calls (captures, refunds) still see them. `None`: nothing changed.
fn kept_data(input: &Value, data: &Value) -> Option<Value> {
    let switches = input.get("sandbox");
    let card = input.get("card_number").and_then(Value::as_str);
    if switches.is_none() && card.is_none() {
        return None;
    }
    let mut kept = match data {
        Value::Object(map) => map.clone(),
        _ => Default::default(),
    };
    if let Some(switches) = switches {
        kept.insert("sandbox".into(), switches.clone());
    }
    if let Some(number) = card {
        kept.insert("card".into(), kept_card(number));
    }
    Some(Value::Object(kept))
}

/// The parts of a request every operation needs.
struct Call<'a> {
    op: Operation,
    key: &'a str,
    session_id: &'a str,
    amount: i64,
    currency_code: &'a str,
    data: &'a Value,
    input: &'a Value,
    context: &'a Value,
    /// Account holder operations: the sandbox's id of the customer, once it exists.
    holder: Option<&'a str>,
    /// The sandbox's id of the payment method a call deletes, or a charge uses.
    method: Option<&'a str>,
    /// A charge of a saved method: the customer's and the method's sandbox ids.
    saved: Option<(&'a str, &'a str)>,
}

impl<'a> Call<'a> {
    /// An account holder operation's call (no session, no amount).
    fn holder(op: Operation, key: &'a str, holder_id: &'a str, input: &'a Value) -> Self {
        Call {
            op,
            key,
            session_id: holder_id,
            amount: 0,
            currency_code: "",
            data: &Value::Null,
            input,
            context: &Value::Null,
            holder: None,
            method: None,
            saved: None,
        }
    }
}

impl SandboxProvider {
    /// Runs one money-moving or state-changing call: replay, delay, behaviour, checks, record.
    fn run(
        &self,
        call: Call<'_>,
        effect: impl FnOnce(&Locked<'_>) -> Result<ProviderResponse, ProviderError>,
    ) -> Result<ProviderResponse, ProviderError> {
        if call.amount <= 0
            && call.op != Operation::Delete
            && call.op != Operation::Cancel
            && !Operation::ACCOUNT_HOLDER.contains(&call.op)
        {
            return Err(ProviderError::invalid_request(format!(
                "amount must be positive, got {}",
                call.amount
            ))
            .param("amount"));
        }
        let b = behaviour(call.op, call.input, call.data, call.context);
        if b.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(b.delay_ms));
        }
        let outcome = b.outcome.as_deref().unwrap_or("processed");
        match outcome {
            "panic" => panic!("sandbox: panic requested for {}", call.op),
            "error" => {
                return Err(ProviderError::new(
                    ErrorKind::Processor,
                    "sandbox: processor error requested",
                )
                .code("processing_error")
                .retryable(true));
            }
            "not_attempted" => {
                return Ok(ProviderResponse::with_outcome(Outcome::NotAttempted {
                    reason: "sandbox: the processor was not reached".into(),
                }));
            }
            _ => {}
        }
        let (response, lost) = self.ledger.with(|ledger| {
            if let Some(first) = ledger.get(call.key) {
                if first.op != call.op.as_str()
                    || first.amount != call.amount
                    || first.session_id != call.session_id
                    || first.method.as_deref() != call.method
                {
                    return Err(ProviderError::invalid_request(format!(
                        "idempotency key `{}` was first used for {} of {} on {}",
                        call.key, first.op, first.amount, first.session_id
                    ))
                    .code("idempotency_key_reused"));
                }
                return Ok((first.response.clone(), false));
            }
            // A saved method is charged as the card it was saved with, if it is still
            // attached to that customer; a detached one is declined.
            let mut outcome = outcome;
            let mut card = card_of(call.input, call.data);
            if let Some((holder, method)) = call.saved {
                let attached = ledger.holder(holder).and_then(|h| {
                    h.methods
                        .into_iter()
                        .find(|(id, _)| id == method)
                        .map(|(_, kept)| kept)
                });
                match attached {
                    None => {
                        outcome = "declined";
                        card = Some("detached".into());
                    }
                    Some(kept) => {
                        card = kept.pointer("/card/kind").and_then(Value::as_str).map(str::to_owned);
                        if !b.switched
                            && let Some(o) = card.as_deref().and_then(card_outcome)
                        {
                            outcome = o;
                        }
                    }
                }
                if outcome == "not_attempted" {
                    return Ok((
                        ProviderResponse::with_outcome(Outcome::NotAttempted {
                            reason: "sandbox: the processor was not reached".into(),
                        }),
                        false,
                    ));
                }
            }
            let response = match outcome {
                "declined" => ProviderResponse::with_outcome(Outcome::Declined {
                    code: Some(
                        match card.as_deref() {
                            Some("insufficient_funds") => "insufficient_funds",
                            Some("detached") => "payment_method_unavailable",
                            _ => "card_declined",
                        }
                        .into(),
                    ),
                    message: if card.as_deref() == Some("detached") {
                        "sandbox: the payment method is not attached to this customer".into()
                    } else {
                        "sandbox: declined".into()
                    },
                }),
                "requires_more"
                    if ledger.session(call.session_id).status != "requires_more" =>
                {
                    ProviderResponse::with_outcome(Outcome::RequiresMore {
                        next_action: json!({
                            "type": "redirect",
                            "url": format!("https://sandbox.payhost.invalid/3ds/{}", call.session_id),
                        }),
                    })
                }
                "pending" => ProviderResponse::with_outcome(Outcome::Pending),
                _ => effect(ledger)?,
            }
            .reference(format!("sbx_{}", call.key));
            ledger.record(Entry {
                key: call.key.to_owned(),
                op: call.op.as_str().to_owned(),
                session_id: call.session_id.to_owned(),
                holder: call.holder.map(str::to_owned),
                method: call.method.map(str::to_owned),
                amount: call.amount,
                currency_code: call.currency_code.to_owned(),
                response: response.clone(),
                at_unix_ms: self.host.now_unix_ms(),
            })?;
            Ok((response, outcome == "unknown"))
        })?;
        if b.delay_after_ms > 0 {
            std::thread::sleep(Duration::from_millis(b.delay_after_ms));
        }
        if lost {
            return Ok(ProviderResponse::with_outcome(Outcome::Unknown {
                reason: "sandbox: the answer was lost (the effect happened)".into(),
            }));
        }
        Ok(response)
    }

    fn sign(&self, body: &str, timestamp_s: i64) -> String {
        sign(&self.secret, body, timestamp_s)
    }
}

/// Signs a webhook body: the value of the `sandbox-signature` header.
pub fn sign(secret: &str, body: &str, timestamp_s: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{timestamp_s}.{body}").as_bytes());
    format!(
        "t={timestamp_s},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// A webhook as the sandbox would send it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedWebhook {
    /// The raw body.
    pub body: String,
    /// Headers to send with it.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EventBody {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    session_id: String,
    amount: Option<i64>,
    currency_code: Option<String>,
    created: i64,
}

fn action_of(kind: &str) -> WebhookAction {
    match kind {
        "payment.authorized" => WebhookAction::Authorized,
        "payment.captured" => WebhookAction::Captured,
        "payment.failed" => WebhookAction::Failed,
        "payment.canceled" => WebhookAction::Canceled,
        "payment.requires_more" => WebhookAction::RequiresMore,
        "payment.pending" => WebhookAction::Pending,
        _ => WebhookAction::NotSupported,
    }
}

impl PaymentProvider for SandboxProvider {
    type Options = SandboxOptions;

    fn manifest() -> Manifest {
        Manifest::new("sandbox", "Sandbox", env!("CARGO_PKG_VERSION"))
            .description("Deterministic card-processor simulator with a ledger and signed webhooks")
            .capabilities(Capabilities {
                partial_capture: true,
                multiple_captures: true,
                partial_refund: true,
                update_amount: true,
                async_authorization: true,
                webhooks: true,
            })
            .account_holders()
            // The ledger check and the record happen under one lock: a repeated key, even one
            // sent while the first call is still running, gets the first call's answer.
            .replays_idempotency_keys(&[Operation::Capture, Operation::Refund, Operation::Cancel])
    }

    fn new(options: SandboxOptions, ctx: ProviderContext) -> Result<Self, ProviderError> {
        if options.webhook_secret.len() < 8 {
            return Err(ProviderError::invalid_options(
                "webhook_secret must be at least 8 characters",
            )
            .param("options.webhook_secret"));
        }
        if options.webhook_tolerance_s <= 0 {
            return Err(
                ProviderError::invalid_options("webhook_tolerance_s must be positive")
                    .param("options.webhook_tolerance_s"),
            );
        }
        let dir = ctx.resolve_path(&options.state_dir);
        let ledger =
            Ledger::open(&dir, &ctx.instance_id, options.fsync).map_err(|e| ProviderError {
                param: Some("options.state_dir".into()),
                ..e
            })?;
        tracing::info!(ledger = %ledger.path().display(), "sandbox ready");
        Ok(SandboxProvider {
            ledger,
            secret: options.webhook_secret,
            tolerance_s: options.webhook_tolerance_s,
            host: ctx.host,
        })
    }

    fn initiate(&self, r: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        // Keep the test switches and the card's kind (never its number) for later calls.
        let data = kept_data(&r.input, &r.data).unwrap_or_else(|| json!({}));
        let call = Call {
            op: Operation::Initiate,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &r.input,
            context: &r.context,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |_| Ok(ProviderResponse::processed().data(data)))
    }

    fn update(&self, r: UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        let kept = kept_data(&r.input, &r.data);
        let call = Call {
            op: Operation::Update,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &r.input,
            context: &r.context,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |l| match l.session(&r.session_id).status {
            "authorized" | "canceled" | "deleted" => Err(ProviderError::new(
                ErrorKind::Conflict,
                "sandbox: an authorized, canceled or deleted payment cannot be updated",
            )
            .code("payment_not_updatable")),
            _ => Ok(match kept {
                Some(data) => ProviderResponse::processed().data(data),
                None => ProviderResponse::processed(),
            }),
        })
    }

    fn authorize(&self, r: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        let kept = kept_data(&r.input, &r.data);
        let saved = match (&r.payment_method, &r.account_holder) {
            (None, _) => None,
            (Some(method), Some(holder)) => Some((
                holder.reference.as_deref().ok_or_else(|| {
                    ProviderError::invalid_request("the account holder has no sandbox id")
                        .param("account_holder.reference")
                })?,
                method.reference.as_deref().ok_or_else(|| {
                    ProviderError::invalid_request("the payment method has no sandbox id")
                        .param("payment_method.reference")
                })?,
            )),
            (Some(_), None) => {
                return Err(ProviderError::invalid_request(
                    "a saved payment method is charged with its account holder",
                )
                .param("account_holder"));
            }
        };
        let call = Call {
            op: Operation::Authorize,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &r.input,
            context: &r.context,
            holder: None,
            method: saved.map(|(_, m)| m),
            saved,
        };
        let answer = self.run(call, |l| match l.session(&r.session_id).status {
            "canceled" | "deleted" | "declined" => Err(ProviderError::new(
                ErrorKind::Conflict,
                "sandbox: the payment was canceled, deleted or declined",
            )
            .code("payment_closed")),
            "pending" => Ok(ProviderResponse::with_outcome(Outcome::Pending)),
            _ => Ok(ProviderResponse::processed()),
        })?;
        Ok(match kept {
            Some(data) if answer.data.is_none() => answer.data(data),
            _ => answer,
        })
    }

    fn capture(&self, r: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        let call = Call {
            op: Operation::Capture,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &Value::Null,
            context: &Value::Null,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |l| {
            let s = l.session(&r.session_id);
            if s.status != "authorized" {
                return Err(ProviderError::new(
                    ErrorKind::Conflict,
                    format!("sandbox: cannot capture a payment that is {}", or_unknown(s.status)),
                )
                .code("payment_not_capturable"));
            }
            if s.captured + r.amount > s.authorized {
                return Err(ProviderError::new(
                    ErrorKind::Conflict,
                    format!(
                        "sandbox: capturing {} would exceed the authorized {} ({} already captured)",
                        r.amount, s.authorized, s.captured
                    ),
                )
                .code("amount_too_large"));
            }
            Ok(ProviderResponse::processed())
        })
    }

    fn refund(&self, r: RefundRequest) -> Result<ProviderResponse, ProviderError> {
        let call = Call {
            op: Operation::Refund,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &Value::Null,
            context: &Value::Null,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |l| {
            let s = l.session(&r.session_id);
            if s.refunded + r.amount > s.captured {
                return Err(ProviderError::new(
                    ErrorKind::Conflict,
                    format!(
                        "sandbox: refunding {} would exceed the captured {} ({} already refunded)",
                        r.amount, s.captured, s.refunded
                    ),
                )
                .code("amount_too_large"));
            }
            Ok(ProviderResponse::processed())
        })
    }

    fn cancel(&self, r: CancelRequest) -> Result<ProviderResponse, ProviderError> {
        let call = Call {
            op: Operation::Cancel,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &Value::Null,
            context: &Value::Null,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |l| {
            let s = l.session(&r.session_id);
            if s.captured > 0 {
                return Err(ProviderError::new(
                    ErrorKind::Conflict,
                    "sandbox: a payment with captures cannot be canceled; refund it",
                )
                .code("payment_captured"));
            }
            Ok(ProviderResponse::processed())
        })
    }

    fn delete(&self, r: DeleteRequest) -> Result<ProviderResponse, ProviderError> {
        let call = Call {
            op: Operation::Delete,
            key: &r.idempotency_key,
            session_id: &r.session_id,
            amount: r.amount,
            currency_code: &r.currency_code,
            data: &r.data,
            input: &Value::Null,
            context: &Value::Null,
            holder: None,
            method: None,
            saved: None,
        };
        self.run(call, |_| Ok(ProviderResponse::processed()))
    }

    fn create_account_holder(
        &self,
        r: CreateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        if r.customer.id.is_empty() {
            return Err(
                ProviderError::invalid_request("a customer needs an id").param("customer.id")
            );
        }
        let call = Call::holder(
            Operation::CreateAccountHolder,
            &r.idempotency_key,
            &r.account_holder_id,
            &r.input,
        );
        let data = json!({"customer_id": r.customer.id, "email": r.customer.email});
        self.run(call, |_| Ok(ProviderResponse::processed().data(data)))
    }

    fn update_account_holder(
        &self,
        r: UpdateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let holder = sandbox_id(&r.account_holder)?;
        let mut call = Call::holder(
            Operation::UpdateAccountHolder,
            &r.idempotency_key,
            &r.account_holder.id,
            &r.input,
        );
        call.holder = Some(holder);
        let data = json!({"customer_id": r.customer.id, "email": r.customer.email});
        self.run(call, |l| {
            live_holder(l, holder)?;
            Ok(ProviderResponse::processed().data(data))
        })
    }

    fn delete_account_holder(
        &self,
        r: DeleteAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let holder = sandbox_id(&r.account_holder)?;
        let mut call = Call::holder(
            Operation::DeleteAccountHolder,
            &r.idempotency_key,
            &r.account_holder.id,
            &Value::Null,
        );
        call.holder = Some(holder);
        self.run(call, |l| {
            live_holder(l, holder)?;
            Ok(ProviderResponse::processed())
        })
    }

    fn retrieve_account_holder(
        &self,
        r: RetrieveAccountHolderRequest,
    ) -> Result<RetrieveAccountHolderResponse, ProviderError> {
        self.ledger.with(|l| {
            let asked = r
                .attempt
                .as_ref()
                .map(|a| l.get(&a.idempotency_key).cloned());
            // The customer: the host's id for it, else the one the asked-about create made.
            let reference = r.account_holder.reference.clone().or_else(|| {
                asked.iter().flatten().find_map(|e| {
                    (e.op == "create_account_holder").then(|| e.response.reference.clone())?
                })
            });
            let status = match reference.as_deref().and_then(|h| l.holder(h)) {
                None => HolderStatus::NotFound,
                Some(h) if h.deleted => HolderStatus::Deleted,
                Some(_) => HolderStatus::Active,
            };
            let (attempt, attempt_reference, data) = match asked {
                None => (None, None, None),
                Some(None) => (
                    Some(Outcome::NotAttempted {
                        reason: "sandbox: no call with that idempotency key reached the processor"
                            .into(),
                    }),
                    None,
                    None,
                ),
                Some(Some(e)) => (
                    Some(e.response.outcome.clone()),
                    e.response.reference.clone(),
                    e.response.data.clone(),
                ),
            };
            Ok(RetrieveAccountHolderResponse {
                status,
                reference,
                attempt,
                attempt_reference,
                data,
            })
        })
    }

    fn list_payment_methods(
        &self,
        r: ListPaymentMethodsRequest,
    ) -> Result<PaymentMethodList, ProviderError> {
        let holder = sandbox_id(&r.account_holder)?;
        self.ledger.with(|l| {
            let h = live_holder(l, holder)?;
            Ok(PaymentMethodList {
                methods: h
                    .methods
                    .into_iter()
                    .map(|(reference, data)| SavedMethod { reference, data })
                    .collect(),
            })
        })
    }

    fn save_payment_method(
        &self,
        r: SavePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let holder = sandbox_id(&r.account_holder)?;
        let Some(number) = r.input.get("card_number").and_then(Value::as_str) else {
            return Err(ProviderError::invalid_request(
                "the sandbox saves a card given as input.card_number",
            )
            .param("input.card_number"));
        };
        let kept = json!({"card": kept_card(number)});
        let mut call = Call::holder(
            Operation::SavePaymentMethod,
            &r.idempotency_key,
            &r.account_holder.id,
            &r.input,
        );
        call.holder = Some(holder);
        self.run(call, |l| {
            live_holder(l, holder)?;
            Ok(ProviderResponse::processed().data(kept))
        })
    }

    fn delete_payment_method(
        &self,
        r: DeletePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let holder = sandbox_id(&r.account_holder)?;
        let method = r.payment_method.reference.as_deref().ok_or_else(|| {
            ProviderError::invalid_request("the payment method has no sandbox id")
                .param("payment_method.reference")
        })?;
        let mut call = Call::holder(
            Operation::DeletePaymentMethod,
            &r.idempotency_key,
            &r.account_holder.id,
            &Value::Null,
        );
        call.holder = Some(holder);
        call.method = Some(method);
        self.run(call, |l| {
            let h = live_holder(l, holder)?;
            if !h.methods.iter().any(|(id, _)| id == method) {
                return Err(ProviderError::new(
                    ErrorKind::NotFound,
                    format!("sandbox: payment method {method} is not attached to {holder}"),
                )
                .code("payment_method_not_attached"));
            }
            Ok(ProviderResponse::processed())
        })
    }

    fn retrieve(&self, r: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        // `"sandbox": {"retrieve": {"delay_ms": N}}`: a slow status lookup.
        let b = behaviour(Operation::Retrieve, &Value::Null, &r.data, &Value::Null);
        if b.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(b.delay_ms));
        }
        self.ledger.with(|l| {
            let s = l.session(&r.session_id);
            let status = match s.status {
                "" => RemoteStatus::NotFound,
                "initiated" | "pending" => RemoteStatus::Pending,
                "requires_more" => RemoteStatus::RequiresMore,
                "authorized" if s.captured > 0 => RemoteStatus::Captured,
                "authorized" => RemoteStatus::Authorized,
                "declined" => RemoteStatus::Error,
                _ => RemoteStatus::Canceled,
            };
            let attempt = r.attempt.as_ref().map(|a| match l.get(&a.idempotency_key) {
                Some(e) => e.response.outcome.clone(),
                None => Outcome::NotAttempted {
                    reason: "sandbox: no call with that idempotency key reached the processor"
                        .into(),
                },
            });
            let known = !s.status.is_empty();
            Ok(RetrieveResponse {
                status,
                amount_authorized: known.then_some(s.authorized),
                amount_captured: known.then_some(s.captured),
                amount_refunded: known.then_some(s.refunded),
                attempt,
                data: None,
            })
        })
    }

    fn parse_webhook(&self, r: WebhookRequest) -> Result<WebhookEvent, ProviderError> {
        let bad = |m: &str| {
            ProviderError::new(ErrorKind::InvalidSignature, format!("sandbox webhook: {m}"))
        };
        let header = r
            .header(SIGNATURE_HEADER)
            .ok_or_else(|| bad("no sandbox-signature header"))?;
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
        let now_s = r.received_at_unix_ms / 1000;
        if (now_s - timestamp).abs() > self.tolerance_s {
            return Err(bad(&format!(
                "the timestamp is {} s away from now (tolerance {} s)",
                (now_s - timestamp).abs(),
                self.tolerance_s
            )));
        }
        let verified = signatures.iter().any(|sig| {
            let Ok(sig) = hex::decode(sig) else {
                return false;
            };
            let mut mac =
                Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()).expect("HMAC takes any key");
            mac.update(format!("{timestamp}.{}", r.body).as_bytes());
            mac.verify_slice(&sig).is_ok()
        });
        if !verified {
            return Err(bad("the signature does not match"));
        }
        let event: EventBody = serde_json::from_str(&r.body).map_err(|e| {
            ProviderError::invalid_request(format!("sandbox webhook body is not an event: {e}"))
        })?;
        Ok(WebhookEvent {
            action: action_of(&event.kind),
            event_id: event.id,
            session_id: Some(event.session_id),
            reference: None,
            amount: event.amount,
            currency_code: event.currency_code,
            data: None,
        })
    }

    fn custom(&self, name: &str, payload: Value) -> Result<Value, ProviderError> {
        #[derive(Deserialize)]
        struct Settle {
            session_id: String,
            #[serde(default = "authorized")]
            outcome: String,
        }
        fn authorized() -> String {
            "authorized".into()
        }
        #[derive(Deserialize)]
        struct Webhook {
            session_id: String,
            #[serde(rename = "type")]
            kind: String,
            amount: Option<i64>,
            currency_code: Option<String>,
            timestamp_s: Option<i64>,
        }
        match name {
            // Completes a pending authorization at the "processor" and returns the signed
            // webhook it sends.
            "settle" => {
                let s: Settle = serde_json::from_value(payload)
                    .map_err(|e| ProviderError::invalid_request(format!("x.settle: {e}")))?;
                let event_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
                let (amount, currency) = self.ledger.with(|l| {
                    let state = l.session(&s.session_id);
                    if state.status != "pending" {
                        return Err(ProviderError::new(
                            ErrorKind::Conflict,
                            format!(
                                "x.settle: session {} is {}, not pending",
                                s.session_id,
                                or_unknown(state.status)
                            ),
                        ));
                    }
                    let pending = l
                        .entries_of(&s.session_id)
                        .into_iter()
                        .filter(|e| e.op == "authorize" && e.response.outcome == Outcome::Pending)
                        .max_by_key(|e| e.at_unix_ms)
                        .ok_or_else(|| ProviderError::internal("pending without an authorize"))?;
                    let outcome = match s.outcome.as_str() {
                        "authorized" => Outcome::Processed,
                        "failed" => Outcome::Declined {
                            code: Some("card_declined".into()),
                            message: "sandbox: declined after review".into(),
                        },
                        other => {
                            return Err(ProviderError::invalid_request(format!(
                                "x.settle: outcome must be `authorized` or `failed`, got `{other}`"
                            )));
                        }
                    };
                    l.record(Entry {
                        key: event_id.clone(),
                        op: "settle".into(),
                        session_id: s.session_id.clone(),
                        holder: None,
                        method: None,
                        amount: pending.amount,
                        currency_code: pending.currency_code.clone(),
                        response: ProviderResponse::with_outcome(outcome),
                        at_unix_ms: self.host.now_unix_ms(),
                    })?;
                    Ok((pending.amount, pending.currency_code))
                })?;
                let kind = if s.outcome == "authorized" {
                    "payment.authorized"
                } else {
                    "payment.failed"
                };
                Ok(self.webhook(
                    &event_id,
                    kind,
                    &s.session_id,
                    Some(amount),
                    Some(currency),
                    None,
                ))
            }
            // Signs an arbitrary event, changing nothing (for duplicate and ordering tests).
            "webhook" => {
                let w: Webhook = serde_json::from_value(payload)
                    .map_err(|e| ProviderError::invalid_request(format!("x.webhook: {e}")))?;
                let event_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
                Ok(self.webhook(
                    &event_id,
                    &w.kind,
                    &w.session_id,
                    w.amount,
                    w.currency_code,
                    w.timestamp_s,
                ))
            }
            // Sends an HTTP request through the host's HTTP service and reports what came back:
            // a diagnostic, and how the host service is tested across the boundary.
            "http" => {
                let request: HttpRequest = serde_json::from_value(payload)
                    .map_err(|e| ProviderError::invalid_request(format!("x.http: {e}")))?;
                Ok(match self.host.http(&request) {
                    Ok(response) => json!({ "ok": response }),
                    Err(failure) => json!({ "error": failure }),
                })
            }
            // The ledger's entries for one session, for tests that compare books.
            "ledger" => {
                let session_id = payload
                    .get("session_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ProviderError::invalid_request("x.ledger needs session_id"))?
                    .to_owned();
                self.ledger.with(|l| {
                    let mut entries = l.entries_of(&session_id);
                    entries.sort_by_key(|e| e.at_unix_ms);
                    serde_json::to_value(entries)
                        .map_err(|e| ProviderError::internal(e.to_string()))
                })
            }
            other => Err(ProviderError::unsupported(&format!("x.{other}"))),
        }
    }
}

impl SandboxProvider {
    fn webhook(
        &self,
        event_id: &str,
        kind: &str,
        session_id: &str,
        amount: Option<i64>,
        currency_code: Option<String>,
        timestamp_s: Option<i64>,
    ) -> Value {
        let created = timestamp_s.unwrap_or_else(|| self.host.now_unix_ms() / 1000);
        let body = serde_json::to_string(&EventBody {
            id: event_id.to_owned(),
            kind: kind.to_owned(),
            session_id: session_id.to_owned(),
            amount,
            currency_code,
            created,
        })
        .unwrap_or_default();
        let signature = self.sign(&body, created);
        json!(SignedWebhook {
            body,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (SIGNATURE_HEADER.into(), signature),
            ],
        })
    }
}

/// The sandbox's id of an account holder (from its create's answer).
fn sandbox_id(holder: &AccountHolderRef) -> Result<&str, ProviderError> {
    holder.reference.as_deref().ok_or_else(|| {
        ProviderError::invalid_request("the account holder has no sandbox id")
            .param("account_holder.reference")
    })
}

/// The customer, refused when the sandbox never made it or it was deleted.
fn live_holder(l: &Locked<'_>, holder: &str) -> Result<ledger::HolderState, ProviderError> {
    match l.holder(holder) {
        None => Err(ProviderError::new(
            ErrorKind::NotFound,
            format!("sandbox: no customer {holder}"),
        )
        .code("customer_not_found")),
        Some(h) if h.deleted => Err(ProviderError::new(
            ErrorKind::Conflict,
            format!("sandbox: customer {holder} was deleted"),
        )
        .code("customer_deleted")),
        Some(h) => Ok(h),
    }
}

fn or_unknown(status: &str) -> &str {
    if status.is_empty() {
        "unknown to the sandbox"
    } else {
        status
    }
}

export_provider!(SandboxProvider);
