//! The operator's TOML config: parsed with positions, `${ENV}` interpolated, typed, validated.
//!
//! Every error names `file:line:column` and the key. Values that came from the environment are
//! treated as secrets: they are redacted from every error message and never logged.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub mod events;
mod keys;
mod log;
mod plugins;
mod providers;
mod reconcile;
mod redact;
mod server;
mod storage;

use payhost_core::keys as auth;

pub use events::{Endpoint, EventSettings};
pub use log::{LogConfig, LogFormat};
pub use plugins::WorkerUser;
pub use providers::{
    DEFAULT_HTTP_MAX_RESPONSE_BYTES, DEFAULT_MAX_CONCURRENCY, DEFAULT_TIMEOUT_MS,
    DEFAULT_WEBHOOK_RATE, Isolation, LibrarySource, MAX_TIMEOUT_MS, ProviderSettings,
};
pub use reconcile::ReconcileConfig;
pub use redact::{Redactor, option_secrets, redact_url};
pub use server::{AuthMode, ServerConfig, TlsConfig};
pub use storage::{StorageConfig, StorageUrl};

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
    pub api_keys: Vec<auth::KeySpec>,
    /// `[events]` and `[[events.endpoints]]`, validated.
    pub events: crate::events::EventSettings,
    /// `[providers.<id>]`, in id order.
    pub providers: Vec<ProviderSettings>,
    source: Source,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    storage: storage::RawStorage,
    #[serde(default)]
    plugins: plugins::RawPlugins,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    reconcile: ReconcileConfig,
    #[serde(default)]
    api_keys: Vec<Spanned<keys::RawKey>>,
    #[serde(default)]
    events: events::RawEvents,
    #[serde(default)]
    providers: BTreeMap<String, Spanned<providers::RawProvider>>,
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

/// What a section's validation needs: where each key is, and how to make an error there.
pub(crate) struct Check<'a> {
    source: &'a Source,
    path: &'a Path,
}

impl Check<'_> {
    /// Where the value of a dotted key is.
    pub(crate) fn span(&self, key: &str) -> Option<Range<usize>> {
        self.source.value_span(key)
    }

    /// An invalid value at `span`, of `key`.
    pub(crate) fn invalid(
        &self,
        span: Option<Range<usize>>,
        key: String,
        message: String,
    ) -> ConfigError {
        self.source.error(
            self.path,
            ConfigErrorKind::Invalid,
            span,
            Some(key),
            message,
        )
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
            .field("storage", &self.redact(&self.storage.url.redacted()))
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
        let check = Check {
            source: &source,
            path: &path,
        };
        let providers = providers::validate(raw.providers, &dir, &check)?;
        let storage = storage::validate(raw.storage, &dir, &check)?;
        let server = server::validate(raw.server, &dir, &check)?;
        let reconcile = reconcile::validate(raw.reconcile, &check)?;
        let log = log::validate(raw.log, &check)?;
        let api_keys = keys::validate(raw.api_keys, &check)?;
        if server.auth == AuthMode::None && !api_keys.is_empty() {
            return Err(check.invalid(
                check.span("server.auth"),
                "server.auth".into(),
                "`auth = \"none\"` turns key checks off, but `[[api_keys]]` are configured: remove one or the other".into(),
            ));
        }
        let provider_ids: Vec<&str> = providers.iter().map(|p| p.id.as_str()).collect();
        let events = events::validate(raw.events, &provider_ids, &check)?;
        let worker_user = plugins::worker_user(&raw.plugins, &check)?;
        Ok(Config {
            dir: dir.clone(),
            plugin_dir: raw.plugins.dir.map(|d| dir.join(d)),
            worker_exe: raw.plugins.worker.map(|w| dir.join(w)),
            worker_user,
            server,
            storage,
            log,
            reconcile,
            api_keys,
            events,
            providers,
            path,
            source,
        })
    }

    /// The SHA-256 of the file as read (lower-case hex): what `check`, `/ready` and a reload
    /// report, so an operator sees which file a server runs. Values taken from the environment
    /// are not in it (a secret rotated there changes nothing here).
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.source.text.as_bytes()))
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
pub(crate) fn toml_to_json(value: toml::Value) -> serde_json::Value {
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
    use super::{
        Config, ConfigError, ConfigErrorKind, DEFAULT_TIMEOUT_MS, LibrarySource, Path, redact_url,
    };
    use std::time::Duration;

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
    fn an_endpoints_providers_must_be_configured_ones() {
        let endpoint = "[[events.endpoints]]\nid = \"medusa\"\nurl = \"https://shop.example/hooks\"\nsecret = \"whsec_endpoint_secret_1\"\n";
        let base = "[providers.sandbox]\nlibrary = \"x\"\n";
        let e = parse(&format!("{base}{endpoint}providers = [\"stripe\"]\n")).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Invalid);
        assert!(
            e.message.contains("`stripe` is not a configured provider"),
            "{e}"
        );
        assert!(e.message.contains("sandbox"), "{e}");
        assert_eq!(e.location.as_ref().unwrap().line, 3, "{e}");
        let e = parse(&format!("{base}{endpoint}providers = []\n")).unwrap_err();
        assert!(e.message.contains("would send nothing"), "{e}");
        let ok = parse(&format!("{base}{endpoint}providers = [\"sandbox\"]\n")).unwrap();
        assert_eq!(
            ok.events.endpoints[0].providers.as_deref(),
            Some(&["sandbox".to_owned()][..])
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
