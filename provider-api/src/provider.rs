//! The safe trait a vendor implements.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::holders::{
    CreateAccountHolderRequest, DeleteAccountHolderRequest, DeletePaymentMethodRequest,
    ListPaymentMethodsRequest, PaymentMethodList, RetrieveAccountHolderRequest,
    RetrieveAccountHolderResponse, SavePaymentMethodRequest, UpdateAccountHolderRequest,
};
use crate::host::HostServices;
use crate::manifest::Manifest;
use crate::protocol::{
    AuthorizeRequest, CancelRequest, CaptureRequest, DeleteRequest, InitiateRequest, ProviderError,
    ProviderResponse, RefundRequest, RetrieveRequest, RetrieveResponse, UpdateRequest,
    WebhookEvent, WebhookRequest,
};

/// What the host hands a provider when it instantiates it.
#[derive(Clone)]
pub struct ProviderContext {
    /// The id the operator gave this instance in the config (`[providers.<id>]`). One library can
    /// serve several ids with different options.
    pub instance_id: String,
    /// The protocol version the host and the plugin agreed on.
    pub protocol: u32,
    /// The folder of the operator's config file, to resolve relative paths in options against.
    pub config_dir: PathBuf,
    /// Logging, clock and whatever later hosts add.
    pub host: HostServices,
}

impl ProviderContext {
    /// Resolves a path from the options against the config file's folder.
    pub fn resolve_path(&self, path: impl Into<PathBuf>) -> PathBuf {
        let path = path.into();
        if path.is_absolute() {
            path
        } else {
            self.config_dir.join(path)
        }
    }
}

/// A payment provider. Implement it, then export the type with [`crate::export_provider!`].
///
/// Every method is called on a blocking thread of the host, possibly from several threads at
/// once (so `&self` and `Sync`), under the deadline in the request. A panic is caught at the
/// boundary and reported as an error of kind `panic`; it never crashes the host, but the host
/// treats the call's outcome as unknown, so do not panic on purpose.
///
/// Idempotency: every request carries the host's `idempotency_key`. Pass it to the processor (or
/// keep a ledger) so that the same key never acts twice: after a timeout or a crash the host calls
/// again with the same key, or asks [`PaymentProvider::retrieve`] what became of it.
pub trait PaymentProvider: Sized + Send + Sync + 'static {
    /// The provider's `[providers.<id>.options]` table. Deserialized by the SDK; a table that does
    /// not fit is refused at load time with serde's message and the key's path. Add
    /// `#[serde(deny_unknown_fields)]` to refuse unknown keys.
    type Options: DeserializeOwned;

    /// Describes the provider. Called without an instance, for `payhost inspect`.
    fn manifest() -> Manifest;

    /// Builds an instance from its options. Check the options here: an `Err` refuses the load
    /// and the operator sees its message.
    fn new(options: Self::Options, ctx: ProviderContext) -> Result<Self, ProviderError>;

    /// Starts a payment with the processor.
    fn initiate(&self, request: InitiateRequest) -> Result<ProviderResponse, ProviderError>;

    /// Changes an initiated payment. Providers without `update_amount` may leave the default,
    /// and the host recreates the payment instead.
    fn update(&self, request: UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("update"))
    }

    /// Authorizes the payment.
    fn authorize(&self, request: AuthorizeRequest) -> Result<ProviderResponse, ProviderError>;

    /// Captures money from an authorized payment.
    fn capture(&self, request: CaptureRequest) -> Result<ProviderResponse, ProviderError>;

    /// Refunds captured money.
    fn refund(&self, request: RefundRequest) -> Result<ProviderResponse, ProviderError>;

    /// Cancels an authorization.
    fn cancel(&self, request: CancelRequest) -> Result<ProviderResponse, ProviderError>;

    /// Forgets a session that was never authorized. The default does nothing and succeeds.
    fn delete(&self, request: DeleteRequest) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Ok(ProviderResponse::processed())
    }

    /// Tells the truth about a payment and, when asked, about one earlier attempt. This is how
    /// the host settles outcomes left unknown by a timeout or a crash.
    ///
    /// The contract, for `attempt` (what became of the call with that idempotency key):
    /// - `processed`, `declined`, `requires_more`: what the processor did with it — only when
    ///   you read that from the processor.
    /// - `pending`: the processor is still working on it (the host asks again later).
    /// - `not_attempted`: the processor has no record of that key *now*. The host takes this
    ///   as "it did not happen" only once the call can no longer land: it has returned (or its
    ///   process died) and its deadline plus the host's landing margin has passed. Before
    ///   that it stays unknown, so answer what the processor says, never what you expect.
    /// - `unknown`: you could not find out (the processor did not answer, the lookup was
    ///   incomplete). Never answer `not_attempted` for "I could not look".
    ///
    /// A processor that replays a repeated idempotency key can say so in
    /// [`crate::Manifest::replays_idempotency_keys`]; the host may then send an unknown capture,
    /// refund or cancel again with its key instead of waiting for the horizon.
    fn retrieve(&self, request: RetrieveRequest) -> Result<RetrieveResponse, ProviderError>;

    /// Verifies a webhook and translates it. Must fail with
    /// [`crate::ErrorKind::InvalidSignature`] when the signature does not verify.
    fn parse_webhook(&self, request: WebhookRequest) -> Result<WebhookEvent, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("parse_webhook"))
    }

    /// Creates the customer's record at the processor; answer its id as the response's
    /// `reference`. Since 1.4, with the six below: implement them all and declare
    /// [`crate::Manifest::account_holders`]; the defaults answer `unsupported`.
    fn create_account_holder(
        &self,
        request: CreateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("create_account_holder"))
    }

    /// Changes the customer's record at the processor.
    fn update_account_holder(
        &self,
        request: UpdateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("update_account_holder"))
    }

    /// Deletes the customer's record, detaching every method saved to it.
    fn delete_account_holder(
        &self,
        request: DeleteAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("delete_account_holder"))
    }

    /// Tells the truth about an account holder and, when asked, about one earlier account
    /// holder or payment method call: the contract of [`PaymentProvider::retrieve`].
    fn retrieve_account_holder(
        &self,
        request: RetrieveAccountHolderRequest,
    ) -> Result<RetrieveAccountHolderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("retrieve_account_holder"))
    }

    /// Lists the methods saved to an account holder at the processor.
    fn list_payment_methods(
        &self,
        request: ListPaymentMethodsRequest,
    ) -> Result<PaymentMethodList, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("list_payment_methods"))
    }

    /// Saves (attaches) a payment method to an account holder; answer its id as `reference`.
    fn save_payment_method(
        &self,
        request: SavePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("save_payment_method"))
    }

    /// Deletes (detaches) a saved payment method.
    fn delete_payment_method(
        &self,
        request: DeletePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let _ = request;
        Err(ProviderError::unsupported("delete_payment_method"))
    }

    /// Provider-specific operations outside the payment lifecycle (diagnostics, test helpers),
    /// named `x.<name>` on the wire. The default supports none.
    fn custom(&self, name: &str, payload: Value) -> Result<Value, ProviderError> {
        let _ = payload;
        Err(ProviderError::unsupported(&format!("x.{name}")))
    }
}

/// Options for a provider that takes none: any key is refused at load, naming it, so an
/// operator's typo is caught.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}
