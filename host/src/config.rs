//! The operator's TOML config: parsed with positions, `${ENV}` interpolated, typed, validated.
//!
//! Every error names `file:line:column` and the key. Values that came from the environment are
//! treated as secrets: they are redacted from every error message and never logged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The user and group workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// As the config names it.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// The group's gid (`worker_group`, or the user's primary group).
    pub gid: u32,
}

/// A fully validated config.
#[derive(Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// That file's folder; relative paths resolve against it.
    pub dir: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[plugins] dir`, resolved; `None` means the folder of the payhost executable.
    pub plugin_dir: Option<PathBuf>,
    /// `[plugins] worker`, resolved: the payhost executable isolated providers run in
    /// (`payhost worker`); `None` means this process's own executable (set it when embedding).
    pub worker_exe: Option<PathBuf>,
    /// `[plugins] worker_user` (and `worker_group`), resolved: isolated providers' workers run
    /// as this user, so they cannot read what only the host's user may (its environment, the
    /// config, the database).
    pub worker_user: Option<WorkerUser>,
    /// `[log]`.
    pub log: LogConfig,
    /// `[reconcile]`.
    pub reconcile: ReconcileConfig,
    /// `[[api_keys]]`, validated.
    pub api_keys: Vec<crate::auth::KeySpec>,
    /// `[events]` and `[[events.endpoints]]`, validated.
    pub events: crate::events::EventSettings,
    /// `[providers.<id>]`, in id order.
    pub providers: Vec<ProviderSettings>,
    source: Source,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (relative to the config's folder).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// One `[[api_keys]]` table: a key's id, the digest of its secret (from `payhost keys new`) and
/// what it may do. The secret itself is never in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    digest: String,
    scopes: Vec<String>,
    rate_per_second: Option<f64>,
    burst: Option<f64>,
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

/// `[reconcile]`: how open outcomes are settled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Delay before the first check of an unknown outcome.
    #[serde(default = "default_first_check")]
    pub first_check_ms: u64,
    /// Inconclusive checks (backing off exponentially from 1 s) before an operator must decide.
    #[serde(default = "default_max_checks")]
    pub max_checks: u32,
    /// How long after a call's deadline it may still reach the processor. Until then a
    /// processor's "no such call" proves nothing, and the attempt stays unknown.
    #[serde(default = "default_landing_margin")]
    pub landing_margin_ms: u64,
    /// How often the background reconciler looks for due attempts.
    #[serde(default = "default_reconcile_interval")]
    pub interval_ms: u64,
}

fn default_reconcile_interval() -> u64 {
    1_000
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            first_check_ms: default_first_check(),
            max_checks: default_max_checks(),
            landing_margin_ms: default_landing_margin(),
            interval_ms: default_reconcile_interval(),
        }
    }
}

fn default_first_check() -> u64 {
    500
}

fn default_max_checks() -> u32 {
    12
}

fn default_landing_margin() -> u64 {
    10_000
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `payhost=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a provider's library is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibrarySource {
    /// `library = "name"`: `<plugin dir>/<prefix>name<suffix>` (`libname.so` on Linux).
    Name(String),
    /// `path = "…"`, resolved against the config's folder.
    Path(PathBuf),
}

