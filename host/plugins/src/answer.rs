//! What a call gave before it is read: the raw answer of the envelope or of a worker, and a
//! provider's error as it crosses. A leaf: the call path, the worker and the library loader all
//! speak it.

use payhost_provider_api::ProviderError;
use payhost_provider_api::envelope::RString;

/// A provider's answer as the call returned it, before it is decoded (in process or through a
/// worker).
#[derive(Debug, Clone)]
pub(crate) enum Undecoded {
    /// The answer's JSON.
    Ok(String),
    /// The provider's error JSON.
    Err(String),
    /// Nothing was sent: the worker is down.
    NotSent(String),
    /// Sent, and the worker died before answering.
    Lost(String),
    /// Sent, and the answer is larger than the host reads (its size).
    TooLarge(usize),
}

/// Reads a provider's error JSON; an unreadable one is an internal error quoting it.
pub(crate) fn read_error(json: &RString) -> ProviderError {
    read_error_str(json.as_str())
}

pub(crate) fn read_error_str(json: &str) -> ProviderError {
    serde_json::from_str(json).unwrap_or_else(|_| {
        ProviderError::internal(format!("the provider returned an unreadable error: {json}"))
    })
}
