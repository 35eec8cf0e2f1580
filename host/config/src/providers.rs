//! `[providers.<id>]`: each provider's library, limits, isolation and options.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use payhost_core::keys as auth;

use crate::{Check, ConfigError, toml_to_json};

/// Where a provider's library is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibrarySource {
    /// `library = "name"`: `<plugin dir>/<prefix>name<suffix>` (`libname.so` on Linux).
    Name(String),
    /// `path = "…"`, resolved against the config's folder.
    Path(PathBuf),
}

/// One `[providers.<id>]` table, validated.
#[derive(Clone, PartialEq)]
pub struct ProviderSettings {
    /// The operator's id for this provider (`[providers.<id>]`); `[a-z0-9_-]+`.
    pub id: String,
    /// Where its library is.
    pub library: LibrarySource,
    /// `enabled = false` keeps the table but loads nothing.
    pub enabled: bool,
    /// Expected SHA-256 of the library file, lower-case hex.
    pub sha256: Option<String>,
    /// Deadline of one provider call.
    pub timeout: Duration,
    /// How many calls to this provider may run at once.
    pub max_concurrency: usize,
    /// `resend_unknown = false`: the reconciler never sends an unknown call again with its
    /// idempotency key, even when the provider says its processor replays keys (for a test
    /// double that ignores them); it only asks `retrieve`.
    pub resend_unknown: bool,
    /// Where the provider's code runs.
    pub isolation: Isolation,
    /// `isolation = "process"`: the worker's address-space limit, in MiB (kernel-enforced).
    pub max_memory_mb: Option<u64>,
    /// `isolation = "process"`: a call this far past its deadline kills its worker.
    pub kill_after: Duration,
    /// How fast `/hooks/<id>` takes webhooks (default 100/s, bursts of 200), so a flood of
    /// forged ones cannot starve the API.
    pub webhook_rate: auth::RateLimit,
    /// The largest HTTP response body the host reads for this provider (default 1 MiB); a
    /// larger one is an `unknown` failure.
    pub http_max_response_bytes: usize,
    /// `[providers.<id>.options]` as JSON, handed to the provider. May hold secrets: never log it.
    pub options: serde_json::Value,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("id", &self.id)
            .field("library", &self.library)
            .field("enabled", &self.enabled)
            .field("sha256", &self.sha256)
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("isolation", &self.isolation)
            .field("options", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The default of `http_max_response_bytes`.
pub const DEFAULT_HTTP_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Where a provider's code runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In the host's process: the fastest, for first-party providers.
    #[default]
    InProcess,
    /// In a supervised worker process: a crash costs only its own calls.
    Process,
}

/// The default webhook intake rate of a provider.
pub const DEFAULT_WEBHOOK_RATE: auth::RateLimit = auth::RateLimit {
    rate: 100.0,
    burst: 200.0,
};
/// The longest deadline a provider call may have.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// The default deadline of a provider call.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The default number of concurrent calls per provider.
pub const DEFAULT_MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    library: Option<Spanned<String>>,
    path: Option<Spanned<PathBuf>>,
    #[serde(default = "yes")]
    enabled: bool,
    sha256: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    max_concurrency: Option<Spanned<u64>>,
    #[serde(default = "yes")]
    resend_unknown: bool,
    webhook_rate_per_second: Option<Spanned<f64>>,
    webhook_burst: Option<Spanned<f64>>,
    #[serde(default)]
    isolation: Isolation,
    max_memory_mb: Option<Spanned<u64>>,
    kill_after_ms: Option<Spanned<u64>>,
    http_max_response_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    options: toml::Table,
}

fn yes() -> bool {
    true
}

