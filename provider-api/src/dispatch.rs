//! Turns envelope calls (`op`, request JSON) into typed trait calls and back, catching panics.
//! The exported plugin and the test kit both go through here, so a vendor's tests exercise what
//! really crosses the boundary.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::host::{HostBackend, HostServices, panic_message, with_current};
use crate::manifest::{API_VERSION, Manifest};
use crate::protocol::{ErrorKind, Operation, PROTOCOL_VERSION, ProviderError};
use crate::provider::{PaymentProvider, ProviderContext};

/// Protocol versions this SDK can serve.
pub const SUPPORTED_PROTOCOLS: &[u32] = &[PROTOCOL_VERSION];

/// What the host sends to instantiate a provider (JSON over the envelope).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceConfig {
    /// The operator's id for this instance.
    pub instance_id: String,
    /// The negotiated protocol version.
    pub protocol: u32,
    /// The `[providers.<id>.options]` table, as JSON.
    #[serde(default)]
    pub options: Value,
    /// The config file's folder.
    #[serde(default)]
    pub config_dir: String,
    /// The most verbose level the host wants forwarded (`info`, `debug`, …).
    #[serde(default)]
    pub log_level: String,
}

/// A live provider with the host services it was given.
pub(crate) struct Instance<P> {
    provider: P,
    host: HostServices,
    /// The manifest declares `account_holders`: without it those operations answer
    /// `unsupported` before the request is read, whatever the provider implements.
    account_holders: bool,
}

/// The plugin's manifest with the SDK-owned fields made truthful.
pub(crate) fn manifest<P: PaymentProvider>() -> Result<Manifest, ProviderError> {
    let mut manifest = catch_unwind(P::manifest).map_err(panicked)?;
    manifest.api_version = API_VERSION.to_owned();
    manifest.protocols = SUPPORTED_PROTOCOLS.to_vec();
    Ok(manifest)
}

/// Builds an instance from the host's [`InstanceConfig`] JSON.
pub(crate) fn instantiate<P: PaymentProvider>(
    config: &InstanceConfig,
    backend: Arc<dyn HostBackend>,
) -> Result<Instance<P>, ProviderError> {
    if !SUPPORTED_PROTOCOLS.contains(&config.protocol) {
        return Err(ProviderError::invalid_request(format!(
            "protocol version {} is not served by this plugin (it serves {:?})",
            config.protocol, SUPPORTED_PROTOCOLS
        )));
    }
    let host = HostServices::new(backend);
    let options: P::Options =
        deserialize_at("options", config.options.clone()).map_err(|e| ProviderError {
            kind: ErrorKind::InvalidOptions,
            ..e
        })?;
    let ctx = ProviderContext {
        instance_id: config.instance_id.clone(),
        protocol: config.protocol,
        config_dir: PathBuf::from(&config.config_dir),
        host: host.clone(),
    };
    let provider = with_current(&host, || {
        catch_unwind(AssertUnwindSafe(|| P::new(options, ctx))).map_err(panicked)
    })??;
    let account_holders = manifest::<P>()?.account_holders;
    Ok(Instance {
        provider,
        host,
        account_holders,
    })
}

/// Serves one envelope call.
pub(crate) fn dispatch<P: PaymentProvider>(
    instance: &Instance<P>,
    op: &str,
    request: &str,
) -> Result<String, ProviderError> {
    with_current(&instance.host, || {
        catch_unwind(AssertUnwindSafe(|| {
            dispatch_unguarded(instance, op, request)
        }))
        .map_err(panicked)?
    })
}

fn dispatch_unguarded<P: PaymentProvider>(
    instance: &Instance<P>,
    op: &str,
    request: &str,
) -> Result<String, ProviderError> {
    let p = &instance.provider;
    if let Some(name) = op.strip_prefix("x.") {
        let payload: Value = parse_request(request)?;
        return to_json(&p.custom(name, payload)?);
    }
    let Some(operation) = Operation::from_wire(op) else {
        return Err(ProviderError::unsupported(op));
    };
    if !instance.account_holders && Operation::ACCOUNT_HOLDER.contains(&operation) {
        return Err(ProviderError::unsupported(op));
    }
    match operation {
        Operation::Initiate => to_json(&p.initiate(parse_request(request)?)?),
        Operation::Update => to_json(&p.update(parse_request(request)?)?),
        Operation::Authorize => to_json(&p.authorize(parse_request(request)?)?),
        Operation::Capture => to_json(&p.capture(parse_request(request)?)?),
        Operation::Refund => to_json(&p.refund(parse_request(request)?)?),
        Operation::Cancel => to_json(&p.cancel(parse_request(request)?)?),
        Operation::Delete => to_json(&p.delete(parse_request(request)?)?),
        Operation::Retrieve => to_json(&p.retrieve(parse_request(request)?)?),
        Operation::ParseWebhook => to_json(&p.parse_webhook(parse_request(request)?)?),
        Operation::CreateAccountHolder => {
            to_json(&p.create_account_holder(parse_request(request)?)?)
        }
        Operation::UpdateAccountHolder => {
            to_json(&p.update_account_holder(parse_request(request)?)?)
        }
        Operation::DeleteAccountHolder => {
            to_json(&p.delete_account_holder(parse_request(request)?)?)
        }
        Operation::RetrieveAccountHolder => {
            to_json(&p.retrieve_account_holder(parse_request(request)?)?)
        }
        Operation::ListPaymentMethods => to_json(&p.list_payment_methods(parse_request(request)?)?),
        Operation::SavePaymentMethod => to_json(&p.save_payment_method(parse_request(request)?)?),
        Operation::DeletePaymentMethod => {
            to_json(&p.delete_payment_method(parse_request(request)?)?)
        }
    }
}

