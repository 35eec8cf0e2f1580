//! Opening a provider library: check the file (regular, not group- or world-writable, its
//! SHA-256 pin) → load it through the very descriptor that was checked → abi_stable's header
//! and layout check (via provider-api) → the manifest and the protocol negotiated →
//! instantiate the provider with its options and host services. Each step fails with its own
//! [`LoadError`] naming the provider and the file. Libraries are never unloaded; a path yields
//! the code first loaded from it.

// Loading is a cold path, once per provider at start-up; its errors carry everything an operator
// needs (paths, both versions, the layout report) rather than being boxed for size.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use payhost_provider_api::envelope::{
    HostBox, OpenError, PluginModuleRef, ProviderBox, RResult, RStr, open_plugin,
};
use payhost_provider_api::{InstanceConfig, Manifest, ProviderError, SUPPORTED_PROTOCOLS};
use sha2::{Digest, Sha256};

use crate::answer::read_error;
use crate::config::Location;

/// How many lines of abi_stable's layout report an error message shows; the rest is logged at
/// debug level.
const REPORT_LINES: usize = 8;

/// Why a provider could not be loaded. [`LoadError::code`] is stable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// No file where the config says the library is.
    #[error("library not found: {path} ({hint})")]
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
        /// How the path was made.
        hint: String,
    },
    /// The file exists but could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// Anyone but the owner may write the file: refused, since it is native code run as the host.
    #[error(
        "refusing {path}: it is group- or world-writable (mode {mode:o}); run `chmod go-w` on it"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's SHA-256 is not the pinned one.
    #[error("refusing {path}: sha256 mismatch: expected {expected}, actual {actual}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The pin from the config.
        expected: String,
        /// The file's digest.
        actual: String,
    },
    /// The file changed since this process loaded it; the old code is still the one running.
    #[error(
        "{path} changed on disk since it was loaded (sha256 {loaded} then, {now} now); install upgrades under a new file name and restart the host"
    )]
    ChangedOnDisk {
        /// The file.
        path: PathBuf,
        /// Digest when loaded.
        loaded: String,
        /// Digest now.
        now: String,
    },
    /// Not a dynamic library at all.
    #[error("{path} is not a loadable library: {message}")]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// A library, but not a payhost plugin.
    #[error("{path} is not a payhost provider plugin: {message}")]
    NotAPlugin {
        /// The file.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
    /// A plugin whose envelope does not match this host's.
    #[error(
        "{path} was built against an incompatible provider-api: plugin {plugin_version}, host {host_version}; rebuild it against provider-api {host_major}.x\n{summary}"
    )]
    IncompatibleAbi {
        /// The file.
        path: PathBuf,
        /// provider-api version of the plugin.
        plugin_version: String,
        /// provider-api version of this host.
        host_version: String,
        /// The host's major version.
        host_major: String,
        /// The first lines of abi_stable's report.
        summary: String,
        /// abi_stable's whole report.
        report: String,
    },
    /// No protocol version in common.
    #[error(
        "{path} speaks protocol versions {plugin:?}, this host speaks {host:?} (plugin built with provider-api {plugin_api}, host {host_api})"
    )]
    IncompatibleProtocol {
        /// The file.
        path: PathBuf,
        /// The plugin's versions.
        plugin: Vec<u32>,
        /// The host's versions.
        host: Vec<u32>,
        /// provider-api version of the plugin.
        plugin_api: String,
        /// provider-api version of this host.
        host_api: String,
    },
    /// The manifest is unreadable or invalid.
    #[error("{path} has a bad manifest: {message}")]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The provider refused its options.
    #[error("{}provider `{id}` refused its options: {}{}", location.as_ref().map(|l| format!("{l}: ")).unwrap_or_default(), error.message, error.param.as_ref().map(|p| format!(" (key `providers.{id}.{p}`)")).unwrap_or_default())]
    OptionsRejected {
        /// The provider id.
        id: String,
        /// Where the offending key (or the options table) is in the config.
        location: Option<Location>,
        /// The provider's error.
        error: ProviderError,
    },
    /// The provider's worker process could not be started or said why it did not load.
    #[error("provider `{id}` could not start in its worker process: {message}")]
    WorkerFailed {
        /// The provider id.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// The provider failed to start for another reason (or panicked doing so).
    #[error("provider `{id}` failed to start: {error}")]
    InitFailed {
        /// The provider id.
        id: String,
        /// The provider's error.
        error: ProviderError,
    },
}

