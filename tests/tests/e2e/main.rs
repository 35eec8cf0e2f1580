//! payhost's end-to-end tests, one binary: each module is a scenario file that ran as a test
//! binary of its own before (each relinked the whole crate graph). nextest still runs every test
//! in its own process.

mod auth;
mod calls;
mod cli;
mod compat;
mod crash;
mod edge;
mod engine;
mod events;
mod failover;
mod holders;
mod http;
mod isolation;
mod leases;
mod multihost;
mod outage;
mod outbound;
mod properties;
mod reload;
mod sandbox;
mod stripe;
mod unknown;
mod vendor;
