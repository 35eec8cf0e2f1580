//! `[[api_keys]]`: each key's id, the digest of its secret, its scopes and its rate.

use serde::Deserialize;
use toml::Spanned;

use payhost_core::keys as auth;

use crate::{Check, ConfigError};

/// One `[[api_keys]]` table: a key's id, the digest of its secret (from `payhost keys new`) and
/// what it may do. The secret itself is never in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    id: String,
    digest: String,
    scopes: Vec<String>,
    rate_per_second: Option<f64>,
    burst: Option<f64>,
}

/// Validates `[[api_keys]]`.
pub(crate) fn validate(
    raw: Vec<Spanned<RawKey>>,
    check: &Check<'_>,
) -> Result<Vec<auth::KeySpec>, ConfigError> {
    let mut api_keys: Vec<auth::KeySpec> = Vec::new();
    for (i, spanned) in raw.into_iter().enumerate() {
        let span = spanned.span();
        let k = spanned.into_inner();
        let at = |field: &str| format!("api_keys[{i}].{field}");
        if !auth::valid_key_id(&k.id) {
            return Err(check.invalid(
                Some(span),
                at("id"),
                format!("key id `{}` must be 1 to 64 of a-z, 0-9, `-` and `_`", k.id),
            ));
        }
        if api_keys.iter().any(|other| other.id == k.id) {
            return Err(check.invalid(
                Some(span),
                at("id"),
                format!("two keys have the id `{}`", k.id),
            ));
        }
        let digest = auth::parse_digest(&k.digest).ok_or_else(|| {
                check.invalid(
                    Some(span.clone()),
                    at("digest"),
                    "`digest` must be `sha256:` and 64 hex digits, as `payhost keys new` prints it (never the key itself)".into(),
                )
            })?;
        let mut scopes = Vec::new();
        for name in &k.scopes {
            let scope = auth::Scope::parse(name).ok_or_else(|| {
                check.invalid(
                    Some(span.clone()),
                    at("scopes"),
                    format!("unknown scope `{name}`: the scopes are read, payments and operator"),
                )
            })?;
            scopes.push(scope);
        }
        if scopes.is_empty() {
            return Err(check.invalid(
                Some(span),
                at("scopes"),
                "a key needs at least one scope (read, payments, operator)".into(),
            ));
        }
        let rate = match (k.rate_per_second, k.burst) {
            (None, None) => None,
            (rate, burst) => {
                let rate = rate.unwrap_or(10.0);
                let burst = burst.unwrap_or(rate.max(1.0) * 2.0);
                let limit = auth::RateLimit { rate, burst };
                if let Some(why) = limit.invalid() {
                    return Err(check.invalid(
                        Some(span),
                        at("rate_per_second"),
                        format!("`rate_per_second` / `burst`: {why}"),
                    ));
                }
                Some(limit)
            }
        };
        api_keys.push(auth::KeySpec {
            id: k.id,
            digest,
            scopes,
            rate,
        });
    }
    Ok(api_keys)
}
