//! # payhost
//!
//! The payment-session host as a library: read a [`Config`], load its provider plugins with a
//! [`Loader`], and call them through [`Provider`] — off the async runtime, under a deadline and a
//! concurrency limit, with unknown outcomes kept apart from failures.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = payhost::Config::from_file("config/payhost.toml")?;
//! let report = payhost::Loader::new(&config).load_all(&config);
//! for failure in &report.failures {
//!     eprintln!("{}: {}", failure.id, failure.error);
//! }
//! let system = report.providers.get("system").expect("configured");
//! let answer = system
//!     .call(payhost_provider_api::AuthorizeRequest {
//!         session_id: "ps_1".into(),
//!         idempotency_key: "ps_1:authorize:1".into(),
//!         amount: 1500,
//!         currency_code: "eur".into(),
//!         context: serde_json::Value::Null,
//!         data: serde_json::Value::Null,
//!         input: serde_json::Value::Null,
//!         account_holder: None,
//!         payment_method: None,
//!         deadline_unix_ms: None,
//!     })
//!     .await?;
//! println!("{:?}", answer.outcome);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod auth;
pub mod engine;
pub mod http;
pub mod reload;
pub mod serve;

pub use payhost_config as config;
pub use payhost_core::{domain, metrics};
pub use payhost_plugins as plugins;
pub use payhost_plugins::{call_pool, provider, worker};

/// Events: the vocabulary and signature (`payhost-core`), the endpoints' settings (the config),
/// and the outbox that writes and delivers them ([`engine`]).
pub mod events {
    pub use payhost_config::events::{
        Endpoint, EventSettings, clear_text_on_a_network, redact_endpoint_url,
    };
    pub use payhost_core::events::*;
}

/// Storage: the trait and its writes (`payhost-core`) and the two drivers.
pub mod store {
    pub use payhost_core::store::*;
    pub use payhost_store_postgres as postgres;
    pub use payhost_store_sqlite as sqlite;
}

pub use config::{Config, ConfigError, ConfigErrorKind, LibrarySource, ProviderSettings};
/// The README's examples (a provider, an embedder), compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;

pub use engine::{EngineError, Host};
pub use plugins::{Inspection, LoadError, LoadFailure, LoadReport, Loader, Providers};
pub use provider::{CallError, Clock, LibraryInfo, Provider, SystemClock};
