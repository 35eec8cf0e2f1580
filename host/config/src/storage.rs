//! `[storage]`: which store (a [`StorageUrl`], parsed once at load), and how long its
//! statements, connections and leases last.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Check, ConfigError, redact_url};

/// Where the store is, as `storage.url` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `sqlite://<path>`: the embedded database at this file (resolved against the config's
    /// folder).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: a PostgreSQL server, the URL as written (it may hold
    /// a password: print it with [`StorageUrl::redacted`]).
    Postgres(String),
}

impl StorageUrl {
    /// Parses `url`, a relative SQLite path resolved against `dir`; the error says what is
    /// wrong.
    pub fn parse(url: &str, dir: &Path) -> Result<StorageUrl, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StorageUrl::Postgres(url.to_owned()));
        }
        match url.strip_prefix("sqlite://") {
            Some("") => Err("`sqlite://` needs a file path (sqlite://data/payhost.db)".into()),
            Some(path) => Ok(StorageUrl::Sqlite(dir.join(path))),
            None => Err(format!(
                "`{}` is not a store payhost opens: `storage.url` must start with sqlite:// or postgres://",
                url.split("://").next().unwrap_or(url)
            )),
        }
    }

    /// The SQLite file, if it is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            StorageUrl::Sqlite(path) => Some(path),
            StorageUrl::Postgres(_) => None,
        }
    }

    /// Whether several hosts share the store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self, StorageUrl::Postgres(_))
    }

    /// The URL without its password, fit for a log line.
    pub fn redacted(&self) -> String {
        match self {
            StorageUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            StorageUrl::Postgres(url) => redact_url(url),
        }
    }
}

impl std::fmt::Debug for StorageUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `[storage]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Where the store is.
    pub url: StorageUrl,
    /// PostgreSQL: connections in the pool.
    pub pool_size: usize,
    /// PostgreSQL: longest wait to connect or for a pooled connection.
    pub connect_timeout_ms: u64,
    /// PostgreSQL: longest statement.
    pub statement_timeout_ms: u64,
    /// PostgreSQL: how long a host's lease lasts unless renewed. Once it lapses (and a call's
    /// deadline has passed) other hosts take over that host's open attempts and claimed keys.
    pub lease_ms: u64,
    /// PostgreSQL: how often a host renews its lease.
    pub renew_ms: u64,
}

/// `[storage]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStorage {
    /// `sqlite://<path>` (relative to the config's folder) or `postgres://…`.
    #[serde(default = "default_storage_url")]
    url: String,
    /// PostgreSQL: connections in the pool.
    #[serde(default = "default_pool_size")]
    pool_size: usize,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_ms: u64,
    #[serde(default = "default_statement_timeout")]
    statement_timeout_ms: u64,
    #[serde(default = "default_lease")]
    lease_ms: u64,
    #[serde(default = "default_renew")]
    renew_ms: u64,
}

fn default_lease() -> u64 {
    5_000
}

fn default_renew() -> u64 {
    1_000
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
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

/// Validates `[storage]` (a relative SQLite path resolves against `dir`).
pub(crate) fn validate(
    storage: RawStorage,
    dir: &Path,
    check: &Check<'_>,
) -> Result<StorageConfig, ConfigError> {
    let url = StorageUrl::parse(&storage.url, dir)
        .map_err(|why| check.invalid(check.span("storage.url"), "storage.url".into(), why))?;
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
    Ok(StorageConfig {
        url,
        pool_size: storage.pool_size,
        connect_timeout_ms: storage.connect_timeout_ms,
        statement_timeout_ms: storage.statement_timeout_ms,
        lease_ms: storage.lease_ms,
        renew_ms: storage.renew_ms,
    })
}
