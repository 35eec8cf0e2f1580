//! `payhost serve` as a library: the listeners a config asks for (refused where they would be
//! unsafe), the router on each, the reconciler and the deliverer, reloads on `SIGHUP`, and one
//! bounded stop. The
//! binary and an embedder that wants payhost's own server run the same code.
//!
//! Invariants: a listener is opened only as [`crate::http::listeners::plan`] allows; the stop
//! gives requests and provider calls in flight `shutdown_grace_ms` in all, then gives up the
//! host's lease (so other hosts take over at once) and stops the workers; nothing here waits
//! without a bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{AuthMode, Config};
use crate::engine::Host;
use crate::http::edge::{EdgeSettings, TlsError};
use crate::http::listeners::{ListenerRefusal, plan};
use crate::http::{AppState, admin_router, router};

/// Why `serve` does not start. [`ServeError::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener the config asks for would be unsafe.
    #[error("{0}")]
    Listeners(#[from] ListenerRefusal),
    /// A certificate or key that does not load.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// An address that cannot be bound.
    #[error("cannot listen on {address}: {message}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        message: String,
    },
}

impl ServeError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Listeners(e) => e.code(),
            ServeError::Tls(_) => "tls.invalid",
            ServeError::Bind { .. } => "listen.failed",
        }
    }
}