/// One `[providers.<id>]` table, validated.
#[derive(Clone)]
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
    pub webhook_rate: crate::auth::RateLimit,
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
pub const DEFAULT_WEBHOOK_RATE: crate::auth::RateLimit = crate::auth::RateLimit {
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
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    storage: StorageConfig,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    reconcile: ReconcileConfig,
    #[serde(default)]
    api_keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    providers: BTreeMap<String, Spanned<RawProvider>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    retention_ms: Option<u64>,
    poll_ms: Option<u64>,
    claim_ms: Option<u64>,
    max_wait_ms: Option<u64>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    id: String,
    url: String,
    secret: String,
    types: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    retry_for_ms: Option<u64>,
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    dir: Option<PathBuf>,
    worker: Option<PathBuf>,
    worker_user: Option<String>,
    worker_group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
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

/// Validates `[events]`: each endpoint's id, URL, secret, types and timings.
fn events_settings(
    raw: RawEvents,
    span: &dyn Fn(&str) -> Option<Range<usize>>,
    invalid: &dyn Fn(Option<Range<usize>>, String, String) -> ConfigError,
) -> Result<crate::events::EventSettings, ConfigError> {
    use std::time::Duration;
    let defaults = crate::events::EventSettings::default();
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    let mut settings = crate::events::EventSettings {
        endpoints: Vec::new(),
        retention: ms(raw.retention_ms, defaults.retention),
        poll: ms(raw.poll_ms, defaults.poll),
        claim: ms(raw.claim_ms, defaults.claim),
        max_wait: ms(raw.max_wait_ms, defaults.max_wait),
    };
    if settings.max_wait > Duration::from_secs(300) {
        return Err(invalid(
            span("events.max_wait_ms"),
            "events.max_wait_ms".into(),
            "`events.max_wait_ms` must be at most 300000".into(),
        ));
    }
    if !(10..=60_000).contains(&(settings.poll.as_millis() as u64)) {
        return Err(invalid(
            span("events.poll_ms"),
            "events.poll_ms".into(),
            "`events.poll_ms` must be between 10 and 60000".into(),
        ));
    }
    for (i, spanned) in raw.endpoints.into_iter().enumerate() {
        let table = spanned.span();
        let e = spanned.into_inner();
        let at = |field: &str| format!("events.endpoints[{i}].{field}");
        let bad = |field: &str, message: String| invalid(Some(table.clone()), at(field), message);
        if !crate::auth::valid_key_id(&e.id) {
            return Err(bad(
                "id",
                format!(
                    "endpoint id `{}` must be 1 to 64 of a-z, 0-9, `-` and `_`",
                    e.id
                ),
            ));
        }
        if settings.endpoints.iter().any(|o| o.id == e.id) {
            return Err(bad("id", format!("two endpoints have the id `{}`", e.id)));
        }
        match reqwest::Url::parse(&e.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(bad(
                    "url",
                    format!(
                        "`{}` is not an http(s) URL",
                        crate::events::redact_endpoint_url(&e.url)
                    ),
                ));
            }
        }
        if e.secret.len() < 16 {
            return Err(bad(
                "secret",
                "the signing secret must be at least 16 characters (take it from the environment: \"${PAYHOST_EVENTS_SECRET}\")".into(),
            ));
        }
        let types = e.types.unwrap_or_else(|| vec!["*".into()]);
        if let Some(t) = types.iter().find(|t| !crate::events::valid_pattern(t)) {
            return Err(bad(
                "types",
                format!(
                    "`{t}` names no event type; the types are {}, and `prefix.*` or `*`",
                    crate::events::EventType::ALL
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let timeout = ms(e.timeout_ms, Duration::from_secs(10));
        let retry_for = ms(e.retry_for_ms, Duration::from_secs(3 * 24 * 3600));
        let retry_base = ms(e.retry_base_ms, Duration::from_secs(5));
        let retry_max = ms(e.retry_max_ms, Duration::from_secs(3600));
        if timeout.is_zero() || timeout > Duration::from_secs(60) {
            return Err(bad(
                "timeout_ms",
                "`timeout_ms` must be between 1 and 60000".into(),
            ));
        }
        if retry_base.is_zero() || retry_max < retry_base {
            return Err(bad(
                "retry_base_ms",
                "`retry_base_ms` must be positive and at most `retry_max_ms`".into(),
            ));
        }
        if settings.claim <= timeout + Duration::from_secs(1) {
            return Err(invalid(
                span("events.claim_ms").or(Some(table.clone())),
                "events.claim_ms".into(),
                format!(
                    "`events.claim_ms` ({} ms) must be longer than endpoint `{}`'s timeout plus a second, or another host could send an event while this one still is",
                    settings.claim.as_millis(),
                    e.id
                ),
            ));
        }
        settings.endpoints.push(crate::events::Endpoint {
            id: e.id,
            url: e.url,
            secret: e.secret,
            types,
            timeout,
            retry_for,
            retry_base,
            retry_max,
        });
    }
    Ok(settings)
}

/// What kind of config error; [`ConfigErrorKind::code`] is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Io,
    /// Not valid TOML.
    Syntax,
    /// Valid TOML, but an unknown key, a wrong type or a missing key.
    Schema,
    /// `${NAME}` names an unset environment variable.
    MissingEnv,
    /// A value that has the right type but is not acceptable.
    Invalid,
}

impl ConfigErrorKind {
    /// The stable code.
    pub const fn code(self) -> &'static str {
        match self {
            ConfigErrorKind::Io => "config.io",
            ConfigErrorKind::Syntax => "config.syntax",
            ConfigErrorKind::Schema => "config.schema",
            ConfigErrorKind::MissingEnv => "config.missing_env",
            ConfigErrorKind::Invalid => "config.invalid",
        }
    }
}

/// A position in a config file (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A config that could not be used. Its message never contains a value taken from the environment.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}{}", self.where_prefix(), self.message, self.key_suffix())]
pub struct ConfigError {
    /// What kind of error.
    pub kind: ConfigErrorKind,
    /// The file.
    pub file: PathBuf,
    /// Where in the file, when known.
    pub location: Option<Location>,
    /// The dotted key (`providers.sandbox.timeout_ms`), when known.
    pub key: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl ConfigError {
    fn where_prefix(&self) -> String {
        match &self.location {
            Some(l) => format!("{l}: "),
            None => format!("{}: ", self.file.display()),
        }
    }
    fn key_suffix(&self) -> String {
        match &self.key {
            Some(k) if !self.message.contains(k.as_str()) => format!(" (key `{k}`)"),
            _ => String::new(),
        }
    }
}

/// The raw text and the positions of every key and value, kept to point errors found later
/// (a provider refusing its options) at the right line.
#[derive(Debug, Clone)]
struct Source {
    text: String,
    /// Dotted key path → (key span, value span).
    spans: Vec<(String, Range<usize>, Range<usize>)>,
    /// Values taken from the environment, redacted from messages.
    secrets: Vec<String>,
}

/// Everything but secrets: the storage URL without its password, no provider options, no
/// key digests, no endpoint secrets.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("server", &self.server)
            .field("storage", &redact_url(&self.redact(&self.storage.url)))
            .field("plugin_dir", &self.plugin_dir)
            .field("worker_user", &self.worker_user)
            .field(
                "api_keys",
                &self
                    .api_keys
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .field(
                "event_endpoints",
                &self
                    .events
                    .endpoints
                    .iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads and validates the config at `path`, taking `${NAME}` from the process environment.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Self::from_file_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`Config::from_file`], with the environment given as a function.
    pub fn from_file_with_env(
        path: impl AsRef<Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            kind: ConfigErrorKind::Io,
            file: path.to_owned(),
            location: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(&text, path, env)
    }

    /// Validates `text` as if read from `path` (which sets the folder relative paths resolve
    /// against).
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path = absolute(path);
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        let mut source = Source {
            text: text.to_owned(),
            spans: Vec::new(),
            secrets: Vec::new(),
        };
        let mut table = DeTable::parse(text).map_err(|e| {
            source.error(
                &path,
                ConfigErrorKind::Syntax,
                e.span(),
                None,
                e.message().to_owned(),
            )
        })?;
        let mut errors = Vec::new();
        interpolate_table(table.get_mut(), "", &env, &mut source.secrets, &mut errors);
        index_spans(table.get_ref(), "", &mut source.spans);
        if let Some((span, key, message)) = errors.into_iter().next() {
            return Err(source.error(
                &path,
                ConfigErrorKind::MissingEnv,
                Some(span),
                Some(key),
                message,
            ));
        }
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(table)).map_err(|e| {
            let key = e.span().and_then(|s| source.key_at(&s));
            source.error(
                &path,
                ConfigErrorKind::Schema,
                e.span(),
                key,
                e.message().to_owned(),
            )
        })?;
        let invalid = |span: Option<Range<usize>>, key: String, message: String| {
            source.error(&path, ConfigErrorKind::Invalid, span, Some(key), message)
        };

        let mut providers = Vec::new();
        for (id, spanned) in raw.providers {
            let table_span = spanned.span();
            let p = spanned.into_inner();
            let key = |k: &str| format!("providers.{id}.{k}");
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(invalid(
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
                        return Err(invalid(
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
                    return Err(invalid(
                        Some(file.span()),
                        key("path"),
                        "give either `library` or `path`, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        Some(table_span),
                        format!("providers.{id}"),
                        format!(
                            "provider `{id}` needs `library = \"<name>\"` or `path = \"<file>\"`"
                        ),
                    ));
                }
            };
            let sha256 = match p.sha256 {
                None => None,
                Some(pin) => {
                    let span = pin.span();
                    let pin = pin.into_inner().to_ascii_lowercase();
                    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid(
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
                    return Err(invalid(
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
                    return Err(invalid(
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
                        return Err(invalid(
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
                return Err(invalid(
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
                        return Err(invalid(
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
                return Err(invalid(
                    Some(mb.span()),
                    key("max_memory_mb"),
                    "`max_memory_mb` must be between 16 and 1048576".into(),
                ));
            }
            let kill_after_ms = match &p.kill_after_ms {
                None => 2_000,
                Some(k) if (1..=600_000).contains(k.get_ref()) => *k.get_ref(),
                Some(k) => {
                    return Err(invalid(
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
                    return Err(invalid(
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

        let url = &raw.storage.url;
        if !(url.starts_with("sqlite://")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            let span = source.value_span("storage.url");
            return Err(invalid(
                span,
                "storage.url".into(),
                "`storage.url` must start with sqlite:// or postgres://".into(),
            ));
        }
        if !(1..=1000).contains(&raw.storage.pool_size) {
            return Err(invalid(
                source.value_span("storage.pool_size"),
                "storage.pool_size".into(),
                "`pool_size` must be between 1 and 1000".into(),
            ));
        }
        for (key, value) in [
            ("storage.connect_timeout_ms", raw.storage.connect_timeout_ms),
            (
                "storage.statement_timeout_ms",
                raw.storage.statement_timeout_ms,
            ),
        ] {
            if !(1..=600_000).contains(&value) {
                return Err(invalid(
                    source.value_span(key),
                    key.into(),
                    format!("`{key}` must be between 1 and 600000"),
                ));
            }
        }
        for (key, value) in [
            ("server.header_timeout_ms", raw.server.header_timeout_ms),
            ("server.body_timeout_ms", raw.server.body_timeout_ms),
            ("server.idle_timeout_ms", raw.server.idle_timeout_ms),
            ("server.shutdown_grace_ms", raw.server.shutdown_grace_ms),
            ("server.write_timeout_ms", raw.server.write_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&value) {
                return Err(invalid(
                    source.value_span(key),
                    key.into(),
                    format!("`{key}` must be between 1 and 3600000 (one hour)"),
                ));
            }
        }
        for (key, value, max) in [
            (
                "reconcile.first_check_ms",
                raw.reconcile.first_check_ms,
                3_600_000,
            ),
            (
                "reconcile.max_checks",
                u64::from(raw.reconcile.max_checks),
                100,
            ),
            (
                "reconcile.landing_margin_ms",
                raw.reconcile.landing_margin_ms,
                3_600_000,
            ),
            (
                "reconcile.interval_ms",
                raw.reconcile.interval_ms.max(1),
                600_000,
            ),
        ] {
            if value > max || (key == "reconcile.max_checks" && value == 0) {
                return Err(invalid(
                    source.value_span(key),
                    key.into(),
                    format!(
                        "`{key}` must be between {} and {max}",
                        u64::from(key == "reconcile.max_checks")
                    ),
                ));
            }
        }
        if let Some(n) = raw.server.max_connections
            && !(1..=1_000_000).contains(&n)
        {
            return Err(invalid(
                source.value_span("server.max_connections"),
                "server.max_connections".into(),
                "`max_connections` must be between 1 and 1000000".into(),
            ));
        }
        if !(100..=600_000).contains(&raw.storage.lease_ms)
            || !(10..raw.storage.lease_ms.max(11)).contains(&raw.storage.renew_ms)
        {
            return Err(invalid(
                source.value_span("storage.renew_ms"),
                "storage.renew_ms".into(),
                "`lease_ms` must be between 100 and 600000, and `renew_ms` at least 10 and shorter than the lease".into(),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&raw.log.level) {
            let span = source.value_span("log.level");
            return Err(invalid(
                span,
                "log.level".into(),
                format!("`log.level` is not a valid filter: {e}"),
            ));
        }

        let mut api_keys: Vec<crate::auth::KeySpec> = Vec::new();
        for (i, spanned) in raw.api_keys.into_iter().enumerate() {
            let span = spanned.span();
            let k = spanned.into_inner();
            let at = |field: &str| format!("api_keys[{i}].{field}");
            if !crate::auth::valid_key_id(&k.id) {
                return Err(invalid(
                    Some(span),
                    at("id"),
                    format!("key id `{}` must be 1 to 64 of a-z, 0-9, `-` and `_`", k.id),
                ));
            }
            if api_keys.iter().any(|other| other.id == k.id) {
                return Err(invalid(
                    Some(span),
                    at("id"),
                    format!("two keys have the id `{}`", k.id),
                ));
            }
            let digest = crate::auth::parse_digest(&k.digest).ok_or_else(|| {
                invalid(
                    Some(span.clone()),
                    at("digest"),
                    "`digest` must be `sha256:` and 64 hex digits, as `payhost keys new` prints it (never the key itself)".into(),
                )
            })?;
            let mut scopes = Vec::new();
            for name in &k.scopes {
                let scope = crate::auth::Scope::parse(name).ok_or_else(|| {
                    invalid(
                        Some(span.clone()),
                        at("scopes"),
                        format!(
                            "unknown scope `{name}`: the scopes are read, payments and operator"
                        ),
                    )
                })?;
                scopes.push(scope);
            }
            if scopes.is_empty() {
                return Err(invalid(
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
                    let limit = crate::auth::RateLimit { rate, burst };
                    if let Some(why) = limit.invalid() {
                        return Err(invalid(
                            Some(span),
                            at("rate_per_second"),
                            format!("`rate_per_second` / `burst`: {why}"),
                        ));
                    }
                    Some(limit)
                }
            };
            api_keys.push(crate::auth::KeySpec {
                id: k.id,
                digest,
                scopes,
                rate,
            });
        }
        if raw.server.auth == AuthMode::None && !api_keys.is_empty() {
            return Err(invalid(
                source.value_span("server.auth"),
                "server.auth".into(),
                "`auth = \"none\"` turns key checks off, but `[[api_keys]]` are configured: remove one or the other".into(),
            ));
        }
        let events = events_settings(raw.events, &|k| source.value_span(k), &invalid)?;
        let mut server = raw.server;
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
            return Err(invalid(
                source.value_span(key),
                key.into(),
                format!("`{key}` applies to the admin listener, but `admin_listen` is not set"),
            ));
        }
        if server.admin_tls.is_some() && server.admin_plaintext {
            return Err(invalid(
                source.value_span("server.admin_plaintext"),
                "server.admin_plaintext".into(),
                "`admin_plaintext = true` and `[server.admin_tls]` contradict each other: keep one"
                    .into(),
            ));
        }

        let worker_user = match (&raw.plugins.worker_user, &raw.plugins.worker_group) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    source.value_span("plugins.worker_group"),
                    "plugins.worker_group".into(),
                    "`worker_group` needs `worker_user`".into(),
                ));
            }
            (Some(user), group) => Some(resolve_worker_user(user, group.as_deref()).map_err(
                |message| {
                    let key = if message.contains("group") {
                        "plugins.worker_group"
                    } else {
                        "plugins.worker_user"
                    };
                    invalid(source.value_span(key), key.into(), message)
                },
            )?),
        };
        Ok(Config {
            dir: dir.clone(),
            plugin_dir: raw.plugins.dir.map(|d| dir.join(d)),
            worker_exe: raw.plugins.worker.map(|w| dir.join(w)),
            worker_user,
            server,
            storage: raw.storage,
            log: raw.log,
            reconcile: raw.reconcile,
            api_keys,
            events,
            providers,
            path,
            source,
        })
    }

    /// The enabled providers.
    pub fn enabled_providers(&self) -> impl Iterator<Item = &ProviderSettings> {
        self.providers.iter().filter(|p| p.enabled)
    }

    /// Where a dotted key is in the file, if present (`providers.sandbox.options.secret`).
    pub fn locate(&self, key: &str) -> Option<Location> {
        let span = self
            .source
            .spans
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, key_span, _)| key_span.clone())?;
        Some(self.source.location(&self.path, span.start))
    }

    /// Removes every value taken from the environment from `text`.
    pub fn redact(&self, text: &str) -> String {
        self.source.redact(text)
    }

    /// What is redacted from a provider's log records and error texts: the config's secrets
    /// from the environment and that provider's secret-like option values.
    pub fn redactor_for(&self, provider: &ProviderSettings) -> Redactor {
        Redactor::new(
            self.source
                .secrets
                .iter()
                .cloned()
                .chain(option_secrets(&provider.options)),
        )
    }
}

impl Source {
    fn location(&self, file: &Path, offset: usize) -> Location {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location {
            file: file.to_owned(),
            line,
            column,
        }
    }

    fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if !secret.is_empty() {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        out
    }

    /// The innermost key whose key or value span contains `span`.
    fn key_at(&self, span: &Range<usize>) -> Option<String> {
        self.spans
            .iter()
            .filter(|(_, k, v)| {
                (k.start <= span.start && span.end <= k.end)
                    || (v.start <= span.start && span.end <= v.end)
            })
            .max_by_key(|(key, _, _)| key.matches('.').count())
            .map(|(key, _, _)| key.clone())
    }

    fn value_span(&self, key: &str) -> Option<Range<usize>> {
        self.spans
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| v.clone())
    }

    fn error(
        &self,
        file: &Path,
        kind: ConfigErrorKind,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            kind,
            file: file.to_owned(),
            location: span.map(|s| self.location(file, s.start)),
            key,
            message: self.redact(&message),
        }
    }
}

/// The uid and gid of `user` (a name or a number) and `group` (default: the user's own).
fn resolve_worker_user(user: &str, group: Option<&str>) -> Result<WorkerUser, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| format!("cannot look up worker_user `{user}`: {e}"))?;
    let (uid, primary) = match (found, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw()),
        // A bare number with no passwd entry is still a uid; its group must be given.
        (None, Ok(uid)) => (uid, u32::MAX),
        (None, Err(_)) => {
            return Err(format!(
                "worker_user `{user}` does not exist on this machine"
            ));
        }
    };
    let gid = match group {
        None if primary == u32::MAX => {
            return Err(format!(
                "worker_user {uid} has no passwd entry: give its worker_group too"
            ));
        }
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(|e| format!("cannot look up worker_group `{g}`: {e}"))?
                .map(|grp| grp.gid.as_raw())
                .ok_or_else(|| format!("worker_group `{g}` does not exist on this machine"))?,
        },
    };
    if uid == 0 {
        return Err(
            "worker_user must not be root: the point is a user without the host's rights".into(),
        );
    }
    let _ = Gid::from_raw(gid);
    Ok(WorkerUser {
        name: user.to_owned(),
        uid,
        gid,
    })
}

/// Removes known secrets from text: the values taken from the environment, and a provider's
/// option values under secret-like keys (`*key*`, `*secret*`, `*token*`, `*password*`,
/// `*credential*`). Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor(std::sync::Arc<Vec<String>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.0.len())
    }
}

impl Redactor {
    /// A redactor of these secrets (empty ones and ones shorter than 4 characters are ignored:
    /// they would redact ordinary words).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut list: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        // Longest first, so a secret that contains another is removed whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        list.dedup();
        Redactor(std::sync::Arc::new(list))
    }

    /// `text` with every secret replaced by `<redacted>`.
    pub fn redact(&self, text: &str) -> String {
        self.redact_noting(text).0
    }

    /// [`Redactor::redact`], and whether anything was removed.
    pub fn redact_noting(&self, text: &str) -> (String, bool) {
        let mut out = text.to_owned();
        let mut found = false;
        for secret in self.0.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
                found = true;
            }
        }
        (out, found)
    }
}

/// The values of `options` (a provider's options, as JSON) under keys named like a secret.
pub fn option_secrets(options: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, secret_key: bool, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) if secret_key => out.push(s.clone()),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let k = k.to_ascii_lowercase();
                    let secret = secret_key
                        || ["key", "secret", "token", "password", "credential"]
                            .iter()
                            .any(|w| k.contains(w));
                    walk(v, secret, out);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    walk(v, secret_key, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(options, false, &mut out);
    out
}

/// A URL fit for a log line or `payhost check`: its password (in the authority, or a
/// `password=` query parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let start = scheme_end + 3 + colon + 1;
                let end = scheme_end + 3 + at;
                out.replace_range(start..end, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn index_spans(
    table: &DeTable<'_>,
    prefix: &str,
    out: &mut Vec<(String, Range<usize>, Range<usize>)>,
) {
    for (k, v) in table.iter() {
        let path = join_key(prefix, k.get_ref());
        out.push((path.clone(), k.span(), v.span()));
        if let DeValue::Table(t) = v.get_ref() {
            index_spans(t, &path, out);
        }
    }
}

type EnvError = (Range<usize>, String, String);

fn interpolate_table(
    table: &mut DeTable<'_>,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
    errors: &mut Vec<EnvError>,
) {
    for (k, v) in table.iter_mut() {
        let path = join_key(prefix, k.get_ref());
        interpolate_value(v, &path, env, secrets, errors);
    }
}

fn interpolate_value(
    value: &mut Spanned<DeValue<'_>>,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
    errors: &mut Vec<EnvError>,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains('$') => match interpolate(s, env, secrets) {
            Ok(new) => *s = new.into(),
            Err(message) => errors.push((span, path.to_owned(), message)),
        },
        DeValue::Table(t) => interpolate_table(t, path, env, secrets, errors),
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, secrets, errors);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` and `${NAME:-default}` (`default` when NAME is unset or empty); `$${` is a
/// literal `${`. What the environment supplied is remembered as a secret.
fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err("`${` is not closed by `}` (write `$${` for a literal `${`)".into());
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "`${{{name}}}` is not a valid environment variable name"
            ));
        }
        match (
            env(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(v), _) => {
                secrets.push(v.clone());
                out.push_str(&v);
            }
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (set it, or write `${{{name}:-default}}`)"
                ));
            }
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// TOML to JSON for the options table (datetimes become RFC 3339 strings).
fn toml_to_json(value: toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            J::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(text, Path::new("/etc/payhost/payhost.toml"), move |n| {
            vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn a_minimal_provider_gets_the_defaults() {
        let c = parse("[providers.system]\nlibrary = \"payhost_provider_system\"\n").unwrap();
        let p = &c.providers[0];
        assert_eq!(
            p.library,
            LibrarySource::Name("payhost_provider_system".into())
        );
        assert_eq!(p.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        assert!(p.enabled);
        assert_eq!(p.options, serde_json::json!({}));
        assert_eq!(c.server.listen.port(), 8080);
    }

    #[test]
    fn an_unknown_key_names_line_column_and_key() {
        let e = parse("[providers.system]\nlibrary = \"x\"\ntimeout = 5\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Schema);
        let l = e.location.clone().unwrap();
        assert_eq!((l.line, l.column), (3, 1));
        assert!(
            e.to_string().contains("/etc/payhost/payhost.toml:3:1"),
            "{e}"
        );
        assert!(e.to_string().contains("timeout"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = parse("[providers.system]\nlibrary = \"x\"\ntimeout_ms = \"fast\"\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Schema);
        assert_eq!(e.location.as_ref().unwrap().line, 3);
        assert_eq!(e.key.as_deref(), Some("providers.system.timeout_ms"), "{e}");
    }

    #[test]
    fn env_values_are_interpolated_and_redacted_from_errors() {
        let c = parse_env(
            "[providers.s]\nlibrary = \"x\"\n[providers.s.options]\nsecret = \"${S}\"\nother = \"${NOPE:-dflt}\"\nlit = \"$${S}\"\n",
            &[("S", "hunter2-secret")],
        )
        .unwrap();
        assert_eq!(c.providers[0].options["secret"], "hunter2-secret");
        assert_eq!(c.providers[0].options["other"], "dflt");
        assert_eq!(c.providers[0].options["lit"], "${S}");
        assert_eq!(c.redact("token hunter2-secret"), "token <redacted>");

        let e = parse_env(
            "[server]\nlisten = \"${ADDR}\"\n",
            &[("ADDR", "not-an-address-secret")],
        )
        .unwrap_err();
        assert!(!e.to_string().contains("not-an-address-secret"), "{e}");
        assert_eq!(e.location.unwrap().line, 2);
    }

    #[test]
    fn a_missing_env_var_is_named_with_its_position() {
        let e = parse(
            "[providers.s]\nlibrary = \"x\"\n[providers.s.options]\nkey = \"${STRIPE_KEY}\"\n",
        )
        .unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::MissingEnv);
        assert!(e.message.contains("STRIPE_KEY"));
        assert_eq!(e.location.unwrap().line, 4);
        assert_eq!(e.key.as_deref(), Some("providers.s.options.key"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c =
            parse("[plugins]\ndir = \"plugins\"\n[providers.s]\npath = \"lib/libs.so\"\n").unwrap();
        assert_eq!(c.plugin_dir.unwrap(), Path::new("/etc/payhost/plugins"));
        assert_eq!(
            c.providers[0].library,
            LibrarySource::Path("/etc/payhost/lib/libs.so".into())
        );
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let e = parse("[providers.s]\nlibrary = \"x\"\nsha256 = \"abc\"\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Invalid);
        assert_eq!(e.location.unwrap().line, 3);
        let e = parse("[providers.s]\nlibrary = \"x\"\npath = \"y\"\n").unwrap_err();
        assert!(e.message.contains("either"));
        let e = parse("[providers.s]\nenabled = true\n").unwrap_err();
        assert!(e.message.contains("library"));
        let e = parse("[providers.\"Bad Id\"]\nlibrary = \"x\"\n").unwrap_err();
        assert!(e.message.contains("a-z"));
        let e = parse("[providers.s]\nlibrary = \"x\"\ntimeout_ms = 0\n").unwrap_err();
        assert!(e.message.contains("timeout_ms"));
        let e = parse("[storage]\nurl = \"mysql://x\"\n").unwrap_err();
        assert_eq!(e.location.unwrap().line, 2);
    }

    #[test]
    fn rates_out_of_bounds_are_refused_at_load() {
        let key = "[[api_keys]]\nid = \"shop\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"read\"]\n";
        for rate in ["1e-300", "0.0", "1e12", "nan"] {
            let e = parse(&format!("{key}rate_per_second = {rate}\n")).unwrap_err();
            assert_eq!(e.kind, ConfigErrorKind::Invalid, "{rate}: {e}");
            assert!(e.message.contains("rate"), "{e}");
            assert_eq!(e.location.unwrap().line, 1, "{rate}");
        }
        assert!(parse(&format!("{key}rate_per_second = 0.5\n")).is_ok());
        let e = parse("[providers.s]\nlibrary = \"x\"\nwebhook_rate_per_second = 1e-300\n")
            .unwrap_err();
        assert_eq!(e.location.unwrap().line, 3, "{}", e.message);
        let e = parse("[providers.s]\nlibrary = \"x\"\nwebhook_burst = 1e300\n").unwrap_err();
        assert!(e.message.contains("burst"), "{e}");
    }

    #[test]
    fn debug_shows_no_secret() {
        let c = parse_env(
            "[storage]\nurl = \"postgres://app:pg-password-9@db/payhost\"\n[providers.s]\nlibrary = \"x\"\n[providers.s.options]\napi_key = \"${KEY}\"\nplain = \"literal-option-value\"\n[[events.endpoints]]\nid = \"erp\"\nurl = \"https://erp.example/hooks\"\nsecret = \"whsec_endpoint_secret_1\"\n",
            &[("KEY", "sk_live_env_secret")],
        )
        .unwrap();
        let shown = format!("{c:?} {:?}", c.providers[0]);
        for secret in [
            "pg-password-9",
            "sk_live_env_secret",
            "literal-option-value",
            "whsec_endpoint_secret_1",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("erp") && shown.contains("providers"),
            "{shown}"
        );
    }

    #[test]
    fn a_redactor_takes_env_values_and_secret_like_options() {
        let c = parse_env(
            "[providers.s]\nlibrary = \"x\"\n[providers.s.options]\nwebhook_secret = \"whsec_literal_1\"\nregion = \"eu-west\"\nnested = { auth_token = \"tok_nested_2\" }\nfrom_env = \"${E}\"\n",
            &[("E", "env-value-3")],
        )
        .unwrap();
        let r = c.redactor_for(&c.providers[0]);
        assert_eq!(
            r.redact("whsec_literal_1 tok_nested_2 env-value-3 eu-west"),
            "<redacted> <redacted> <redacted> eu-west"
        );
        assert_eq!(
            r.redact_noting("nothing here"),
            ("nothing here".into(), false)
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("[providers.s\nlibrary = \"x\"\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Syntax);
        assert_eq!(e.location.unwrap().line, 1);
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/payhost?sslmode=require"),
            "postgres://app:***@db:5432/payhost?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/payhost?user=app&password=s3cret"),
            "postgres://db/payhost?user=app&password=***"
        );
        assert_eq!(
            redact_url("sqlite://data/payhost.db"),
            "sqlite://data/payhost.db"
        );
        assert_eq!(
            redact_url("postgres://app@h1:5432,h2:5433/db"),
            "postgres://app@h1:5432,h2:5433/db"
        );
    }

    #[test]
    fn keys_can_be_located_for_later_errors() {
        let c =
            parse("[providers.s]\nlibrary = \"x\"\n\n[providers.s.options]\nmode = 1\n").unwrap();
        assert_eq!(c.locate("providers.s.options.mode").unwrap().line, 5);
    }
}