fn parse_request<T: DeserializeOwned>(request: &str) -> Result<T, ProviderError> {
    let mut de = serde_json::Deserializer::from_str(request);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ProviderError::invalid_request(format!("request: {}", e.inner())).param(path)
    })?;
    Ok(value)
}

/// Deserializes `value`, naming the failing key's path under `root` (`options.api_key`).
pub(crate) fn deserialize_at<'de, T, D>(root: &str, value: D) -> Result<T, ProviderError>
where
    T: DeserializeOwned,
    D: Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." || path.is_empty() {
            root.to_owned()
        } else {
            format!("{root}.{path}")
        };
        ProviderError::invalid_options(format!("{param}: {}", e.inner())).param(param)
    })
}

fn to_json<T: Serialize>(value: &T) -> Result<String, ProviderError> {
    serde_json::to_string(value)
        .map_err(|e| ProviderError::internal(format!("could not serialize the response: {e}")))
}

fn panicked(payload: Box<dyn std::any::Any + Send>) -> ProviderError {
    ProviderError::new(
        ErrorKind::Panic,
        format!("provider panicked: {}", panic_message(&*payload)),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::testkit::TestHost;
    use crate::*;

    /// Implements `create_account_holder`, and declares account holders only when `DECLARED`.
    struct Holders<const DECLARED: bool>;

    impl<const DECLARED: bool> PaymentProvider for Holders<DECLARED> {
        type Options = Value;
        fn manifest() -> Manifest {
            let m = Manifest::new("holders", "Holders", "1.0.0");
            if DECLARED { m.account_holders() } else { m }
        }
        fn new(_: Value, _: ProviderContext) -> Result<Self, ProviderError> {
            Ok(Holders)
        }
        fn initiate(&self, _: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed())
        }
        fn authorize(&self, _: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed())
        }
        fn capture(&self, _: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed())
        }
        fn refund(&self, _: RefundRequest) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed())
        }
        fn cancel(&self, _: CancelRequest) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed())
        }
        fn retrieve(&self, _: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
            Ok(RetrieveResponse::attempt(None))
        }
        fn create_account_holder(
            &self,
            _: CreateAccountHolderRequest,
        ) -> Result<ProviderResponse, ProviderError> {
            Ok(ProviderResponse::processed().reference("cus_1"))
        }
    }

    #[test]
    fn an_undeclared_account_holder_operation_is_refused_even_when_implemented() {
        let host = TestHost::new();
        let request = TestHost::create_account_holder_request(
            "ach_1",
            TestHost::customer("cus_a", "a@example.com"),
        );
        let undeclared = host.instantiate::<Holders<false>>(json!({})).unwrap();
        let err = undeclared.create_account_holder(&request).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
        // Refused before the request is read: an empty one is `unsupported` too.
        let err = undeclared
            .call_raw("create_account_holder", "{}")
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
        let declared = host.instantiate::<Holders<true>>(json!({})).unwrap();
        let answer = declared.create_account_holder(&request).unwrap();
        assert_eq!(answer.reference.as_deref(), Some("cus_1"));
        // Declared, an operation left to its default still answers `unsupported`.
        let list =
            TestHost::list_payment_methods_request(&TestHost::account_holder("ach_1", &answer));
        assert_eq!(
            declared.list_payment_methods(&list).unwrap_err().kind,
            ErrorKind::Unsupported
        );
        check_conformance_undeclared();
    }

    fn check_conformance_undeclared() {
        crate::testkit::check_conformance::<Holders<false>>(&TestHost::new(), json!({})).unwrap();
    }
}
