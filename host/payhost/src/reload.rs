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
//! Providers: a new or changed `[providers.<id>]` (options, secrets, timeout, a new library file
//! or `sha256` pin) is loaded with the same checks as at start — ABI, protocol, manifest, pin —
//! before anything is applied; a failure refuses the whole reload. The new instance takes the
//! calls from then on; calls in flight finish on the old one, which is stopped once nothing
//! holds it (an in-process library is never unloaded; an isolated one's worker ends). A provider
//! disabled or removed stays loaded but closed: it reconciles what it has open and verifies its
//! webhooks, and takes no new session or account holder.
//!
//! Refused as needing a restart: `[server]` (listeners, TLS, limits), `[storage]`, `[plugins]`,
//! `[log]`, `[reconcile]`, turning key checks on or off, and a provider timeout above the running
//! maximum (the reconciler's take-over horizon is derived from it).

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
    /// A new or changed provider did not load (the message says why, as at start).
    #[error(
        "provider `{id}` did not load: {message}; nothing was applied and the running config is unchanged"
    )]
    ProviderFailed {
        /// The provider.
        id: String,
        /// Why, with the load error's code.
        message: String,
    },
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
            ReloadError::ProviderFailed { .. } => "config.provider_failed",
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
    failed: Arc<std::sync::RwLock<Vec<(String, String)>>>,
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
        failed: Arc<std::sync::RwLock<Vec<(String, String)>>>,
    ) -> Reloader {
        Reloader {
            path: config.path.clone(),
            host,
            keys,
            failed,
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
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        // On a task of its own: a caller inside a request has the generation it was admitted
        // with pinned, and a reload starts from the current one (another may have applied since).
        let me = self.clone();
        tokio::spawn(async move { me.reload_now().await })
            .await
            .unwrap_or_else(|e| {
                Err(ReloadError::Invalid(ConfigError {
                    kind: crate::config::ConfigErrorKind::Io,
                    file: self.path.clone(),
                    location: None,
                    key: None,
                    message: format!("the reload stopped: {e}"),
                }))
            })
    }

    async fn reload_now(&self) -> Result<ReloadReport, ReloadError> {
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
        let (needs_restart, before) = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let max_timeout = self
                .host
                .providers()
                .iter()
                .map(|p| p.timeout())
                .max()
                .unwrap_or_default();
            (
                restart_needed(&running.0, &new, self.keys.is_some(), max_timeout),
                running.0.clone(),
            )
        };
        if !needs_restart.is_empty() {
            metrics
                .config_reloads
                .with_label_values(&["restart_needed"])
                .inc();
            let e = ReloadError::RestartNeeded(needs_restart);
            tracing::error!(code = e.code(), "config reload refused: {e}");
            return Err(e);
        }
        // Providers: everything new is loaded (off the runtime) before anything is applied.
        let plan = match self.load_providers(&before, &new).await {
            Ok(plan) => plan,
            Err(e) => {
                metrics.config_reloads.with_label_values(&["invalid"]).inc();
                tracing::error!(code = e.code(), "config reload refused: {e}");
                return Err(e);
            }
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        let current = self.host.event_settings();
        let now = std::time::SystemTime::now();
        let mut events = new.events.clone();
        for e in &mut events.endpoints {
            if let Some(before) = current.endpoints.iter().find(|b| b.id == e.id) {
                *e = e.clone().succeeding(before, now, SECRET_OVERLAP);
            }
        }
        let keys_changed = !same_keys(&running.0.api_keys, &new.api_keys) && self.keys.is_some();
        let events_changed = !same_events(&current, &events);
        // One generation: the keys, the providers and the event settings swap together, while
        // no request is pinning one.
        let mut replaced = Vec::new();
        self.host.swapping(|| {
            if keys_changed && let Some(keys) = &self.keys {
                let mut keys = keys.write().unwrap_or_else(|e| e.into_inner());
                *keys = Arc::new(keys.reloaded(new.api_keys.clone()));
                changed.push("api_keys".to_owned());
            }
            if let Some((providers, old, names, loaded_now)) = plan {
                self.host.swap_providers(providers);
                replaced = old;
                changed.extend(names);
                self.failed
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(id, _)| !loaded_now.contains(id));
            }
            // A provider that failed at start and is no longer enabled is no longer failing.
            self.failed
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(id, _)| new.enabled_providers().any(|p| &p.id == id));
            if events_changed {
                self.host.swap_event_settings(events);
                changed.push("events".to_owned());
            }
        });
        for old in replaced {
            retire(old);
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

/// The providers a reload gives, the instances they replace (to retire), what changed
/// (`providers.<id>`), and the ids loaded now; `None`: no provider changed.
type ProviderPlan = Option<(
    crate::Providers,
    Vec<Arc<crate::Provider>>,
    Vec<String>,
    Vec<String>,
)>;

impl Reloader {
    /// Loads every provider `new` adds or changes (and retries one that failed at start), with
    /// the checks of a start; closes the ones it disables or removes.
    async fn load_providers(
        &self,
        running: &Config,
        new: &Config,
    ) -> Result<ProviderPlan, ReloadError> {
        let now = self.host.providers();
        let failed_at_start: Vec<String> = self
            .failed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        let mut to_load = Vec::new();
        for p in new.enabled_providers() {
            let unchanged = running.enabled_providers().any(|r| r == p);
            if unchanged && now.is_open(&p.id) {
                continue;
            }
            // Unchanged but failed at start: tried again, and left failed if it fails again.
            let retry_only = unchanged && failed_at_start.contains(&p.id);
            to_load.push((p.clone(), retry_only));
        }
        let to_close: Vec<String> = running
            .enabled_providers()
            .filter(|r| !new.enabled_providers().any(|p| p.id == r.id))
            .map(|r| r.id.clone())
            .filter(|id| now.is_open(id))
            .collect();
        if to_load.is_empty() && to_close.is_empty() {
            return Ok(None);
        }
        let config = new.clone();
        let loads = to_load.clone();
        let results = tokio::task::spawn_blocking(move || {
            let loader = crate::Loader::new(&config);
            loads
                .iter()
                .map(|(p, _)| (p.id.clone(), loader.load(p, Some(&config))))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ReloadError::ProviderFailed {
            id: "?".into(),
            message: format!("loading stopped: {e}"),
        })?;
        let mut next = (*now).clone();
        let mut replaced = Vec::new();
        let mut names = Vec::new();
        let mut loaded_now = Vec::new();
        let mut refusal = None;
        let mut fresh = Vec::new();
        for ((id, result), (_, retry_only)) in results.into_iter().zip(&to_load) {
            match result {
                Ok(provider) => fresh.push((id, Arc::new(provider))),
                Err(_) if *retry_only => {}
                Err(e) if refusal.is_none() => {
                    refusal = Some(ReloadError::ProviderFailed {
                        id,
                        message: format!("[{}] {e}", e.code()),
                    });
                }
                Err(_) => {}
            }
        }
        if let Some(refusal) = refusal {
            // Nothing is applied: what did load is stopped again.
            for (_, p) in fresh {
                p.stop();
            }
            return Err(refusal);
        }
        for (id, provider) in fresh {
            tracing::info!(
                provider = %id,
                version = %provider.manifest().version,
                sha256 = %provider.library().sha256,
                "provider loaded by a reload"
            );
            if let Some(old) = now.get(&id) {
                replaced.push(old.clone());
            }
            next = next.with(&id, provider);
            names.push(format!("providers.{id}"));
            loaded_now.push(id);
        }
        for id in to_close {
            tracing::info!(provider = %id, "provider disabled by a reload: it finishes what it has open and takes nothing new");
            next = next.closing(&id);
            names.push(format!("providers.{id} (disabled)"));
        }
        if names.is_empty() {
            return Ok(None);
        }
        Ok(Some((next, replaced, names, loaded_now)))
    }
}

/// Stops a replaced provider instance once nothing holds it and no call of it runs (calls in
/// flight finish on it), within ten minutes.
fn retire(old: Arc<crate::Provider>) {
    tokio::spawn(async move {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(600);
        while (Arc::strong_count(&old) > 1 || old.calls_in_progress() > 0)
            && std::time::Instant::now() < until
        {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if old.calls_in_progress() > 0 {
            tracing::warn!(
                provider = old.id(),
                "a replaced provider instance still has calls running after 10 minutes; stopping it"
            );
        }
        old.stop();
    });
}

/// The settings `new` changes that only a restart applies, named as in the file.
fn restart_needed(
    running: &Config,
    new: &Config,
    has_keys: bool,
    max_timeout: std::time::Duration,
) -> Vec<String> {
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
    for p in new.enabled_providers() {
        let was = running.providers.iter().find(|r| r.id == p.id);
        if p.timeout > max_timeout && was.is_none_or(|r| r.timeout != p.timeout) {
            out.push(format!(
                "[providers.{}] timeout_ms above the running maximum ({} ms)",
                p.id,
                max_timeout.as_millis()
            ));
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
