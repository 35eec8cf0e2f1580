//! The `payhost` command: `check`, `inspect` and `serve`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use payhost::config::LogFormat;
use payhost::{Config, Inspection, LoadReport, Loader};
use payhost_provider_api::Capabilities;
use tracing_subscriber::EnvFilter;

/// `println!` that treats a closed stdout (`payhost check | head -1`) as the end of the
/// command's output: it exits quietly with success instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            stdout_failed(e);
        }
    }};
}

/// What a write to stdout that failed means: a reader that went away ends the command (exit 0);
/// anything else is reported.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write the output: {e}");
    std::process::exit(1);
}

/// The payment-session host.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and instantiate every enabled provider of a config and report on each.
    /// Exits 0 only if all loaded.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print one library's manifest, with no config.
    Inspect {
        /// A library file, or a bare library name looked up in --plugin-dir.
        library: PathBuf,
        /// Where bare names are looked up (default: the payhost executable's folder).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start the host and its HTTP API.
    Serve {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen address (default: `[server] listen` of the config). Port 0 picks a free port;
        /// the address is printed as `listening on http://…`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Serve one provider library for a host, over the socket it gives (started by the host for
    /// `isolation = "process"`; not for people).
    #[command(hide = true)]
    Worker {
        /// The host's socket.
        #[arg(long)]
        socket: PathBuf,
        /// The address-space limit, in MiB.
        #[arg(long)]
        max_memory_mb: Option<u64>,
    },
    /// List the hosts sharing the store: live and expired, with the open attempts each owns.
    Hosts {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The vendor kit: start a provider crate, or test a built library.
    Provider {
        #[command(subcommand)]
        action: ProviderAction,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// The outbox's deliveries to `[[events.endpoints]]`: list the parked ones, send them again.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// List the attempts whose outcome is open, or settle one (`attempts resolve`).
    Attempts {
        /// The config file.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<AttemptsAction>,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    /// List the deliveries parked after their retry period (later events of their sessions wait
    /// behind them).
    Failed {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send parked deliveries again, with a fresh retry period (works beside a running host).
    Redeliver {
        /// A delivery id (`evt_…:<endpoint>`, from `payhost events failed`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every parked delivery to the endpoints configured.
        #[arg(long)]
        all: bool,
        /// Who sends them again (default: $USER), recorded on each.
        #[arg(long)]
        by: Option<String>,
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AttemptsAction {
    /// Settle an open attempt after checking with the processor by hand. Recorded with who, when
    /// and why.
    Resolve {
        /// The attempt id (`att_…`).
        id: String,
        /// What happened at the processor.
        #[arg(long = "as", value_enum)]
        outcome: Resolved,
        /// Why you know (a dashboard reference, a ticket).
        #[arg(long)]
        note: String,
        /// Who resolves it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProviderAction {
    /// Write a ready provider crate (a cdylib on payhost-provider-api, options with validation,
    /// unit tests, a README, an example config); no network needed.
    New {
        /// The provider's name and id: a-z, 0-9 and `_`, starting with a letter.
        name: String,
        /// Where to write it (default: ./payhost-provider-<name>); must be empty or absent.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Depend on the provider-api source in this folder instead of the registry.
        #[arg(long)]
        api_path: Option<PathBuf>,
    },
    /// Check a built provider library as the host loads it: manifest, options, every
    /// operation, idempotency, retrieve, concurrency, deadlines, webhooks, secrets, latency.
    /// Exits 0 only if no check failed.
    Test {
        /// The built library (`target/release/libpayhost_provider_x.so`).
        library: PathBuf,
        /// A TOML file holding the options table.
        #[arg(long)]
        options: Option<PathBuf>,
        /// A TOML scenario: amounts, test inputs, the webhook signing scheme.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Run it in a worker process (`process`) instead of in this one.
        #[arg(long, default_value = "in_process")]
        isolation: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also write a JUnit XML report to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make a new API key: prints the secret (once) and the `[[api_keys]]` table to paste into
    /// the config, which holds only the key's digest.
    New {
        /// What it may do: read, payments, operator (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        scope: Vec<String>,
        /// Its id (default: a random one); a-z, 0-9, `-` and `_`.
        #[arg(long)]
        id: Option<String>,
        /// A rate limit: requests per second (bursts of twice that).
        #[arg(long)]
        rate_per_second: Option<f64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Resolved {
    Succeeded,
    Failed,
}

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;
/// Exit code for providers that failed to load.
const EXIT_PROVIDERS: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, json } => check(&config, json),
        Command::Inspect {
            library,
            plugin_dir,
            json,
        } => inspect(&library, plugin_dir, json),
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Hosts { config, json } => hosts(&config, json),
        Command::Worker {
            socket,
            max_memory_mb,
        } => payhost::worker::run(&socket, max_memory_mb),
        Command::Provider {
            action:
                ProviderAction::New {
                    name,
                    dir,
                    api_path,
                },
        } => provider_new(&name, dir.as_deref(), api_path.as_deref()),
        Command::Provider {
            action:
                ProviderAction::Test {
                    library,
                    options,
                    scenario,
                    isolation,
                    json,
                    junit,
                },
        } => provider_test(
            &library,
            options.as_deref(),
            scenario.as_deref(),
            &isolation,
            json,
            junit.as_deref(),
        ),
        Command::Keys {
            action:
                KeysAction::New {
                    scope,
                    id,
                    rate_per_second,
                },
        } => new_key(&scope, id, rate_per_second),
        Command::Events { action } => events(action),
        Command::Attempts {
            config,
            json,
            action,
        } => {
            let Some(config) = config else {
                eprintln!("error: --config <file> is required");
                return ExitCode::from(EXIT_CONFIG);
            };
            attempts(&config, json, action)
        }
    }
}

fn provider_new(name: &str, dir: Option<&Path>, api_path: Option<&Path>) -> ExitCode {
    match payhost::vendor::new_provider(name, dir, api_path) {
        Ok(made) => {
            say!("wrote {}:", made.dir.display());
            for f in &made.files {
                say!("  {f}");
            }
            say!("depends on {}", made.api_dependency);
            say!();
            say!("next:");
            say!("  cd {}", made.dir.display());
            say!("  cargo test && cargo build --release");
            say!(
                "  payhost provider test target/release/{}{}{} --options options.toml --scenario scenario.toml",
                std::env::consts::DLL_PREFIX,
                made.lib,
                std::env::consts::DLL_SUFFIX
            );
            say!("  payhost check --config payhost.example.toml");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn provider_test(
    library: &Path,
    options: Option<&Path>,
    scenario: Option<&Path>,
    isolation: &str,
    json: bool,
    junit: Option<&Path>,
) -> ExitCode {
    use payhost::vendor::conformance::{self, Verdict};
    if !matches!(isolation, "in_process" | "process") {
        eprintln!("error: --isolation is `in_process` or `process`, not `{isolation}`");
        return ExitCode::from(EXIT_CONFIG);
    }
    let options = match options {
        None => toml::Table::new(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
        {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: --options {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let scenario = match scenario {
        None => conformance::Scenario::default(),
        Some(path) => match conformance::read_scenario(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: --scenario {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let library = std::fs::canonicalize(library).unwrap_or_else(|_| library.to_path_buf());
    // Everything the provider logs is kept, to look for secrets in; none of it is printed.
    let logs = conformance::LogCapture::default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(logs.clone())
        .try_init();
    let target = conformance::Target {
        library,
        options,
        isolation: isolation.to_owned(),
        worker: std::env::current_exe().ok(),
    };
    let runtime = match runtime(true) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let report = runtime.block_on(conformance::run(&target, &scenario, &logs));
    if let Some(path) = junit
        && let Err(e) = std::fs::write(path, report.junit())
    {
        eprintln!("error: --junit {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        match &report.manifest {
            Some(m) => say!(
                "payhost provider test: {} {} ({}, {})",
                m.id,
                m.version,
                report.library.display(),
                report.isolation
            ),
            None => say!("payhost provider test: {}", report.library.display()),
        }
        for c in &report.checks {
            let mark = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "SKIP",
            };
            say!("  {mark}  {:<28} {}", c.name, c.expected);
            if c.verdict != Verdict::Pass || c.name == "latency" {
                say!("        {:<28} got: {}", "", c.got);
            }
        }
        say!(
            "{} checks: {} passed, {} failed, {} skipped",
            report.checks.len(),
            report.count(Verdict::Pass),
            report.count(Verdict::Fail),
            report.count(Verdict::Skip)
        );
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The async runtime of a command (`multi_thread` for those that serve or call providers at
/// once); a failure to start it is reported and becomes the exit code.
fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn hosts(path: &Path, json: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging("warn", config.log.format);
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        if config.storage.url.starts_with("sqlite://") {
            say!(
                "one host per SQLite file: no leases (the file's lock names the host that has it)"
            );
            return ExitCode::SUCCESS;
        }
        let store = match payhost::engine::open_store(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {}", config.redact(&e.to_string()));
                return ExitCode::FAILURE;
            }
        };
        let (hosts, now) = match (store.hosts().await, store.now_ms().await) {
            (Ok(h), Ok(n)) => (h, n),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("error[{}]: {e}", e.code());
                return ExitCode::FAILURE;
            }
        };
        if json {
            say!(
                "{}",
                serde_json::to_string_pretty(&hosts).unwrap_or_default()
            );
            return ExitCode::SUCCESS;
        }
        if hosts.is_empty() {
            say!("no hosts registered");
        }
        for h in &hosts {
            let lease = h.lease_expires_at - now;
            say!(
                "{}  {:<7} epoch {:<4} {}  open attempts {}  ({})",
                h.host_id,
                if h.live { "live" } else { "expired" },
                h.epoch,
                if lease >= 0 {
                    format!("lease ends in {} ms", lease)
                } else {
                    format!("lease lapsed {} s ago", -lease / 1000)
                },
                h.open_attempts,
                h.info
            );
        }
        ExitCode::SUCCESS
    })
}

fn new_key(scopes: &[String], id: Option<String>, rate: Option<f64>) -> ExitCode {
    for s in scopes {
        if payhost::auth::Scope::parse(s).is_none() {
            eprintln!("error: unknown scope `{s}`: the scopes are read, payments and operator");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let id =
        id.unwrap_or_else(|| format!("key-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    if !payhost::auth::valid_key_id(&id) {
        eprintln!("error: key id `{id}` must be 1 to 64 of a-z, 0-9, `-` and `_`");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(why) = rate.and_then(|rate| {
        payhost::auth::RateLimit {
            rate,
            burst: (rate * 2.0).max(1.0),
        }
        .invalid()
    }) {
        eprintln!("error: --rate-per-second: {why}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (secret, digest) = payhost::auth::generate(&id);
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    let env = format!(
        "PAYHOST_KEY_{}_DIGEST",
        id.to_ascii_uppercase().replace('-', "_")
    );
    say!("{secret}");
    say!();
    say!("# The line above is the key: give it to its client now, it is not shown again.");
    say!("# payhost keeps only its digest. Paste this into the config:");
    say!("[[api_keys]]");
    say!("id = \"{id}\"");
    say!("digest = \"{digest}\"   # or \"${{{env}}}\" with {env}={digest}");
    say!("scopes = [{}]", scopes.join(", "));
    if let Some(rate) = rate {
        say!("rate_per_second = {rate}");
        say!("burst = {}", (rate * 2.0).max(1.0));
    }
    ExitCode::SUCCESS
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|e| {
        eprintln!("error[{}]: {e}", e.kind.code());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn check(path: &Path, json: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The report is the output; logs carry only what the providers themselves warn about.
    init_logging("warn,payhost::plugins=off", config.log.format);
    let report = Loader::new(&config).load_all(&config);
    let disabled: Vec<&str> = config
        .providers
        .iter()
        .filter(|p| !p.enabled)
        .map(|p| p.id.as_str())
        .collect();
    let durability = postgres_durability(&config);
    if json {
        let mut out = check_json(&config, &report, &disabled);
        out["storage_durability"] = match &durability {
            None => serde_json::Value::Null,
            Some(Ok(d)) => serde_json::json!({"report": d, "warning": d.warning()}),
            Some(Err(e)) => serde_json::json!({"error": config.redact(&e.to_string())}),
        };
        say!("{out}");
    } else {
        print_check(&config, &report, &disabled);
        match &durability {
            None => {}
            Some(Ok(d)) => {
                say!(
                    "storage {} ; synchronous_commit {} ; synchronous standbys {} ({})",
                    if d.primary { "primary" } else { "STANDBY" },
                    d.synchronous_commit,
                    d.synchronous_standbys,
                    if d.synchronous_standby_names.is_empty() {
                        "none named"
                    } else {
                        &d.synchronous_standby_names
                    }
                );
                if let Some(w) = d.warning() {
                    say!("WARN    {w}");
                }
            }
            Some(Err(e)) => say!(
                "WARN    cannot reach the store: {}",
                config.redact(&e.to_string())
            ),
        }
    }
    if payhost::http::listeners::plan(&config, None).is_err() {
        ExitCode::from(EXIT_CONFIG)
    } else if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROVIDERS)
    }
}

/// For a PostgreSQL store: how durable an acknowledged write is on the server the URL reaches.
fn postgres_durability(
    config: &Config,
) -> Option<Result<payhost::store::postgres::Durability, payhost::store::StoreError>> {
    let url = &config.storage.url;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return None;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    Some(runtime.block_on(payhost::store::postgres::durability(
        url,
        Duration::from_millis(config.storage.connect_timeout_ms),
    )))
}

fn capability_names(c: &Capabilities) -> Vec<&'static str> {
    [
        (c.partial_capture, "partial_capture"),
        (c.multiple_captures, "multiple_captures"),
        (c.partial_refund, "partial_refund"),
        (c.update_amount, "update_amount"),
        (c.async_authorization, "async_authorization"),
        (c.webhooks, "webhooks"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

/// What `serve` would run with: listeners, auth, limits and timeouts (never a secret).
fn server_summary(config: &Config) -> serde_json::Value {
    let s = &config.server;
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
    let keys: Vec<_> = config
        .api_keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id,
                "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "rate_per_second": k.rate.map(|r| r.rate),
                "burst": k.rate.map(|r| r.burst),
            })
        })
        .collect();
    let auth = if !config.api_keys.is_empty() {
        "keys"
    } else if s.auth == payhost::config::AuthMode::None {
        "none"
    } else {
        "none: no keys, loopback only"
    };
    let (listeners, refused) = match payhost::http::listeners::plan(config, None) {
        Ok(plans) => (plans, None),
        Err(e) => (
            Vec::new(),
            Some(serde_json::json!({"code": e.code(), "message": e.to_string()})),
        ),
    };
    let warnings: Vec<String> = config
        .events
        .endpoints
        .iter()
        .filter(|p| payhost::events::clear_text_on_a_network(&p.url))
        .map(|p| {
            format!(
                "event endpoint `{}` gets events in clear text ({}): they are signed, but anyone on the way reads them; use https",
                p.id,
                payhost::events::redact_endpoint_url(&p.url)
            )
        })
        .collect();
    serde_json::json!({
        "listen": s.listen.to_string(),
        "admin_listen": s.admin_listen.map(|a| a.to_string()),
        "tls": s.tls.is_some(),
        "warnings": warnings,
        "listeners": listeners,
        "refused": refused,
        "auth": auth,
        "api_keys": keys,
        "header_timeout_ms": s.header_timeout_ms,
        "body_timeout_ms": s.body_timeout_ms,
        "idle_timeout_ms": s.idle_timeout_ms,
        "shutdown_grace_ms": s.shutdown_grace_ms,
        "max_connections": s.connection_limit(nofile),
        "max_connections_from": if s.max_connections.is_some() { "config" } else { "open-file limit" },
        "open_files": nofile,
        "storage": payhost::config::redact_url(&config.redact(&config.storage.url)),
        "events": events_summary(&config.events),
    })
}

fn events_summary(e: &payhost::events::EventSettings) -> serde_json::Value {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    serde_json::json!({
        "retention_ms": ms(e.retention),
        "poll_ms": ms(e.poll),
        "claim_ms": ms(e.claim),
        "max_wait_ms": ms(e.max_wait),
        "endpoints": e.endpoints.iter().map(|p| serde_json::json!({
            "id": p.id,
            "url": payhost::events::redact_endpoint_url(&p.url),
            "types": p.types,
            "timeout_ms": ms(p.timeout),
            "retry_base_ms": ms(p.retry_base),
            "retry_max_ms": ms(p.retry_max),
            "retry_for_ms": ms(p.retry_for),
        })).collect::<Vec<_>>(),
    })
}

fn print_check(config: &Config, report: &LoadReport, disabled: &[&str]) {
    say!("config {}", config.path.display());
    let s = server_summary(config);
    say!(
        "server  listen {}{}{}",
        s["listen"].as_str().unwrap_or(""),
        s["admin_listen"]
            .as_str()
            .map(|a| format!(", admin {a}"))
            .unwrap_or_default(),
        if s["tls"] == true { ", TLS" } else { "" }
    );
    say!("        auth {}", s["auth"].as_str().unwrap_or(""));
    for l in s["listeners"].as_array().into_iter().flatten() {
        say!(
            "        {} listener {}://{} ({}): {}; who: {}",
            l["name"].as_str().unwrap_or(""),
            l["scheme"].as_str().unwrap_or(""),
            l["address"].as_str().unwrap_or(""),
            if l["network"] == true {
                "reachable from the network"
            } else {
                "loopback only"
            },
            l["serves"].as_str().unwrap_or(""),
            l["auth"].as_str().unwrap_or("")
        );
    }
    if let Some(message) = s["refused"]["message"].as_str() {
        say!(
            "ERROR   serve refuses these listeners [{}]: {message}",
            s["refused"]["code"].as_str().unwrap_or("")
        );
    }
    for k in s["api_keys"].as_array().into_iter().flatten() {
        say!(
            "        key {} scopes {}{}",
            k["id"].as_str().unwrap_or(""),
            k["scopes"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            k["rate_per_second"]
                .as_f64()
                .map(|r| format!(", {r}/s burst {}", k["burst"]))
                .unwrap_or_default()
        );
    }
    say!(
        "        timeouts header {} ms, body {} ms, idle {} ms, shutdown grace {} ms",
        s["header_timeout_ms"],
        s["body_timeout_ms"],
        s["idle_timeout_ms"],
        s["shutdown_grace_ms"]
    );
    say!(
        "        max {} connections (from the {}; open-file limit {})",
        s["max_connections"],
        s["max_connections_from"].as_str().unwrap_or(""),
        s["open_files"]
    );
    say!("storage {}", s["storage"].as_str().unwrap_or(""));
    let e = &s["events"];
    say!(
        "events  kept {} ms after delivery, long-poll up to {} ms",
        e["retention_ms"],
        e["max_wait_ms"]
    );
    for w in s["warnings"].as_array().into_iter().flatten() {
        say!("WARN    {}", w.as_str().unwrap_or(""));
    }
    for p in e["endpoints"].as_array().into_iter().flatten() {
        say!(
            "        endpoint {} {} types {}, timeout {} ms, retried {}..{} ms apart for {} ms, then parked",
            p["id"].as_str().unwrap_or(""),
            p["url"].as_str().unwrap_or(""),
            p["types"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            p["timeout_ms"],
            p["retry_base_ms"],
            p["retry_max_ms"],
            p["retry_for_ms"]
        );
    }
    for p in report.providers.iter() {
        let m = p.manifest();
        say!("ok    {}", p.id());
        say!("      provider      {} ({}) {}", m.name, m.id, m.version);
        say!(
            "      api           provider-api {}, protocol {}",
            m.api_version,
            p.protocol()
        );
        say!(
            "      capabilities  {}",
            capability_names(&m.capabilities).join(", ")
        );
        say!(
            "      limits        timeout {} ms, max {} concurrent calls",
            p.timeout().as_millis(),
            p.max_concurrency()
        );
        say!("      isolation     {}", p.isolation().0);
        say!("      library       {}", p.library().path.display());
        say!("      sha256        {}", p.library().sha256);
    }
    for f in &report.failures {
        say!("FAIL  {}", f.id);
        for line in f.error.to_string().lines() {
            say!("      {line}");
        }
        say!("      code          {}", f.error.code());
    }
    for id in disabled {
        say!("off   {id} (enabled = false)");
    }
    say!(
        "{} loaded, {} failed, {} disabled",
        report.providers.len(),
        report.failures.len(),
        disabled.len()
    );
}

fn check_json(config: &Config, report: &LoadReport, disabled: &[&str]) -> serde_json::Value {
    let loaded: Vec<_> = report
        .providers
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id(),
                "manifest": p.manifest(),
                "protocol": p.protocol(),
                "library": p.library().path,
                "sha256": p.library().sha256,
                "timeout_ms": p.timeout().as_millis() as u64,
                "max_concurrency": p.max_concurrency(),
                "isolation": p.isolation().0,
            })
        })
        .collect();
    let failed: Vec<_> = report
        .failures
        .iter()
        .map(|f| serde_json::json!({"id": f.id, "code": f.error.code(), "message": f.error.to_string()}))
        .collect();
    serde_json::json!({
        "config": config.path,
        "server": server_summary(config),
        "loaded": loaded,
        "failed": failed,
        "disabled": disabled,
    })
}

fn inspect(library: &Path, plugin_dir: Option<PathBuf>, json: bool) -> ExitCode {
    init_logging("warn", LogFormat::Text);
    let loader = match plugin_dir {
        Some(dir) => Loader::with_plugin_dir(dir),
        None => Loader::with_plugin_dir(
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Into::into))
                .unwrap_or_else(|| PathBuf::from(".")),
        ),
    };
    match loader.inspect(library) {
        Ok(i) if json => {
            say!(
                "{}",
                serde_json::json!({
                    "manifest": i.manifest,
                    "protocol": i.protocol,
                    "library": i.library.path,
                    "sha256": i.library.sha256,
                    "isolation": ["in_process", "process"],
                })
            );
            ExitCode::SUCCESS
        }
        Ok(i) => {
            print_inspection(&i);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error[{}]: {e}", e.code());
            ExitCode::from(EXIT_PROVIDERS)
        }
    }
}

fn print_inspection(i: &Inspection) {
    let m = &i.manifest;
    say!("id            {}", m.id);
    say!("name          {}", m.name);
    say!("version       {}", m.version);
    if !m.description.is_empty() {
        say!("description   {}", m.description);
    }
    say!("api version   {}", m.api_version);
    say!(
        "protocols     {:?} (this host: {})",
        m.protocols,
        i.protocol
            .map(|p| format!("speaks {p}"))
            .unwrap_or_else(|| "none in common".into())
    );
    say!(
        "capabilities  {}",
        capability_names(&m.capabilities).join(", ")
    );
    say!("library       {}", i.library.path.display());
    say!("sha256        {}", i.library.sha256);
    // Isolation is the operator's choice per provider, not the library's: say what it can be.
    say!(
        "isolation     loaded in_process here; any library also runs in a worker (isolation = \"process\"), see `payhost check` for a config's choice"
    );
}

fn serve(path: &Path, listen: Option<std::net::SocketAddr>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.level, config.log.format);
    let server = &config.server;
    // The safe default: an API that moves money is not put on a network without keys, nor
    // operator keys in clear text, unless the operator says so.
    let plans = match payhost::http::listeners::plan(&config, listen) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error[{}]: {e}", e.code());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut acceptors = Vec::new();
    for p in &plans {
        acceptors.push(match &p.tls {
            None => None,
            Some((cert, key)) => match payhost::http::edge::tls_acceptor(cert, key) {
                Ok(acceptor) => Some(acceptor),
                Err(e) => {
                    eprintln!("error[tls.invalid]: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
        });
    }
    let address = plans[0].address;
    let tls = acceptors[0].clone();
    let admin_tls = acceptors.get(1).cloned().flatten();
    // Many connections need many descriptors: take what the hard limit allows.
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("could not raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let runtime = match runtime(true) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let report = Loader::new(&config).load_all(&config);
    let failed: Vec<(String, String)> = report
        .failures
        .iter()
        .map(|f| (f.id.clone(), f.error.to_string()))
        .collect();
    let host = match runtime.block_on(payhost::Host::open(&config, report.providers)) {
        // A test hook: this host's clock set off by PAYHOST_TEST_CLOCK_SKEW_MS (a host whose
        // clock is wrong). On a shared store, only the database's clock decides ownership.
        Ok(host) => std::sync::Arc::new(match skewed_clock() {
            Some(clock) => host.with_clock(clock),
            None => host,
        }),
        Err(e) => {
            tracing::error!("cannot open the host: {}", config.redact(&e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    let bind = |address: std::net::SocketAddr| {
        runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .map_err(|e| {
                tracing::error!("cannot listen on {address}: {e}");
                ExitCode::FAILURE
            })
    };
    let listener = match bind(address) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let admin_listener = match server.admin_listen.map(bind).transpose() {
        Ok(l) => l,
        Err(code) => return code,
    };
    let bound = listener.local_addr().map_or(address, |a| a);
    let mut state = payhost::http::AppState::new(host.clone(), failed.clone())
        .with_body_timeout(Duration::from_millis(server.body_timeout_ms));
    if !config.api_keys.is_empty() {
        state = state.with_keys(payhost::auth::Keys::new(config.api_keys.clone()));
    } else if server.auth == payhost::config::AuthMode::Keys {
        state = state.with_loopback_hosts_only();
    }
    if admin_listener.is_some() {
        state = state.with_admin_apart();
    }
    let edge = payhost::http::edge::EdgeSettings {
        name: "api",
        header_timeout: Duration::from_millis(server.header_timeout_ms),
        idle_timeout: Duration::from_millis(server.idle_timeout_ms),
        max_connections: server.connection_limit(nofile),
        shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
        write_timeout: Duration::from_millis(server.write_timeout_ms),
        tls,
    };
    let (reconciler, deliverer) = {
        let _entered = runtime.enter();
        (host.spawn_reconciler(), host.spawn_deliverer())
    };
    let scheme = if edge.tls.is_some() { "https" } else { "http" };
    let auth = if !config.api_keys.is_empty() {
        format!("{} API keys", config.api_keys.len())
    } else if server.auth == payhost::config::AuthMode::None {
        "none (auth = \"none\")".to_owned()
    } else {
        "none (no keys; loopback only)".to_owned()
    };
    tracing::info!(
        config = %config.path.display(),
        storage = %payhost::config::redact_url(&config.redact(&config.storage.url)),
        loaded = host.providers().len(),
        failed = failed.len(),
        open_files = nofile,
        max_connections = edge.max_connections,
        auth = %auth,
        "payhost ready on {scheme}://{bound}"
    );
    say!("listening on {scheme}://{bound}");
    let grace = edge.shutdown_grace;
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let admin = admin_listener.map(|l| {
        let admin_bound = l.local_addr().map_or(address, |a| a);
        let admin_scheme = if admin_tls.is_some() { "https" } else { "http" };
        say!("admin listening on {admin_scheme}://{admin_bound}");
        let settings = payhost::http::edge::EdgeSettings {
            name: "admin",
            max_connections: 256,
            tls: admin_tls.clone(),
            ..edge.clone()
        };
        let app = payhost::http::admin_router(state.clone());
        let mut stopped = stop.subscribe();
        runtime.spawn(payhost::http::edge::serve(l, app, settings, async move {
            let _ = stopped.recv().await;
        }))
    });
    let app = payhost::http::router(state);
    // One bound for the whole stop: from the signal, `shutdown_grace_ms` for the requests and
    // the provider calls in progress together, then the process ends.
    let stopping_at = std::sync::Arc::new(std::sync::OnceLock::new());
    let signalled = stopping_at.clone();
    runtime.block_on(payhost::http::edge::serve(
        listener,
        app,
        edge,
        async move {
            shutdown_signal().await;
            let _ = signalled.set(std::time::Instant::now());
            tracing::info!(
                "shutting down: requests and provider calls in progress have {} ms to finish",
                grace.as_millis()
            );
            let _ = stop.send(());
        },
    ));
    let deadline = *stopping_at.get_or_init(std::time::Instant::now) + grace;
    if let Some(admin) = admin {
        let _ = runtime.block_on(async { tokio::time::timeout_at(deadline.into(), admin).await });
    }
    reconciler.abort();
    deliverer.abort();
    let stop_workers = host.clone();
    // Calls still running keep their attempts in flight (the next start, or another host once
    // this one's lease lapsed, reconciles them); once they return, or the grace period ends, the
    // lease goes, so other hosts take over at once instead of after it lapses.
    runtime.block_on(async {
        while host.providers().iter().any(|p| p.calls_in_progress() > 0)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ =
            tokio::time::timeout(left.max(Duration::from_millis(500)), host.release_lease()).await;
    });
    let unfinished: usize = stop_workers
        .providers()
        .iter()
        .map(|p| p.calls_in_progress())
        .sum();
    if unfinished > 0 {
        tracing::warn!(
            calls = unfinished,
            "stopping with provider calls still running: their attempts stay open and are reconciled at the next start"
        );
    }
    for p in stop_workers.providers().iter() {
        p.stop();
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::SUCCESS
}

/// The system clock set off by `PAYHOST_TEST_CLOCK_SKEW_MS`, for tests of hosts with wrong
/// clocks.
fn skewed_clock() -> Option<std::sync::Arc<dyn payhost::Clock>> {
    struct Skewed(i64);
    impl payhost::Clock for Skewed {
        fn now_unix_ms(&self) -> i64 {
            payhost::Clock::now_unix_ms(&payhost::SystemClock) + self.0
        }
    }
    let skew: i64 = std::env::var("PAYHOST_TEST_CLOCK_SKEW_MS")
        .ok()?
        .parse()
        .ok()?;
    tracing::warn!(skew_ms = skew, "this host's clock is set off for a test");
    Some(std::sync::Arc::new(Skewed(skew)))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn attempts(path: &Path, json: bool, action: Option<AttemptsAction>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging("warn", config.log.format);
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let store = match payhost::engine::open_store(&config).await {
            Ok(s) => s,
            // A running host has the embedded database: it can still be read beside it.
            Err(payhost::engine::OpenError::Store(payhost::store::StoreError::Locked(why)))
                if action.is_none() =>
            {
                match payhost::engine::open_store_read_only(&config) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: {why} ({e})");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Err(payhost::engine::OpenError::Store(payhost::store::StoreError::Locked(why))) => {
                eprintln!(
                    "error[store.locked]: {why}. Resolve through that host instead: POST /v1/attempts/<id>/resolve (it knows which calls are still running)"
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // No providers: listing and resolving never call one.
        let providers = payhost::Providers::default();
        let settings = payhost::engine::reconcile_settings(&config, &providers);
        let host = payhost::Host::new(store, providers).with_reconcile(settings);
        match action {
            None => match host.open_attempts().await {
                Ok(list) if json => {
                    say!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(list) => {
                    print_attempts(&list);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error[{}]: {e}", e.code());
                    ExitCode::FAILURE
                }
            },
            Some(AttemptsAction::Resolve {
                id,
                outcome,
                note,
                by,
            }) => {
                let by = by
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_else(|| "operator".into());
                let as_ = match outcome {
                    Resolved::Succeeded => payhost::engine::ResolveAs::Succeeded,
                    Resolved::Failed => payhost::engine::ResolveAs::Failed,
                };
                match host.resolve_attempt(&id, as_, &by, &note, None).await {
                    Ok(a) if json => {
                        say!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(a) => {
                        say!(
                            "{} {} {} {} resolved as {} by {}",
                            a.id,
                            a.operation,
                            a.amount,
                            a.currency_code,
                            a.state.as_str(),
                            by
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error[{}]: {e}", e.code());
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

fn events(action: EventsAction) -> ExitCode {
    let path = match &action {
        EventsAction::Failed { config, .. } | EventsAction::Redeliver { config, .. } => config,
    };
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging("warn", config.log.format);
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let store = match payhost::engine::open_store_for_outbox(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // No providers: deliveries never call one.
        let host = payhost::Host::new(store, payhost::Providers::default())
            .with_events(config.events.clone());
        let result = match action {
            EventsAction::Failed { json, .. } => {
                host.parked_deliveries(10_000).await.map(|list| {
                    if json {
                        say!(
                            "{}",
                            serde_json::to_string_pretty(&list).unwrap_or_default()
                        );
                    } else {
                        print_deliveries(&list);
                    }
                })
            }
            EventsAction::Redeliver { id, by, .. } => {
                let by = by
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_else(|| "operator".into());
                host.redeliver(id.as_deref(), &by, None).await.map(|n| {
                    say!(
                        "{n} deliver{} pending again; the running host sends {} within [events] poll_ms",
                        if n == 1 { "y is" } else { "ies are" },
                        if n == 1 { "it" } else { "them" }
                    );
                })
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error[{}]: {e}", e.code());
                ExitCode::FAILURE
            }
        }
    })
}

fn print_deliveries(list: &[payhost::events::Delivery]) {
    if list.is_empty() {
        say!("no parked deliveries");
        return;
    }
    for d in list {
        say!(
            "{}  endpoint {}  event {}  tries {}{}",
            d.id,
            d.endpoint_id,
            d.event_seq,
            d.attempts,
            d.last_error
                .as_ref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default(),
        );
    }
    say!(
        "{} parked; `payhost events redeliver <id>` or `--all` sends them again",
        list.len()
    );
}

fn print_attempts(list: &[payhost::domain::Attempt]) {
    if list.is_empty() {
        say!("no open attempts");
        return;
    }
    for a in list {
        say!(
            "{}  {:<14} {:<9} {} {}  session {}{}  provider {}  checks {}{}",
            a.id,
            a.state.as_str(),
            a.operation.as_str(),
            a.amount,
            a.currency_code,
            a.session_id,
            a.payment_id
                .as_ref()
                .map(|p| format!("  payment {p}"))
                .unwrap_or_default(),
            a.provider_id,
            a.checks,
            a.error
                .as_ref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default(),
        );
    }
    say!("{} open", list.len());
}
