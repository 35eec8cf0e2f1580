//! API keys: who a caller is, what it may do, and how fast.
//!
//! A key is a secret shown once, `phk_<key id>_<64 hex digits>` (244 random bits). The config
//! holds only its id, the SHA-256 of the whole secret and its scopes. A presented key is hashed
//! and compared with the digest in constant time; a key id that does not exist costs the same
//! work, so timing tells nothing.
//!
//! Invariants: a secret never appears in a log line, an error, `payhost check` or a metric
//! (errors say *what* was wrong with a header, never echo it); keys in a URL, path or query,
//! are refused; every route names its scope where it is registered
//! ([`crate::http::access`]), which the OpenAPI document declares too (a test walks it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use payhost_core::keys::*;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: RateLimit) -> Bucket {
        Bucket {
            limit,
            tokens: limit.burst,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.limit.rate;
        self.tokens = (self.tokens + refill).min(self.limit.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Limits are validated at load (`MIN_RATE`..`MAX_RATE`); a wait past any bound is
            // still an answer, never a panic.
            Err(
                Duration::try_from_secs_f64((1.0 - self.tokens) / self.limit.rate)
                    .unwrap_or(Duration::MAX)
                    .min(MAX_WAIT),
            )
        }
    }

    /// Whether it is full again (nothing to remember about its owner).
    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.duration_since(self.at).as_secs_f64() * self.limit.rate
            >= self.limit.burst
    }
}

/// The longest wait a refusal names.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A limiter per name (a key id, a provider id, a client address). It remembers at most
/// [`Limiter::MAX_NAMES`] names: past that, full buckets are forgotten (they hold nothing), and
/// if none is full the new name shares the fullest one's fate by being refused until one is.
#[derive(Debug, Default)]
pub struct Limiter(Mutex<HashMap<String, Bucket>>);

impl Limiter {
    /// How many names a limiter remembers.
    pub const MAX_NAMES: usize = 10_000;

    /// Takes a token from `name`'s bucket, or says how long to wait.
    pub fn take(&self, name: &str, limit: RateLimit) -> Result<(), Duration> {
        let mut buckets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(name) && buckets.len() >= Self::MAX_NAMES {
            let now = Instant::now();
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= Self::MAX_NAMES {
                return Err(Duration::from_secs(1));
            }
        }
        buckets
            .entry(name.to_owned())
            .or_insert_with(|| Bucket::new(limit))
            .take()
    }

    /// Whether `name`'s bucket has a token now, without taking it (else how long until it has).
    pub fn has_room(&self, name: &str) -> Result<(), Duration> {
        let buckets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get(name) {
            None => Ok(()),
            Some(bucket) => {
                let mut probe = *bucket;
                probe.take()
            }
        }
    }
}

/// Who made a request: a key that proved itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id: logged, stored with what the key did, and the namespace of its
    /// idempotency keys.
    pub key_id: String,
    scopes: Vec<Scope>,
}

impl Caller {
    /// Whether it holds `scope`.
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Why a request is refused. [`AuthError::code`] is stable; no message holds the secret.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("this route needs an API key: send `Authorization: Bearer phk_…`")]
    Missing,
    /// A header that is not `Bearer <key>` (what is wrong with it, never the header).
    #[error("the Authorization header is not usable: {0}")]
    Malformed(&'static str),
    /// No key with that id, or the secret does not match (revoked keys are gone from the
    /// config: the same answer).
    #[error("the API key is not valid (unknown, revoked, or mistyped)")]
    Unknown,
    /// A key in the URL's query: URLs end up in logs and caches.
    #[error(
        "API keys are never accepted in a URL (they end up in logs); send `Authorization: Bearer …`"
    )]
    InUrl,
    /// A valid key without the route's scope.
    #[error("this key lacks the `{}` scope this route needs", .0.as_str())]
    MissingScope(Scope),
    /// The key's rate is spent.
    #[error("rate limit of this key exceeded; retry after {} s", retry_after.as_secs().max(1))]
    RateLimited {
        /// When a request would be accepted again.
        retry_after: Duration,
    },
}

impl AuthError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "api_key_missing",
            AuthError::Malformed(_) => "authorization_malformed",
            AuthError::Unknown => "api_key_invalid",
            AuthError::InUrl => "api_key_in_url",
            AuthError::MissingScope(_) => "scope_missing",
            AuthError::RateLimited { .. } => "rate_limited",
        }
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct Keys {
    by_id: HashMap<String, KeySpec>,
    limiter: std::sync::Arc<Limiter>,
}

impl Keys {
    /// Keys from the config.
    pub fn new(specs: Vec<KeySpec>) -> Keys {
        Keys {
            by_id: specs.into_iter().map(|k| (k.id.clone(), k)).collect(),
            limiter: Default::default(),
        }
    }

