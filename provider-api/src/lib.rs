//! # payhost provider API
//!
//! The one crate a payment-provider vendor depends on. Implement [`PaymentProvider`], write
//! [`export_provider!`] once, build the crate as a `cdylib`, and payhost can load it:
//!
//! ```
//! use payhost_provider_api::*;
//!
//! /// Approves everything; keeps nothing.
//! pub struct Approve;
//!
//! impl PaymentProvider for Approve {
//!     type Options = serde_json::Value;
//!     fn manifest() -> Manifest {
//!         Manifest::new("approve", "Approve", "1.0.0")
//!     }
//!     fn new(_options: serde_json::Value, _ctx: ProviderContext) -> Result<Self, ProviderError> {
//!         Ok(Approve)
//!     }
//!     fn initiate(&self, _: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
//!         Ok(ProviderResponse::processed())
//!     }
//!     fn authorize(&self, _: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
//!         Ok(ProviderResponse::processed())
//!     }
//!     fn capture(&self, _: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
//!         Ok(ProviderResponse::processed())
//!     }
//!     fn refund(&self, _: RefundRequest) -> Result<ProviderResponse, ProviderError> {
//!         Ok(ProviderResponse::processed())
//!     }
//!     fn cancel(&self, _: CancelRequest) -> Result<ProviderResponse, ProviderError> {
//!         Ok(ProviderResponse::processed())
//!     }
//!     fn retrieve(&self, _: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
//!         Ok(RetrieveResponse {
//!             status: RemoteStatus::NotFound,
//!             amount_authorized: None,
//!             amount_captured: None,
//!             amount_refunded: None,
//!             attempt: Some(Outcome::NotAttempted { reason: "keeps no records".into() }),
//!             data: None,
//!         })
//!     }
//! }
//!
//! export_provider!(Approve);
//! ```
//!
//! What crosses the boundary is a frozen, layout-checked envelope carrying JSON (see
//! docs/vendors.md, "What stays stable"): a plugin built against any earlier 1.x provider-api loads in every later 1.x
//! host, and a newer plugin loads in an older host as long as they share a protocol version.
//! Panics inside a provider are caught at the boundary and reported as errors of kind
//! [`ErrorKind::Panic`]; plugins must be built with `panic = "unwind"` (the default).
//!
//! Vendors write no `unsafe` and never name abi_stable: the only `unsafe` is in the generated
//! export and in the private `abi` module.

#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

// abi_stable's derive macros expand to `impl`s the lint flags.
#[allow(unsafe_code, non_local_definitions)]
mod abi;
mod dispatch;
mod holders;
mod host;
mod manifest;
mod protocol;
mod provider;
pub mod testkit;

pub use dispatch::{InstanceConfig, SUPPORTED_PROTOCOLS};
pub use holders::*;
pub use host::{HostServices, HttpFailure, HttpRequest, HttpResponse, LogRecord, ops as host_ops};
pub use manifest::{API_VERSION, Capabilities, Manifest};
pub use protocol::*;
pub use provider::{NoOptions, PaymentProvider, ProviderContext};

/// The envelope types the host needs to load plugins. Not for vendors: a provider never needs
/// them, and using them directly gives up the SDK's panic guard and version negotiation.
pub mod envelope {
    pub use crate::abi::{
        HostBox, HostObject, HostObject_TO, OpenError, PluginModule, PluginModuleRef, ProviderBox,
        ProviderObject, ProviderObject_TO, ROOT_MODULE_SYMBOL, open_plugin,
    };
    pub use abi_stable::sabi_trait::TD_Opaque;
    pub use abi_stable::std_types::{RBox, RResult, RStr, RString};
}

/// What [`export_provider!`] expands to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::abi::{PluginModuleRef, root_module};
    pub use abi_stable::library::{
        __call_root_module_loader as call_root_module_loader, CheckTypeLayout, LibHeader,
        RootModuleResult,
    };
}
