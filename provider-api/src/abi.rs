//! The frozen envelope: the only types that cross the boundary as memory, and the only module of
//! payhost that names abi_stable.
//!
//! It is deliberately tiny: a root module with a manifest function and a
//! constructor, one provider object with `call(op, request_json)`, and one host object with the
//! same shape. Everything else is JSON defined in [`crate::protocol`], versioned by
//! [`crate::PROTOCOL_VERSION`]. abi_stable checks this layout at load; changing any type here is a
//! breaking change of provider-api's major version.

use std::sync::{Arc, Once};

use abi_stable::library::RootModule;
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RStr, RString};
use abi_stable::{StableAbi, declare_root_module_statics, package_version_strings};

use crate::dispatch::{self, Instance, InstanceConfig};
use crate::host::{
    ForwardingSubscriber, HostBackend, HostServices, parse_level_filter, report_panic,
};
use crate::protocol::ProviderError;
use crate::provider::PaymentProvider;

/// The name the root module is exported under (abi_stable's mangling of its loader symbol).
/// A test checks it against abi_stable's own constant.
#[doc(hidden)]
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// A provider instance, as the host holds it.
#[sabi_trait]
pub trait ProviderObject: Send + Sync {
    /// Serves one operation: `op` is a wire name ([`crate::Operation::as_str`] or `x.<name>`),
    /// `request` its JSON. `Ok` is the response JSON, `Err` a [`ProviderError`] as JSON.
    fn call(&self, op: RStr<'_>, request: RStr<'_>) -> RResult<RString, RString>;
}

/// The host's services, as a plugin holds them.
#[sabi_trait]
pub trait HostObject: Send + Sync {
    /// Serves one host service (see [`crate::host::ops`]): `Ok` is the answer JSON, `Err` a message.
    fn call(&self, op: RStr<'_>, request: RStr<'_>) -> RResult<RString, RString>;
}

/// An owned provider object.
pub type ProviderBox = ProviderObject_TO<'static, RBox<()>>;
/// An owned host-services object.
pub type HostBox = HostObject_TO<'static, RBox<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's [`crate::Manifest`] as JSON, or a [`ProviderError`] as JSON.
    pub manifest: extern "C" fn() -> RResult<RString, RString>,
    /// Builds an instance from an [`InstanceConfig`] JSON; `Err` is a [`ProviderError`] as JSON.
    #[sabi(last_prefix_field)]
    pub new_provider: extern "C" fn(RStr<'_>, HostBox) -> RResult<ProviderBox, RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "payhost_provider";
    const NAME: &'static str = "payhost provider plugin";
    const VERSION_STRINGS: abi_stable::sabi_types::VersionStrings = package_version_strings!();
}

/// Builds the root module for `P`; called by the code [`crate::export_provider!`] generates.
#[doc(hidden)]
pub fn root_module<P: PaymentProvider>() -> PluginModuleRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    PluginModule {
        manifest: manifest_shim::<P>,
        new_provider: new_provider_shim::<P>,
    }
    .leak_into_prefix()
}

extern "C" fn manifest_shim<P: PaymentProvider>() -> RResult<RString, RString> {
    // `dispatch::manifest` catches panics, and serialization cannot unwind.
    match dispatch::manifest::<P>() {
        Ok(m) => RResult::ROk(RString::from(
            serde_json::to_string(&m).unwrap_or_else(|_| "{}".into()),
        )),
        Err(e) => RResult::RErr(error_json(&e)),
    }
}

extern "C" fn new_provider_shim<P: PaymentProvider>(
    config: RStr<'_>,
    host: HostBox,
) -> RResult<ProviderBox, RString> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let config: InstanceConfig = serde_json::from_str(config.as_str()).map_err(|e| {
            ProviderError::invalid_request(format!("unreadable instance config: {e}"))
        })?;
        let backend: Arc<dyn HostBackend> = Arc::new(RemoteHost(host));
        install_forwarding(&HostServices::new(backend.clone()), &config.log_level);
        let instance = dispatch::instantiate::<P>(&config, backend)?;
        Ok::<_, ProviderError>(ProviderObject_TO::from_value(
            Exported(instance),
            sabi_trait::TD_Opaque,
        ))
    }));
    match result {
        Ok(Ok(object)) => RResult::ROk(object),
        Ok(Err(e)) => RResult::RErr(error_json(&e)),
        Err(payload) => RResult::RErr(error_json(&ProviderError::new(
            crate::ErrorKind::Panic,
            format!(
                "provider panicked while loading: {}",
                crate::host::panic_message(&*payload)
            ),
        ))),
    }
}