    /// Keys from a reloaded config that keep these keys' rate buckets: a key whose rate did not
    /// change is not handed a fresh allowance by a reload.
    pub fn reloaded(&self, specs: Vec<KeySpec>) -> Keys {
        Keys {
            by_id: specs.into_iter().map(|k| (k.id.clone(), k)).collect(),
            limiter: self.limiter.clone(),
        }
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The caller an `Authorization` header proves, if any. Constant-time in the secret.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header)
            .map_err(|_| AuthError::Malformed("it is not visible ASCII"))?;
        let (scheme, secret) = header
            .split_once(' ')
            .ok_or(AuthError::Malformed("expected `Bearer <key>`"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed("the scheme must be `Bearer`"));
        }
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(AuthError::Malformed("the bearer token is empty"));
        }
        if secret.len() > 256 {
            return Err(AuthError::Malformed("the bearer token is too long"));
        }
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let id = key_id(secret).unwrap_or("");
        // Compare against a real digest whatever the id, so an unknown id costs the same.
        let (expected, spec) = match self.by_id.get(id) {
            Some(spec) => (spec.digest, Some(spec)),
            None => ([0u8; 32], None),
        };
        let differs = presented
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        match spec {
            Some(spec) if differs == 0 => Ok(Caller {
                key_id: spec.id.clone(),
                scopes: spec.scopes.clone(),
            }),
            _ => Err(AuthError::Unknown),
        }
    }

    /// Takes one request from the caller's rate, if its key has one.
    pub fn admit(&self, caller: &Caller) -> Result<(), AuthError> {
        match self.by_id.get(&caller.key_id).and_then(|k| k.rate) {
            None => Ok(()),
            Some(limit) => self
                .limiter
                .take(&caller.key_id, limit)
                .map_err(|retry_after| AuthError::RateLimited { retry_after }),
        }
    }
}

/// The key id inside a secret `phk_<id>_<random>`.
fn key_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(PREFIX)?;
    let (id, random) = rest.rsplit_once('_')?;
    (!id.is_empty() && !random.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::{AuthError, Duration, Keys, Limiter, MAX_WAIT};
    use payhost_core::keys::*;

    fn keys() -> (Keys, String) {
        let (secret, digest) = generate("shop");
        let keys = Keys::new(vec![KeySpec {
            id: "shop".into(),
            digest: parse_digest(&digest).unwrap(),
            scopes: vec![Scope::Payments, Scope::Read],
            rate: None,
        }]);
        (keys, secret)
    }

    #[test]
    fn a_generated_key_proves_its_id_and_nothing_else_does() {
        let (keys, secret) = keys();
        let caller = keys
            .authenticate(Some(format!("Bearer {secret}").as_bytes()))
            .unwrap();
        assert_eq!(caller.key_id, "shop");
        assert!(caller.may(Scope::Payments) && !caller.may(Scope::Operator));
        let mut wrong = secret.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        for header in [
            format!("Bearer {wrong}"),
            format!("Bearer phk_other_{}", &secret[9..]),
            "Bearer ".into(),
            "Basic abc".into(),
            secret.clone(),
        ] {
            let e = keys.authenticate(Some(header.as_bytes())).unwrap_err();
            assert!(!e.to_string().contains(&secret[9..]), "{e}");
        }
        assert_eq!(keys.authenticate(None), Err(AuthError::Missing));
    }

    #[test]
    fn keys_in_a_url_are_found_in_the_path_and_the_query() {
        assert!(query_holds_a_key("cart_id=1&api_key=x"));
        assert!(query_holds_a_key("q=phk_a_b"));
        assert!(query_holds_a_key("q=%70hk%5Fa_b"));
        assert!(!query_holds_a_key("cart_id=cart_1"));
        assert!(path_holds_a_key("/v1/payment-sessions/phk_shop_0123"));
        assert!(path_holds_a_key("/v1/payment-sessions/PHK%5Fshop_0123"));
        assert!(!path_holds_a_key("/v1/payment-sessions/ps_0123"));
    }

    #[test]
    fn a_rate_refills_and_says_when() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            rate: 10.0,
            burst: 2.0,
        };
        assert!(limiter.take("k", limit).is_ok());
        assert!(limiter.take("k", limit).is_ok());
        let wait = limiter.take("k", limit).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(limiter.take("other", limit).is_ok(), "buckets are per name");
        // Once the wait it named has passed, the bucket has refilled: a token is there again,
        // and only one (the burst is not back yet).
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(limiter.take("k", limit).is_ok(), "refilled after {wait:?}");
        assert!(
            limiter.take("k", limit).is_err(),
            "one token, not the burst"
        );
    }

    #[test]
    fn a_limit_out_of_bounds_is_refused_and_never_panics() {
        for (rate, burst) in [
            (1e-300, 2.0),
            (0.0, 1.0),
            (f64::NAN, 1.0),
            (1.0, 0.5),
            (1e9, 2.0),
        ] {
            assert!(
                RateLimit { rate, burst }.invalid().is_some(),
                "{rate} {burst}"
            );
        }
        assert!(
            RateLimit {
                rate: 0.001,
                burst: 1.0
            }
            .invalid()
            .is_none()
        );
        // Even an unchecked one answers with a bounded wait.
        let limiter = Limiter::default();
        let slow = RateLimit {
            rate: 1e-300,
            burst: 1.0,
        };
        assert!(limiter.take("k", slow).is_ok());
        assert_eq!(limiter.take("k", slow).unwrap_err(), MAX_WAIT);
    }

    #[test]
    fn a_limiter_forgets_full_buckets_rather_than_grow() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            rate: 1000.0,
            burst: 1.0,
        };
        for i in 0..Limiter::MAX_NAMES + 100 {
            let _ = limiter.take(&format!("client-{i}"), limit);
        }
        let remembered = limiter.0.lock().unwrap().len();
        assert!(remembered <= Limiter::MAX_NAMES, "{remembered}");
    }
}