/// Validates every `[providers.<id>]` table, in id order.
pub(crate) fn validate(
    raw: BTreeMap<String, Spanned<RawProvider>>,
    dir: &Path,
    check: &Check<'_>,
) -> Result<Vec<ProviderSettings>, ConfigError> {
    let mut providers = Vec::new();
    for (id, spanned) in raw {
        let table_span = spanned.span();
        let p = spanned.into_inner();
        let key = |k: &str| format!("providers.{id}.{k}");
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(check.invalid(
                Some(table_span),
                format!("providers.{id}"),
                format!(
                    "provider id `{id}` must use only a-z, 0-9, `_` and `-` (it appears in URLs)"
                ),
            ));
        }
        let library = match (p.library, p.path) {
            (Some(name), None) => {
                let span = name.span();
                let name = name.into_inner();
                if name.is_empty() || name.contains(['/', '\\']) {
                    return Err(check.invalid(
                            Some(span),
                            key("library"),
                            format!(
                                "`library` is a bare library name like \"payhost_provider_system\"; got \"{name}\" (use `path` for a file)"
                            ),
                        ));
                }
                LibrarySource::Name(name)
            }
            (None, Some(file)) => LibrarySource::Path(dir.join(file.into_inner())),
            (Some(_), Some(file)) => {
                return Err(check.invalid(
                    Some(file.span()),
                    key("path"),
                    "give either `library` or `path`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(check.invalid(
                    Some(table_span),
                    format!("providers.{id}"),
                    format!("provider `{id}` needs `library = \"<name>\"` or `path = \"<file>\"`"),
                ));
            }
        };
        let sha256 = match p.sha256 {
            None => None,
            Some(pin) => {
                let span = pin.span();
                let pin = pin.into_inner().to_ascii_lowercase();
                if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(check.invalid(
                            Some(span),
                            key("sha256"),
                            "`sha256` must be 64 hex digits (see `payhost check` for a library's digest)".into(),
                        ));
                }
                Some(pin)
            }
        };
        let timeout_ms = match p.timeout_ms {
            None => DEFAULT_TIMEOUT_MS,
            Some(t) if (1..=MAX_TIMEOUT_MS).contains(t.get_ref()) => t.into_inner(),
            Some(t) => {
                return Err(check.invalid(
                    Some(t.span()),
                    key("timeout_ms"),
                    format!(
                        "`timeout_ms` must be between 1 and 600000, got {}",
                        t.get_ref()
                    ),
                ));
            }
        };
        let max_concurrency = match p.max_concurrency {
            None => DEFAULT_MAX_CONCURRENCY,
            Some(n) if (1..=10_000).contains(n.get_ref()) => n.into_inner() as usize,
            Some(n) => {
                return Err(check.invalid(
                    Some(n.span()),
                    key("max_concurrency"),
                    format!(
                        "`max_concurrency` must be between 1 and 10000, got {}",
                        n.get_ref()
                    ),
                ));
            }
        };
        let mut webhook_rate = DEFAULT_WEBHOOK_RATE;
        for (name, value, slot) in [
            (
                "webhook_rate_per_second",
                &p.webhook_rate_per_second,
                &mut webhook_rate.rate,
            ),
            ("webhook_burst", &p.webhook_burst, &mut webhook_rate.burst),
        ] {
            if let Some(v) = value {
                if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) {
                    return Err(check.invalid(
                        Some(v.span()),
                        key(name),
                        format!("`{name}` must be a positive number"),
                    ));
                }
                *slot = *v.get_ref();
            }
        }
        if let Some(why) = webhook_rate.invalid() {
            let span = p
                .webhook_rate_per_second
                .as_ref()
                .or(p.webhook_burst.as_ref())
                .map(|v| v.span());
            return Err(check.invalid(
                span.or(Some(table_span)),
                key("webhook_rate_per_second"),
                format!("`webhook_rate_per_second` / `webhook_burst`: {why}"),
            ));
        }
        if p.isolation == Isolation::InProcess {
            for (name, given) in [
                ("max_memory_mb", p.max_memory_mb.as_ref().map(|v| v.span())),
                ("kill_after_ms", p.kill_after_ms.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = given {
                    return Err(check.invalid(
                        Some(span),
                        key(name),
                        format!("`{name}` applies to `isolation = \"process\"` only"),
                    ));
                }
            }
        }
        if let Some(mb) = &p.max_memory_mb
            && !(16..=1_048_576).contains(mb.get_ref())
        {
            return Err(check.invalid(
                Some(mb.span()),
                key("max_memory_mb"),
                "`max_memory_mb` must be between 16 and 1048576".into(),
            ));
        }
        let kill_after_ms = match &p.kill_after_ms {
            None => 2_000,
            Some(k) if (1..=600_000).contains(k.get_ref()) => *k.get_ref(),
            Some(k) => {
                return Err(check.invalid(
                    Some(k.span()),
                    key("kill_after_ms"),
                    "`kill_after_ms` must be between 1 and 600000".into(),
                ));
            }
        };
        let http_max_response_bytes = match &p.http_max_response_bytes {
            None => DEFAULT_HTTP_MAX_RESPONSE_BYTES,
            Some(b) if (1024..=64 << 20).contains(b.get_ref()) => *b.get_ref() as usize,
            Some(b) => {
                return Err(check.invalid(
                    Some(b.span()),
                    key("http_max_response_bytes"),
                    "`http_max_response_bytes` must be between 1024 and 67108864".into(),
                ));
            }
        };
        providers.push(ProviderSettings {
            id,
            http_max_response_bytes,
            library,
            enabled: p.enabled,
            sha256,
            timeout: Duration::from_millis(timeout_ms),
            max_concurrency,
            resend_unknown: p.resend_unknown,
            isolation: p.isolation,
            max_memory_mb: p.max_memory_mb.map(|m| m.into_inner()),
            kill_after: Duration::from_millis(kill_after_ms),
            webhook_rate,
            options: toml_to_json(toml::Value::Table(p.options)),
        });
    }

    Ok(providers)
}
