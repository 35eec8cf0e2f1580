//! `[storage]`: which store, and how long its statements, connections and leases last.

use serde::Deserialize;

use crate::{Check, ConfigError};

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `sqlite://<path>` (relative to the config's folder) or `postgres://…`.
    #[serde(default = "default_storage_url")]
    pub url: String,
    /// PostgreSQL: connections in the pool.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: longest wait to connect or for a pooled connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// PostgreSQL: longest statement.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_ms: u64,
    /// PostgreSQL: how long a host's lease lasts unless renewed. Once it lapses (and a call's
    /// deadline has passed) other hosts take over that host's open attempts and claimed keys.
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
    /// PostgreSQL: how often a host renews its lease.
    #[serde(default = "default_renew")]
    pub renew_ms: u64,
}

fn default_lease() -> u64 {
    5_000
}

fn default_renew() -> u64 {
    1_000
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: default_storage_url(),
            pool_size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout(),
            statement_timeout_ms: default_statement_timeout(),
            lease_ms: default_lease(),
            renew_ms: default_renew(),
        }
    }
}

fn default_pool_size() -> usize {
    16
}

fn default_connect_timeout() -> u64 {
    5_000
}

fn default_statement_timeout() -> u64 {
    10_000
}

fn default_storage_url() -> String {
    "sqlite://data/payhost.db".into()
}

/// Validates `[storage]`.
pub(crate) fn validate(
    storage: StorageConfig,
    check: &Check<'_>,
) -> Result<StorageConfig, ConfigError> {
    let url = &storage.url;
    if !(url.starts_with("sqlite://")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        let span = check.span("storage.url");
        return Err(check.invalid(
            span,
            "storage.url".into(),
            "`storage.url` must start with sqlite:// or postgres://".into(),
        ));
    }
    if !(1..=1000).contains(&storage.pool_size) {
        return Err(check.invalid(
            check.span("storage.pool_size"),
            "storage.pool_size".into(),
            "`pool_size` must be between 1 and 1000".into(),
        ));
    }
    for (key, value) in [
        ("storage.connect_timeout_ms", storage.connect_timeout_ms),
        ("storage.statement_timeout_ms", storage.statement_timeout_ms),
    ] {
        if !(1..=600_000).contains(&value) {
            return Err(check.invalid(
                check.span(key),
                key.into(),
                format!("`{key}` must be between 1 and 600000"),
            ));
        }
    }
    if !(100..=600_000).contains(&storage.lease_ms)
        || !(10..storage.lease_ms.max(11)).contains(&storage.renew_ms)
    {
        return Err(check.invalid(
                check.span("storage.renew_ms"),
                "storage.renew_ms".into(),
                "`lease_ms` must be between 100 and 600000, and `renew_ms` at least 10 and shorter than the lease".into(),
            ));
    }
    Ok(storage)
}
