//! Finding and loading the config's providers: a library name → its file in the plugin folder
//! (or a path) → [`crate::library`] opens and instantiates it, here or in a worker → a
//! [`Provider`] ready to call. One failing provider never keeps the others from loading.

// Loading is a cold path, once per provider at start-up; its errors carry everything an operator
// needs rather than being boxed for size.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use payhost_provider_api::envelope::{HostObject_TO, TD_Opaque};
use payhost_provider_api::{ErrorKind, Manifest};

use crate::config::{Config, LibrarySource, ProviderSettings};
use crate::host_side::HostSide;
use crate::library::{
    AfterCheck, LoadError, OpenFailure, current_log_level, open, open_and_instantiate_checked,
    read_manifest,
};
use crate::provider::{LibraryInfo, Provider, ProviderParts};
use payhost_core::{Clock, SystemClock};

/// A provider that failed to load.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    /// The provider id from the config.
    pub id: String,
    /// Why.
    pub error: LoadError,
}

/// The loaded providers, by id.
#[derive(Debug, Default, Clone)]
pub struct Providers {
    by_id: BTreeMap<String, Arc<Provider>>,
    /// Providers a reload disabled or removed: still called for what they have open (reconciling
    /// their attempts, verifying their webhooks), never for a new session or account holder.
    closed: std::collections::BTreeSet<String>,
}

impl Providers {
    /// The provider with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Provider>> {
        self.by_id.get(id)
    }

    /// Whether the provider takes new sessions and account holders (loaded, and not disabled by
    /// a reload).
    pub fn is_open(&self, id: &str) -> bool {
        self.by_id.contains_key(id) && !self.closed.contains(id)
    }

    /// These providers with `id` replaced by (or added as) `provider`, open.
    pub fn with(&self, id: &str, provider: Arc<Provider>) -> Providers {
        let mut next = self.clone();
        next.by_id.insert(id.to_owned(), provider);
        next.closed.remove(id);
        next
    }

    /// These providers with `id` closed to new sessions (still loaded for what it has open).
    pub fn closing(&self, id: &str) -> Providers {
        let mut next = self.clone();
        if next.by_id.contains_key(id) {
            next.closed.insert(id.to_owned());
        }
        next
    }
    /// All of them, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.by_id.values()
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// What loading the config's providers gave.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// The providers that loaded.
    pub providers: Providers,
    /// The ones that did not. The others load regardless.
    pub failures: Vec<LoadFailure>,
}

/// A library's manifest and provenance, as `payhost inspect` shows it.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The plugin's manifest.
    pub manifest: Manifest,
    /// The file and its digest.
    pub library: LibraryInfo,
    /// The protocol this host would speak with it, if any.
    pub protocol: Option<u32>,
}

/// Loads plugins.
pub struct Loader {
    plugin_dir: PathBuf,
    plugin_dir_hint: String,
    clock: Arc<dyn Clock>,
    after_check: Option<AfterCheck>,
}

impl Loader {
    /// A loader for `config`: its plugin folder, or the payhost executable's folder.
    pub fn new(config: &Config) -> Loader {
        let (plugin_dir, plugin_dir_hint) = match &config.plugin_dir {
            Some(dir) => (dir.clone(), "plugin folder from `[plugins] dir`".to_owned()),
            None => (
                default_plugin_dir(),
                "plugin folder = the payhost executable's folder; set `[plugins] dir` to change it"
                    .to_owned(),
            ),
        };
        Loader {
            plugin_dir,
            plugin_dir_hint,
            clock: Arc::new(SystemClock),
            after_check: None,
        }
    }

    /// A loader that looks for `library = "name"` in `dir`.
    pub fn with_plugin_dir(dir: impl Into<PathBuf>) -> Loader {
        Loader {
            plugin_dir: dir.into(),
            plugin_dir_hint: "plugin folder given by the embedder".into(),
            clock: Arc::new(SystemClock),
            after_check: None,
        }
    }