impl LoadError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::NotFound { .. } => "plugin.not_found",
            LoadError::Io { .. } => "plugin.io",
            LoadError::InsecurePermissions { .. } => "plugin.insecure_permissions",
            LoadError::ChecksumMismatch { .. } => "plugin.checksum_mismatch",
            LoadError::ChangedOnDisk { .. } => "plugin.changed_on_disk",
            LoadError::NotALibrary { .. } => "plugin.not_a_library",
            LoadError::NotAPlugin { .. } => "plugin.not_a_plugin",
            LoadError::IncompatibleAbi { .. } => "plugin.incompatible_abi",
            LoadError::IncompatibleProtocol { .. } => "plugin.incompatible_protocol",
            LoadError::BadManifest { .. } => "plugin.bad_manifest",
            LoadError::OptionsRejected { .. } => "plugin.options_rejected",
            LoadError::InitFailed { .. } => "plugin.init_failed",
            LoadError::WorkerFailed { .. } => "plugin.worker_failed",
        }
    }
}

/// Runs between a library's checks and its loading (tests swap the file there).
pub(crate) type AfterCheck = Arc<dyn Fn(&Path) + Send + Sync>;

pub(crate) struct LoadedLibrary {
    pub(crate) module: PluginModuleRef,
    pub(crate) sha256: String,
}

/// A library in the cache, with the identity of its file when `sha256` was computed; the digest
/// is reused while the identity holds.
struct Cached {
    library: Arc<LoadedLibrary>,
    identity: FileIdentity,
}

/// What changes when a file is replaced or rewritten: device, inode, size, modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> FileIdentity {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        FileIdentity {
            dev,
            ino,
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// Every library this process opened, by canonical path. Libraries are never unloaded, and the
/// same path always yields the code first loaded.
fn loaded_libraries() -> &'static Mutex<HashMap<PathBuf, Cached>> {
    static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Cached>>> = OnceLock::new();
    LIBRARIES.get_or_init(Default::default)
}

pub(crate) fn current_log_level() -> String {
    tracing::level_filters::LevelFilter::current()
        .to_string()
        .to_ascii_lowercase()
}

/// A library opened and its provider instantiated.
pub(crate) struct Opened {
    pub(crate) manifest: Manifest,
    pub(crate) protocol: u32,
    pub(crate) sha256: String,
    pub(crate) object: ProviderBox,
}

/// Why [`open_and_instantiate`] gave no provider.
pub(crate) enum OpenFailure {
    /// The file or its manifest was refused.
    Load(LoadError),
    /// The provider refused its options or failed to start.
    Refused(ProviderError),
}

