//! `[server]`: listeners, TLS, timeouts and limits of the HTTP edge.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Check, ConfigError};

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Longest wait for a request's head once its first byte arrived (slowloris); 408 after.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// Longest wait for a whole request body, from the end of its head; 408 after.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_ms: u64,
    /// How long a keep-alive connection may sit idle between requests before it is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// On SIGTERM: how long requests in progress may take to finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_ms: u64,
    /// Connections served at once; past it, new ones wait in the accept queue. Default: sized
    /// from the open-file limit (see `payhost check`).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// `keys` (default): with `[[api_keys]]` configured every `/v1` route needs one; with none,
    /// `serve` listens on loopback only. `none`: no key checks anywhere, by choice.
    #[serde(default)]
    pub auth: AuthMode,
    /// A second listener for `/health`, `/ready`, `/metrics` and the operator routes, so the
    /// public port carries only the API and the webhooks.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// `[server.tls]`: serve HTTPS (on the admin listener too, unless it has its own
    /// `[server.admin_tls]` or `admin_plaintext` says otherwise).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// `[server.admin_tls]`: the admin listener's own certificate.
    #[serde(default)]
    pub admin_tls: Option<TlsConfig>,
    /// The admin listener serves plain HTTP although operator keys travel on it: only where the
    /// network between it and its clients is trusted (or a TLS proxy terminates in front).
    #[serde(default)]
    pub admin_plaintext: bool,
    /// How long a response may wait for the client to take it (a write that makes no progress);
    /// past it the connection is cut, so a client that sends and never reads cannot hold a slot.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
}

/// `[server] auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// API keys when configured.
    #[default]
    Keys,
    /// No key checks at all.
    None,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (relative to the config's folder).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            header_timeout_ms: default_header_timeout(),
            body_timeout_ms: default_body_timeout(),
            idle_timeout_ms: default_idle_timeout(),
            shutdown_grace_ms: default_shutdown_grace(),
            max_connections: None,
            auth: AuthMode::Keys,
            admin_listen: None,
            tls: None,
            admin_tls: None,
            admin_plaintext: false,
            write_timeout_ms: default_write_timeout(),
        }
    }
}

impl ServerConfig {
    /// The connection limit: the configured one, or what the open-file limit `nofile` allows
    /// after a reserve for the store, the plugins and the providers' own connections.
    pub fn connection_limit(&self, nofile: u64) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let spare = nofile.saturating_sub(256) * 9 / 10;
            spare.clamp(64, 100_000) as usize
        })
    }
}

fn default_header_timeout() -> u64 {
    10_000
}

fn default_body_timeout() -> u64 {
    30_000
}

fn default_idle_timeout() -> u64 {
    60_000
}

fn default_shutdown_grace() -> u64 {
    10_000
}

fn default_write_timeout() -> u64 {
    30_000
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Validates `[server]` and resolves its TLS files against the config's folder.
pub(crate) fn validate(
    mut server: ServerConfig,
    dir: &Path,
    check: &Check<'_>,
) -> Result<ServerConfig, ConfigError> {
    for (key, value) in [
        ("server.header_timeout_ms", server.header_timeout_ms),
        ("server.body_timeout_ms", server.body_timeout_ms),
        ("server.idle_timeout_ms", server.idle_timeout_ms),
        ("server.shutdown_grace_ms", server.shutdown_grace_ms),
        ("server.write_timeout_ms", server.write_timeout_ms),
    ] {
        if !(1..=3_600_000).contains(&value) {
            return Err(check.invalid(
                check.span(key),
                key.into(),
                format!("`{key}` must be between 1 and 3600000 (one hour)"),
            ));
        }
    }
    if let Some(n) = server.max_connections
        && !(1..=1_000_000).contains(&n)
    {
        return Err(check.invalid(
            check.span("server.max_connections"),
            "server.max_connections".into(),
            "`max_connections` must be between 1 and 1000000".into(),
        ));
    }
    for tls in [&mut server.tls, &mut server.admin_tls]
        .into_iter()
        .flatten()
    {
        tls.cert = dir.join(&tls.cert);
        tls.key = dir.join(&tls.key);
    }
    if server.admin_listen.is_none() && (server.admin_tls.is_some() || server.admin_plaintext) {
        let key = if server.admin_plaintext {
            "server.admin_plaintext"
        } else {
            "server.admin_tls"
        };
        return Err(check.invalid(
            check.span(key),
            key.into(),
            format!("`{key}` applies to the admin listener, but `admin_listen` is not set"),
        ));
    }
    if server.admin_tls.is_some() && server.admin_plaintext {
        return Err(check.invalid(
            check.span("server.admin_plaintext"),
            "server.admin_plaintext".into(),
            "`admin_plaintext = true` and `[server.admin_tls]` contradict each other: keep one"
                .into(),
        ));
    }

    Ok(server)
}
