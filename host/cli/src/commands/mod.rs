//! One file per command.

pub(crate) mod attempts;
pub(crate) mod check;
pub(crate) mod events;
pub(crate) mod hosts;
pub(crate) mod inspect;
pub(crate) mod keys;
pub(crate) mod provider;
pub(crate) mod reload;
pub(crate) mod serve;