/// Where a started server listens.
#[derive(Debug, Clone)]
pub struct Serving {
    /// The API listener's address, and its scheme (`http` or `https`).
    pub api: (SocketAddr, &'static str),
    /// The admin listener's, when configured.
    pub admin: Option<(SocketAddr, &'static str)>,
}

/// What a server is started with, beside the config and the host.
pub struct ServeOptions {
    /// Overrides `[server] listen` (port 0 picks a free one).
    pub listen: Option<SocketAddr>,
    /// Providers that failed to load (id, why): reported by `/v1/providers`, they keep `/ready`
    /// false.
    pub failed_providers: Vec<(String, String)>,
    /// The open-file limit, to size the connection limit from.
    pub open_files: u64,
}

/// Checks that `config`'s listeners may be opened and that their TLS files load, before
/// anything else starts.
pub fn preflight(config: &Config, listen: Option<SocketAddr>) -> Result<(), ServeError> {
    for p in plan(config, listen)? {
        if let Some((cert, key)) = &p.tls {
            crate::http::edge::tls_acceptor(cert, key)?;
        }
    }
    Ok(())
}

/// Serves `host` as `config` says until `shutdown` completes, then stops within
/// `shutdown_grace_ms`. `listening` is told where, once every listener is bound.
pub async fn serve(
    config: &Config,
    host: Arc<Host>,
    options: ServeOptions,
    listening: impl FnOnce(&Serving),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server = &config.server;
    let plans = plan(config, options.listen)?;
    let mut listeners = Vec::new();
    for p in &plans {
        let tls = match &p.tls {
            None => None,
            Some((cert, key)) => Some(crate::http::edge::tls_acceptor(cert, key)?),
        };
        let bound = tokio::net::TcpListener::bind(p.address)
            .await
            .map_err(|e| ServeError::Bind {
                address: p.address,
                message: e.to_string(),
            })?;
        listeners.push((bound, tls, p.scheme));
    }
    let mut state = AppState::new(host.clone(), options.failed_providers.clone())
        .with_body_timeout(Duration::from_millis(server.body_timeout_ms));
    if !config.api_keys.is_empty() {
        state = state.with_keys(crate::auth::Keys::new(config.api_keys.clone()));
    } else if server.auth == AuthMode::Keys {
        state = state.with_loopback_hosts_only();
    }
    if listeners.len() > 1 {
        state = state.with_admin_apart();
    }
    let state = state.reloading(config.clone());
    let grace = Duration::from_millis(server.shutdown_grace_ms);
    let edge = EdgeSettings {
        name: "api",
        header_timeout: Duration::from_millis(server.header_timeout_ms),
        idle_timeout: Duration::from_millis(server.idle_timeout_ms),
        max_connections: server.connection_limit(options.open_files),
        shutdown_grace: grace,
        write_timeout: Duration::from_millis(server.write_timeout_ms),
        tls: None,
    };
    let mut listeners = listeners.into_iter();
    let (api, api_tls, api_scheme) = listeners.next().expect("a plan has the API listener");
    let admin = listeners.next();
    let address =
        |l: &tokio::net::TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
    let serving = Serving {
        api: (address(&api, plans[0].address), api_scheme),
        admin: admin
            .as_ref()
            .map(|(l, _, scheme)| (address(l, plans[1].address), *scheme)),
    };
    let reconciler = host.spawn_reconciler();
    let deliverer = host.spawn_deliverer();
    let reloads = state.reloader().map(reload_on_hangup);
    tracing::info!(
        config = %config.path.display(),
        storage = %config.redact(&config.storage.url.redacted()),
        loaded = host.providers().len(),
        failed = options.failed_providers.len(),
        open_files = options.open_files,
        max_connections = edge.max_connections,
        auth = %if !config.api_keys.is_empty() {
            format!("{} API keys", config.api_keys.len())
        } else if server.auth == AuthMode::None {
            "none (auth = \"none\")".to_owned()
        } else {
            "none (no keys; loopback only)".to_owned()
        },
        "payhost ready on {}://{}",
        serving.api.1,
        serving.api.0
    );
    listening(&serving);
    // One bound for the whole stop: from the signal, `shutdown_grace_ms` for the requests and
    // the provider calls in progress together.
    let stopping_at = Arc::new(std::sync::OnceLock::new());
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let admin_task = admin.map(|(listener, tls, _)| {
        let settings = EdgeSettings {
            name: "admin",
            max_connections: 256,
            tls,
            ..edge.clone()
        };
        let mut stopped = stop.subscribe();
        tokio::spawn(crate::http::edge::serve(
            listener,
            admin_router(state.clone()),
            settings,
            async move {
                let _ = stopped.recv().await;
            },
        ))
    });
    let signalled = stopping_at.clone();
    crate::http::edge::serve(
        api,
        router(state),
        EdgeSettings {
            tls: api_tls,
            ..edge
        },
        async move {
            shutdown.await;
            let _ = signalled.set(Instant::now());
            tracing::info!(
                "shutting down: requests and provider calls in progress have {} ms to finish",
                grace.as_millis()
            );
            let _ = stop.send(());
        },
    )
    .await;
    let deadline = *stopping_at.get_or_init(Instant::now) + grace;
    if let Some(admin) = admin_task {
        let _ = tokio::time::timeout_at(deadline.into(), admin).await;
    }
    reconciler.abort();
    deliverer.abort();
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    // Calls still running keep their attempts in flight (the next start, or another host once
    // this one's lease lapsed, reconciles them); once they return, or the grace period ends, the
    // lease goes, so other hosts take over at once instead of after it lapses.
    while host.providers().iter().any(|p| p.calls_in_progress() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = tokio::time::timeout(left.max(Duration::from_millis(500)), host.release_lease()).await;
    let unfinished: usize = host.providers().iter().map(|p| p.calls_in_progress()).sum();
    if unfinished > 0 {
        tracing::warn!(
            calls = unfinished,
            "stopping with provider calls still running: their attempts stay open and are reconciled at the next start"
        );
    }
    for p in host.providers().iter() {
        p.stop();
    }
    Ok(())
}

/// Reloads the config on every `SIGHUP` (Unix), until aborted; the outcome is logged (and
/// counted) by the reloader.
fn reload_on_hangup(reloader: Arc<crate::reload::Reloader>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangups = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(
                        "SIGHUP cannot be watched ({e}); reload with `payhost reload` or POST /v1/admin/reload"
                    );
                    return;
                }
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                let _ = reloader.reload().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reloader;
        }
    })
}
