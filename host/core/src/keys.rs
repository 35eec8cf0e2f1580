//! API keys as the config describes them: scopes, rate limits, the key spec (its id, the
//! digest of its secret, its scopes) and the rules of the secret's form. Checking a presented
//! key is the HTTP layer's (`payhost::auth`); this is what the config and it share.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every `GET` of collections, sessions and payments.
    Read,
    /// Collections, sessions, authorize, capture, refund, cancel.
    Payments,
    /// Attempts and their resolution, providers, readiness and metrics.
    Operator,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Payments, Scope::Operator];

    /// The name in configs, errors and the OpenAPI document.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Payments => "payments",
            Scope::Operator => "operator",
        }
    }

    /// The scope with this name.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub rate: f64,
    /// Requests at once.
    pub burst: f64,
}

/// The slowest rate a limit may have: one request per 1,000 seconds.
pub const MIN_RATE: f64 = 0.001;
/// The fastest rate, and the largest burst, a limit may have.
pub const MAX_RATE: f64 = 1_000_000.0;
impl RateLimit {
    /// Why this limit cannot be used, if it cannot: the rate between [`MIN_RATE`] and
    /// [`MAX_RATE`] per second, the burst between 1 and [`MAX_RATE`].
    pub fn invalid(&self) -> Option<String> {
        if !(self.rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&self.rate)) {
            return Some(format!(
                "a rate must be between {MIN_RATE} and {MAX_RATE} per second, got {}",
                self.rate
            ));
        }
        if !(self.burst.is_finite() && (1.0..=MAX_RATE).contains(&self.burst)) {
            return Some(format!(
                "a burst must be between 1 and {MAX_RATE}, got {}",
                self.burst
            ));
        }
        None
    }
}

/// One configured key.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// Its id (`[a-z0-9_-]`, at most 64).
    pub id: String,
    /// SHA-256 of the whole secret.
    pub digest: [u8; 32],
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// How fast (none: unlimited).
    pub rate: Option<RateLimit>,
}

/// The secret's prefix.
pub const PREFIX: &str = "phk_";

/// Whether `id` is a valid key id.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A new key: (the secret, shown once; its digest as the config writes it, `sha256:<hex>`).
pub fn generate(id: &str) -> (String, String) {
    let random = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let secret = format!("{PREFIX}{id}_{random}");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())));
    (secret, digest)
}

/// Reads a config digest `sha256:<64 hex>`.
pub fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    let bytes = hex::decode(hex_part).ok()?;
    bytes.try_into().ok()
}

/// Whether a URL query carries something that looks like a key.
pub fn query_holds_a_key(query: &str) -> bool {
    let query = percent_decoded(query);
    query.contains(PREFIX)
        || query.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
            matches!(
                name.as_str(),
                "api_key" | "apikey" | "key" | "token" | "access_token"
            )
        })
}

/// Whether a URL path carries something that looks like a key (`/v1/payments/phk_…`).
pub fn path_holds_a_key(path: &str) -> bool {
    percent_decoded(path).contains(PREFIX)
}

/// `text` with its `%XX` escapes decoded (lossily: this only looks for a prefix).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}
