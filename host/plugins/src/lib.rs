//! # payhost-plugins
//!
//! The plugin runtime: find a provider library, check and pin it, load it once
//! ([`library`]), instantiate its provider with the host services it may use ([`host_side`]),
//! in this process or in a supervised worker ([`worker`]), and call it ([`Provider`]) off the
//! async runtime, under a deadline and a concurrency limit, with unknown outcomes kept apart
//! from failures.
//!
//! Architecture invariants: this crate knows no SQL, no HTTP server and no engine; it never
//! decides a status (a provider's answer is an input the engine applies); every bound a plugin
//! can make the host spend is its own (stderr, frames, answers, host requests); `unsafe` lives
//! only behind provider-api's envelope, not here.

#![forbid(unsafe_code)]

mod answer;
pub mod call_pool;
pub mod host_side;
pub mod library;
pub mod loader;
mod outbound;
pub mod provider;
pub mod worker;

use payhost_config as config;
use payhost_core::keys as auth;
use payhost_core::metrics;

pub use host_side::SECRET_REDACTED;
pub use library::LoadError;
pub use loader::{Inspection, LoadFailure, LoadReport, Loader, Providers};
pub use provider::{
    Answer, CallError, LateAnswer, LibraryInfo, MAX_ANSWER_BYTES, MAX_DATA_BYTES, Provider,
};
pub use worker::WorkerHealth;