    /// Replaces the clock providers see.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Loader {
        self.clock = clock;
        self
    }

    /// Runs `hook` after a library file passed its checks and before it is loaded. For tests
    /// that replace the file at that moment: what is loaded is still the file that was checked.
    #[doc(hidden)]
    pub fn after_check(mut self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Loader {
        self.after_check = Some(Arc::new(hook));
        self
    }

    /// The file a `library = "name"` resolves to.
    pub fn library_path(&self, name: &str) -> PathBuf {
        self.plugin_dir.join(format!(
            "{}{name}{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ))
    }

    /// Loads every enabled provider of `config`; a failure is reported and the others load.
    pub fn load_all(&self, config: &Config) -> LoadReport {
        let mut report = LoadReport::default();
        for settings in config.enabled_providers() {
            match self.load(settings, Some(config)) {
                Ok(provider) => {
                    tracing::info!(
                        provider = %settings.id,
                        name = %provider.manifest().name,
                        version = %provider.manifest().version,
                        api_version = %provider.manifest().api_version,
                        protocol = provider.protocol(),
                        library = %provider.library().path.display(),
                        sha256 = %provider.library().sha256,
                        "provider loaded"
                    );
                    report
                        .providers
                        .by_id
                        .insert(settings.id.clone(), Arc::new(provider));
                }
                Err(error) => {
                    if let LoadError::IncompatibleAbi { report, .. } = &error {
                        tracing::debug!(provider = %settings.id, "abi_stable's full report:\n{report}");
                    }
                    tracing::error!(provider = %settings.id, code = error.code(), "provider not loaded: {error}");
                    report.failures.push(LoadFailure {
                        id: settings.id.clone(),
                        error,
                    });
                }
            }
        }
        report
    }

    /// Loads and instantiates one provider. `config` (when given) points option errors at their
    /// line in the file.
    pub fn load(
        &self,
        settings: &ProviderSettings,
        config: Option<&Config>,
    ) -> Result<Provider, LoadError> {
        let path = self.resolve(&settings.library)?;
        let config_dir = config
            .map(|c| c.dir.display().to_string())
            .unwrap_or_default();
        let redactor = config.map_or_else(
            || crate::config::Redactor::new(crate::config::option_secrets(&settings.options)),
            |c| c.redactor_for(settings),
        );
        let host_side = HostSide {
            provider_id: settings.id.clone(),
            clock: self.clock.clone(),
            limits: crate::host_side::HostLimits {
                call_timeout: settings.timeout,
                max_response_bytes: settings.http_max_response_bytes,
            },
            redactor: redactor.clone(),
        };
        let (opened, backend) = match settings.isolation {
            crate::config::Isolation::InProcess => {
                let host = HostObject_TO::from_value(host_side, TD_Opaque);
                let opened = open_and_instantiate_checked(
                    &path,
                    settings.sha256.as_deref(),
                    self.after_check.as_ref(),
                    &settings.id,
                    settings.options.clone(),
                    config_dir,
                    current_log_level(),
                    host,
                )
                .map_err(|f| self.failure(settings, config, f))?;
                let object = std::sync::Arc::new(opened.object);
                (
                    (opened.manifest, opened.protocol, opened.sha256),
                    crate::provider::Backend::InProcess(object),
                )
            }
            crate::config::Isolation::Process => {
                let worker_settings = crate::worker::WorkerSettings {
                    provider_id: settings.id.clone(),
                    library: path.clone(),
                    sha256: settings.sha256.clone(),
                    options: settings.options.clone(),
                    config_dir,
                    max_memory_mb: settings.max_memory_mb,
                    kill_after: settings.kill_after,
                    exe: config.and_then(|c| c.worker_exe.clone()),
                    max_host_calls: settings.max_concurrency,
                    user: config.and_then(|c| c.worker_user.clone()),
                };
                let (worker, started) =
                    crate::worker::Worker::start(worker_settings, Arc::new(host_side)).map_err(
                        |message| LoadError::WorkerFailed {
                            id: settings.id.clone(),
                            message,
                        },
                    )?;
                match started {
                    crate::worker::Started::Ready {
                        manifest,
                        protocol,
                        sha256,
                        ..
                    } => (
                        (manifest, protocol, sha256),
                        crate::provider::Backend::Worker(worker),
                    ),
                    crate::worker::Started::Failed {
                        refused: Some(error),
                        ..
                    } => return Err(self.failure(settings, config, OpenFailure::Refused(error))),
                    crate::worker::Started::Failed { code, message, .. } => {
                        return Err(LoadError::WorkerFailed {
                            id: settings.id.clone(),
                            message: format!("[{code}] {message}"),
                        });
                    }
                }
            }
        };
        let (manifest, protocol, sha256) = opened;
        Ok(Provider::new(ProviderParts {
            id: settings.id.clone(),
            manifest,
            protocol,
            library: LibraryInfo { path, sha256 },
            backend,
            max_concurrency: settings.max_concurrency,
            timeout: settings.timeout,
            resend_unknown: settings.resend_unknown,
            webhook_rate: settings.webhook_rate,
            clock: self.clock.clone(),
            redactor,
        }))
    }

    /// A provider's refusal as a load error, pointing at the option's line when it can.
    fn failure(
        &self,
        settings: &ProviderSettings,
        config: Option<&Config>,
        failure: OpenFailure,
    ) -> LoadError {
        let mut error = match failure {
            OpenFailure::Load(e) => return e,
            OpenFailure::Refused(e) => e,
        };
        if let Some(c) = config {
            error.message = c.redact(&error.message);
        }
        if error.kind == ErrorKind::InvalidOptions {
            let location = config.and_then(|c| {
                let base = format!("providers.{}", settings.id);
                let key = error
                    .param
                    .as_deref()
                    .map(|p| format!("{base}.{p}"))
                    .unwrap_or_else(|| format!("{base}.options"));
                c.locate(&key)
                    .or_else(|| c.locate(&format!("{base}.options")))
                    .or_else(|| c.locate(&base))
            });
            LoadError::OptionsRejected {
                id: settings.id.clone(),
                location,
                error,
            }
        } else {
            LoadError::InitFailed {
                id: settings.id.clone(),
                error,
            }
        }
    }

    /// Opens one library and reads its manifest, without a config or an instance.
    pub fn inspect(&self, library: &Path) -> Result<Inspection, LoadError> {
        let path = if library.exists() || library.components().count() > 1 {
            library.to_owned()
        } else {
            self.library_path(&library.display().to_string())
        };
        let path = self.resolve(&LibrarySource::Path(path))?;
        let loaded = open(&path, None, self.after_check.as_ref())?;
        let (manifest, protocol) = read_manifest(&path, &loaded.module)?;
        Ok(Inspection {
            manifest,
            library: LibraryInfo {
                path,
                sha256: loaded.sha256.clone(),
            },
            protocol,
        })
    }

    fn resolve(&self, source: &LibrarySource) -> Result<PathBuf, LoadError> {
        let (path, hint) = match source {
            LibrarySource::Name(name) => (self.library_path(name), self.plugin_dir_hint.clone()),
            LibrarySource::Path(p) => (p.clone(), "from `path`".to_owned()),
        };
        match std::fs::canonicalize(&path) {
            Ok(p) => Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(LoadError::NotFound { path, hint })
            }
            Err(e) => Err(LoadError::Io {
                path,
                message: e.to_string(),
            }),
        }
    }
}

fn default_plugin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."))
}