/// Once per library: forward `tracing` events and panic reports to the first host that
/// instantiates a provider here (each event goes to the host of the instance running on its thread).
fn install_forwarding(host: &HostServices, level: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = ForwardingSubscriber::new(host.clone(), parse_level_filter(level));
        let _ =
            tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(subscriber));
        let fallback = host.clone();
        std::panic::set_hook(Box::new(move |info| report_panic(&fallback, info)));
    });
}

struct Exported<P>(Instance<P>);

impl<P: PaymentProvider> ProviderObject for Exported<P> {
    fn call(&self, op: RStr<'_>, request: RStr<'_>) -> RResult<RString, RString> {
        match dispatch::dispatch(&self.0, op.as_str(), request.as_str()) {
            Ok(answer) => RResult::ROk(RString::from(answer)),
            Err(e) => RResult::RErr(error_json(&e)),
        }
    }
}

struct RemoteHost(HostBox);

impl HostBackend for RemoteHost {
    fn call(&self, op: &str, request: &str) -> Result<String, String> {
        self.0
            .call(RStr::from_str(op), RStr::from_str(request))
            .into_result()
            .map(RString::into_string)
            .map_err(RString::into_string)
    }
}

fn error_json(e: &ProviderError) -> RString {
    RString::from(
        serde_json::to_string(e).unwrap_or_else(|_| {
            r#"{"kind":"internal","message":"unserializable error"}"#.to_owned()
        }),
    )
}

/// Generates the exported root module of a provider plugin. Use it once, in the plugin crate
/// (`crate-type = ["cdylib"]`):
///
/// ```ignore
/// payhost_provider_api::export_provider!(MyProvider);
/// ```
#[macro_export]
macro_rules! export_provider {
    ($provider:ty) => {
        const _: () = {
            fn __payhost_root_module() -> $crate::__private::PluginModuleRef {
                $crate::__private::root_module::<$provider>()
            }

            extern "C" fn __payhost_erased_module() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(__payhost_root_module)
            }

            // The symbol abi_stable's loader looks up (`abi::ROOT_MODULE_SYMBOL`).
            #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
            static __PAYHOST_LIB_HEADER: $crate::__private::LibHeader =
                // SAFETY: the constructor builds a `PluginModuleRef`, the module type given here,
                // and the layout is checked by the host at load.
                unsafe {
                    $crate::__private::LibHeader::from_constructor::<
                        $crate::__private::PluginModuleRef,
                    >(
                        __payhost_erased_module,
                        $crate::__private::CheckTypeLayout::Yes,
                    )
                };
        };
    };
}

/// Why a library could not be opened as a payhost plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The file could not be loaded as a dynamic library at all (not a library, wrong
    /// architecture, missing dependency).
    NotALibrary(String),
    /// A dynamic library, but it exports no payhost root module.
    NotAPlugin(String),
    /// A payhost plugin whose envelope does not match this host's.
    Incompatible {
        /// The provider-api version the plugin was built with, as it declares it.
        plugin_version: String,
        /// The provider-api version of this host.
        host_version: String,
        /// abi_stable's report on what differs (can be long).
        report: String,
    },
    /// The plugin's root module failed or panicked while initializing.
    Init(String),
}

/// Opens the library at `path` and checks its envelope: the abi_stable header, the provider-api
/// major version, and the layout of every type in this module. The library stays loaded for
/// the life of the process (abi_stable never unloads), and opening the same path again returns
/// the code already loaded.
pub fn open_plugin(path: &std::path::Path) -> Result<PluginModuleRef, OpenError> {
    use abi_stable::library::{LibraryError, lib_header_from_path};
    let host_version = env!("CARGO_PKG_VERSION").to_owned();
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::OpenError { err, .. } => OpenError::NotALibrary(err.to_string()),
        LibraryError::GetSymbolError { .. } => OpenError::NotAPlugin(format!(
            "it exports no `{ROOT_MODULE_SYMBOL}` symbol (build it with export_provider!)"
        )),
        LibraryError::InvalidAbiHeader(h) => OpenError::Incompatible {
            plugin_version: "unknown".into(),
            host_version: host_version.clone(),
            report: format!("it was built with an incompatible abi_stable (its header: {h:?})"),
        },
        other => OpenError::NotAPlugin(other.to_string()),
    })?;
    let plugin_version = header.version_strings().to_string();
    header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| match e {
            LibraryError::RootModule { err, .. } => OpenError::Init(err.to_string()),
            other => OpenError::Incompatible {
                plugin_version,
                host_version,
                report: other.to_string(),
            },
        })
}

#[cfg(test)]
mod tests {
    use super::ROOT_MODULE_SYMBOL;

    #[test]
    fn the_exported_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
