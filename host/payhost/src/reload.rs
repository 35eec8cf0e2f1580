//! Changing a running server's config without a restart: `SIGHUP`, `payhost reload` and
//! `POST /v1/admin/reload` all come here.
//!
//! Invariants: the new file is read and validated completely before anything changes; an
//! invalid one, or one that changes a setting that cannot change live, changes nothing and the
//! running config stays (the error names `file:line:column`, or each setting that needs a
//! restart). What is applied is swapped whole, each at one moment: the API keys (a request reads
//! them once, so a removed key is refused from the next request on, and keys keep their rate
//! buckets), the event settings (a write reads them once; the deliverer follows; a rotated
//! endpoint secret keeps signing beside the new one for [`SECRET_OVERLAP`]). One reload runs at
//! a time.
//!
//! Applied live today: `[[api_keys]]` and `[events]` with `[[events.endpoints]]`. Everything
//! else — listeners, TLS, storage, plugins, logging, the reconciler and the providers — is
//! refused as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::config::events::SECRET_OVERLAP;
use crate::config::{Config, ConfigError};
use crate::engine::Host;

/// Why a reload changed nothing. [`ReloadError::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file does not read or does not validate (the message names `file:line:column`).
    #[error("{0}; the running config is unchanged")]
    Invalid(ConfigError),
    /// The new file changes settings that cannot change while the server runs.
    #[error(
        "{} cannot change while the server runs: restart to apply {}; nothing was applied and the running config is unchanged",
        .0.join(", "),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    RestartNeeded(Vec<String>),
}

impl ReloadError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "config.invalid",
            ReloadError::RestartNeeded(_) => "config.restart_needed",
        }
    }
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// The SHA-256 of the file now running.
    pub digest: String,
    /// How many reloads were applied since the server started (0: the file it started with).
    pub generation: u64,
    /// What changed (`api_keys`, `events`); empty when the file changed nothing that runs.
    pub changed: Vec<String>,
}

/// Reloads one server's config file.
pub struct Reloader {
    path: PathBuf,
    host: Arc<Host>,
    keys: Option<Arc<std::sync::RwLock<Arc<crate::auth::Keys>>>>,
    running: std::sync::Mutex<(Config, u64)>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader of `config`'s file for a server over `host` whose keys are `keys` (the
    /// router state's, when keys are configured).
    pub(crate) fn new(
        config: Config,
        host: Arc<Host>,
        keys: Option<Arc<std::sync::RwLock<Arc<crate::auth::Keys>>>>,
    ) -> Reloader {
        Reloader {
            path: config.path.clone(),
            host,
            keys,
            running: std::sync::Mutex::new((config, 0)),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The running file's digest and the reload generation.
    pub fn current(&self) -> (String, u64) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        (running.0.digest(), running.1)
    }

    /// Reads the file again and applies it, or changes nothing and says why.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.one_at_a_time.lock().await;
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || Config::from_file(&path)).await;
        let metrics = crate::metrics::global();
        let new = match read {
            Ok(Ok(config)) => config,
            Ok(Err(e)) => {
                metrics.config_reloads.with_label_values(&["invalid"]).inc();
                tracing::error!(
                    code = e.kind.code(),
                    "config reload refused: {e}; the running config is unchanged"
                );
                return Err(ReloadError::Invalid(e));
            }
            Err(join) => {
                metrics.config_reloads.with_label_values(&["invalid"]).inc();
                let e = ConfigError {
                    kind: crate::config::ConfigErrorKind::Io,
                    file: self.path.clone(),
                    location: None,
                    key: None,
                    message: format!("reading the file failed: {join}"),
                };
                return Err(ReloadError::Invalid(e));
            }
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let needs_restart = restart_needed(&running.0, &new, self.keys.is_some());
        if !needs_restart.is_empty() {
            metrics
                .config_reloads
                .with_label_values(&["restart_needed"])
                .inc();
            let e = ReloadError::RestartNeeded(needs_restart);
            tracing::error!(code = e.code(), "config reload refused: {e}");
            return Err(e);
        }
        let mut changed = Vec::new();
        if !same_keys(&running.0.api_keys, &new.api_keys)
            && let Some(keys) = &self.keys
        {
            let mut keys = keys.write().unwrap_or_else(|e| e.into_inner());
            *keys = Arc::new(keys.reloaded(new.api_keys.clone()));
            changed.push("api_keys".to_owned());
        }
        let current = self.host.event_settings();
        let now = std::time::SystemTime::now();
        let mut events = new.events.clone();
        for e in &mut events.endpoints {
            if let Some(before) = current.endpoints.iter().find(|b| b.id == e.id) {
                *e = e.clone().succeeding(before, now, SECRET_OVERLAP);
            }
        }
        if !same_events(&current, &events) {
            self.host.swap_event_settings(events);
            changed.push("events".to_owned());
        }
        let digest = new.digest();
        if !changed.is_empty() || digest != running.0.digest() {
            running.1 += 1;
        }
        running.0 = new;
        let report = ReloadReport {
            digest,
            generation: running.1,
            changed,
        };
        let result = if report.changed.is_empty() {
            "unchanged"
        } else {
            "applied"
        };
        metrics.config_reloads.with_label_values(&[result]).inc();
        tracing::info!(
            digest = %report.digest,
            generation = report.generation,
            changed = ?report.changed,
            "config reloaded"
        );
        Ok(report)
    }
}

/// The settings `new` changes that only a restart applies, named as in the file.
fn restart_needed(running: &Config, new: &Config, has_keys: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |name: &str, same: bool| {
        if !same {
            out.push(name.to_owned());
        }
    };
    differs("[server]", running.server == new.server);
    differs("[storage]", running.storage == new.storage);
    differs(
        "[plugins]",
        running.plugin_dir == new.plugin_dir
            && running.worker_exe == new.worker_exe
            && running.worker_user == new.worker_user,
    );
    differs("[log]", running.log == new.log);
    differs("[reconcile]", running.reconcile == new.reconcile);
    for p in &new.providers {
        let same = running.providers.iter().any(|r| r == p);
        differs(&format!("[providers.{}]", p.id), same);
    }
    for p in &running.providers {
        if !new.providers.iter().any(|n| n.id == p.id) {
            out.push(format!("[providers.{}] (removed)", p.id));
        }
    }
    // Keys on or off changes which listeners are safe to open.
    if has_keys == new.api_keys.is_empty() {
        out.push("[[api_keys]] (turning key checks on or off)".to_owned());
    }
    out
}

fn same_keys(a: &[crate::auth::KeySpec], b: &[crate::auth::KeySpec]) -> bool {
    let view = |k: &crate::auth::KeySpec| format!("{k:?}");
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| view(x) == view(y))
}

fn same_events(a: &crate::events::EventSettings, b: &crate::events::EventSettings) -> bool {
    (a.retention, a.poll, a.claim, a.max_wait) == (b.retention, b.poll, b.claim, b.max_wait)
        && a.endpoints.len() == b.endpoints.len()
        && a.endpoints.iter().zip(&b.endpoints).all(|(x, y)| {
            x.id == y.id
                && x.url == y.url
                && x.secret == y.secret
                && x.previous_secrets == y.previous_secrets
                && x.types == y.types
                && x.providers == y.providers
                && (x.timeout, x.retry_for, x.retry_base, x.retry_max)
                    == (y.timeout, y.retry_for, y.retry_base, y.retry_max)
        })
}
