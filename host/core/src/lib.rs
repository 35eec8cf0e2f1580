//! # payhost-core
//!
//! What every layer of payhost shares, and nothing else: the payment domain with its one
//! transition table ([`domain`]), the event vocabulary and its signature ([`events`]), the
//! [`store::Store`] trait and the writes it applies as data ([`store::WriteOp`]), the host's
//! [`clock::Clock`], the process's [`metrics`], and API keys as the config describes them
//! ([`keys`]).
//!
//! Architecture invariants: this crate knows no SQL, no HTTP, no plugin loading and no TOML;
//! only [`domain::transitions`] decides a status; it depends on no other payhost crate but the
//! vendor contract (`payhost-provider-api`), for the operations' names.

#![forbid(unsafe_code)]

pub mod clock;
pub mod domain;
pub mod events;
pub mod keys;
pub mod metrics;
pub mod store;

pub use clock::{Clock, SystemClock};