/// Opens a library (checks, pin, layout, manifest, protocol) and instantiates its provider with
/// `host` as its host services: in the host process, or in a worker (`payhost worker`).
pub(crate) fn open_and_instantiate(
    path: &Path,
    pin: Option<&str>,
    instance_id: &str,
    options: serde_json::Value,
    config_dir: String,
    log_level: String,
    host: HostBox,
) -> Result<Opened, OpenFailure> {
    open_and_instantiate_checked(
        path,
        pin,
        None,
        instance_id,
        options,
        config_dir,
        log_level,
        host,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn open_and_instantiate_checked(
    path: &Path,
    pin: Option<&str>,
    after_check: Option<&AfterCheck>,
    instance_id: &str,
    options: serde_json::Value,
    config_dir: String,
    log_level: String,
    host: HostBox,
) -> Result<Opened, OpenFailure> {
    let library = open(path, pin, after_check).map_err(OpenFailure::Load)?;
    let (manifest, protocol) = read_manifest(path, &library.module).map_err(OpenFailure::Load)?;
    let protocol = protocol
        .ok_or_else(|| incompatible_protocol(path, &manifest))
        .map_err(OpenFailure::Load)?;
    let instance = InstanceConfig {
        instance_id: instance_id.to_owned(),
        protocol,
        options,
        config_dir,
        log_level,
    };
    let instance_json = serde_json::to_string(&instance)
        .map_err(|e| OpenFailure::Refused(ProviderError::internal(e.to_string())))?;
    match (library.module.new_provider())(RStr::from_str(&instance_json), host) {
        RResult::ROk(object) => Ok(Opened {
            manifest,
            protocol,
            sha256: library.sha256.clone(),
            object,
        }),
        RResult::RErr(e) => Err(OpenFailure::Refused(read_error(&e))),
    }
}

/// The descriptors libraries were loaded through; never closed (see [`open`]).
fn kept_descriptors() -> &'static Mutex<Vec<std::fs::File>> {
    static KEPT: OnceLock<Mutex<Vec<std::fs::File>>> = OnceLock::new();
    KEPT.get_or_init(Default::default)
}

/// Checks the file and opens it (once per process per path). The checks, the digest and the
/// load all use one open file: a file swapped in between cannot be loaded unchecked.
pub(crate) fn open(
    path: &Path,
    pin: Option<&str>,
    after_check: Option<&AfterCheck>,
) -> Result<Arc<LoadedLibrary>, LoadError> {
    use std::io::Read;
    let io = |e: std::io::Error| LoadError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(LoadError::NotALibrary {
            path: path.to_owned(),
            message: "not a regular file".into(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(LoadError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let identity = FileIdentity::of(&meta);
    let mut libraries = loaded_libraries().lock().unwrap_or_else(|e| e.into_inner());
    // Hashing dominates a load (milliseconds for a release build); a file already loaded and
    // unchanged since keeps its digest.
    let sha256 = match libraries.get(path) {
        Some(c) if c.identity == identity => c.library.sha256.clone(),
        _ => {
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            file.read_to_end(&mut bytes).map_err(io)?;
            hex::encode(Sha256::digest(&bytes))
        }
    };
    if let Some(expected) = pin
        && expected != sha256
    {
        return Err(LoadError::ChecksumMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual: sha256,
        });
    }
    if let Some(cached) = libraries.get_mut(path) {
        if cached.library.sha256 != sha256 {
            return Err(LoadError::ChangedOnDisk {
                path: path.to_owned(),
                loaded: cached.library.sha256.clone(),
                now: sha256,
            });
        }
        cached.identity = identity;
        return Ok(cached.library.clone());
    }
    if let Some(hook) = after_check {
        hook(path);
    }
    // The dynamic loader opens the very file checked above, through its descriptor.
    #[cfg(target_os = "linux")]
    let by_descriptor = {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
    };
    #[cfg(not(target_os = "linux"))]
    let by_descriptor = path.to_owned();
    // The loader's messages name the descriptor; name the file instead.
    let named = |message: String| {
        message.replace(
            &by_descriptor.display().to_string(),
            &path.display().to_string(),
        )
    };
    let opened = open_plugin(&by_descriptor);
    // The dynamic loader knows the library by that `/proc/self/fd/N` name, and would hand the
    // same library to a later load under the same name: keep the descriptor (like the library,
    // for the life of the process) so its number is never reused.
    kept_descriptors()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(file);
    let module = opened.map_err(|e| match e {
        OpenError::NotALibrary(message) => LoadError::NotALibrary {
            path: path.to_owned(),
            message: named(message),
        },
        OpenError::NotAPlugin(message) => LoadError::NotAPlugin {
            path: path.to_owned(),
            message: named(message),
        },
        OpenError::Init(message) => LoadError::NotAPlugin {
            path: path.to_owned(),
            message: format!("its root module failed to initialize: {message}"),
        },
        OpenError::Incompatible {
            plugin_version,
            host_version,
            report,
        } => {
            let summary = summarize_report(&report);
            LoadError::IncompatibleAbi {
                path: path.to_owned(),
                host_major: host_version.split('.').next().unwrap_or("?").to_owned(),
                plugin_version,
                host_version,
                summary,
                report,
            }
        }
    })?;
    let loaded = Arc::new(LoadedLibrary { module, sha256 });
    libraries.insert(
        path.to_owned(),
        Cached {
            library: loaded.clone(),
            identity,
        },
    );
    Ok(loaded)
}

/// The lines of abi_stable's report that say what differs (its `Error:` entries with their
/// expected/found values), else its first lines; at most [`REPORT_LINES`], each prefixed `  | `.
fn summarize_report(report: &str) -> String {
    let lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut picked = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("Error:") {
            picked.extend(lines[i..].iter().take(5).copied());
        }
    }
    if picked.is_empty() {
        picked = lines.clone();
    }
    let mut summary = picked
        .iter()
        .take(REPORT_LINES)
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > REPORT_LINES {
        summary.push_str("\n  | (abi_stable's full report is logged at debug level)");
    }
    summary
}

pub(crate) fn read_manifest(
    path: &Path,
    module: &PluginModuleRef,
) -> Result<(Manifest, Option<u32>), LoadError> {
    let bad = |message: String| LoadError::BadManifest {
        path: path.to_owned(),
        message,
    };
    let json = match (module.manifest())() {
        RResult::ROk(json) => json,
        RResult::RErr(e) => return Err(bad(read_error(&e).to_string())),
    };
    let manifest: Manifest =
        serde_json::from_str(json.as_str()).map_err(|e| bad(format!("unreadable: {e}")))?;
    manifest.validate().map_err(bad)?;
    let protocol = manifest.negotiate(SUPPORTED_PROTOCOLS);
    Ok((manifest, protocol))
}

pub(crate) fn incompatible_protocol(path: &Path, manifest: &Manifest) -> LoadError {
    LoadError::IncompatibleProtocol {
        path: path.to_owned(),
        plugin: manifest.protocols.clone(),
        host: SUPPORTED_PROTOCOLS.to_vec(),
        plugin_api: manifest.api_version.clone(),
        host_api: payhost_provider_api::API_VERSION.to_owned(),
    }
}
