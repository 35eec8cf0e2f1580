//! The `payhost` command: `check`, `inspect` and `serve`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use payhost::config::LogFormat;
use payhost::{Config, Inspection, LoadReport, Loader};
use payhost_provider_api::Capabilities;
use tracing_subscriber::EnvFilter;

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

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|e| {
        eprintln!("error[{}]: {e}", e.kind.code());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    if json {
        println!("{}", check_json(&config, &report, &disabled));
    } else {
        print_check(&config, &report, &disabled);
    }
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROVIDERS)
    }
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

fn print_check(config: &Config, report: &LoadReport, disabled: &[&str]) {
    println!("config {}", config.path.display());
    for p in report.providers.iter() {
        let m = p.manifest();
        println!("ok    {}", p.id());
        println!("      provider      {} ({}) {}", m.name, m.id, m.version);
        println!(
            "      api           provider-api {}, protocol {}",
            m.api_version,
            p.protocol()
        );
        println!(
            "      capabilities  {}",
            capability_names(&m.capabilities).join(", ")
        );
        println!(
            "      limits        timeout {} ms, max {} concurrent calls",
            p.timeout().as_millis(),
            p.max_concurrency()
        );
        println!("      library       {}", p.library().path.display());
        println!("      sha256        {}", p.library().sha256);
    }
    for f in &report.failures {
        println!("FAIL  {}", f.id);
        for line in f.error.to_string().lines() {
            println!("      {line}");
        }
        println!("      code          {}", f.error.code());
    }
    for id in disabled {
        println!("off   {id} (enabled = false)");
    }
    println!(
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
            println!(
                "{}",
                serde_json::json!({
                    "manifest": i.manifest,
                    "protocol": i.protocol,
                    "library": i.library.path,
                    "sha256": i.library.sha256,
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
    println!("id            {}", m.id);
    println!("name          {}", m.name);
    println!("version       {}", m.version);
    if !m.description.is_empty() {
        println!("description   {}", m.description);
    }
    println!("api version   {}", m.api_version);
    println!(
        "protocols     {:?} (this host: {})",
        m.protocols,
        i.protocol
            .map(|p| format!("speaks {p}"))
            .unwrap_or_else(|| "none in common".into())
    );
    println!(
        "capabilities  {}",
        capability_names(&m.capabilities).join(", ")
    );
    println!("library       {}", i.library.path.display());
    println!("sha256        {}", i.library.sha256);
}

fn serve(path: &Path, listen: Option<std::net::SocketAddr>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.level, config.log.format);
    // Many connections need many descriptors: take what the hard limit allows.
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("could not raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = Loader::new(&config).load_all(&config);
    let failed: Vec<(String, String)> = report
        .failures
        .iter()
        .map(|f| (f.id.clone(), f.error.to_string()))
        .collect();
    let host = match runtime.block_on(payhost::Host::open(&config, report.providers)) {
        Ok(host) => std::sync::Arc::new(host),
        Err(e) => {
            tracing::error!("cannot open the host: {e}");
            return ExitCode::FAILURE;
        }
    };
    let address = listen.unwrap_or(config.server.listen);
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(address)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {address}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = listener.local_addr().map_or(address, |a| a);
    let server = &config.server;
    let app = payhost::http::router(
        payhost::http::AppState::new(host.clone(), failed.clone())
            .with_body_timeout(Duration::from_millis(server.body_timeout_ms)),
    );
    let edge = payhost::http::edge::EdgeSettings {
        name: "api",
        header_timeout: Duration::from_millis(server.header_timeout_ms),
        idle_timeout: Duration::from_millis(server.idle_timeout_ms),
        max_connections: server.connection_limit(nofile),
        shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
    };
    let reconciler = {
        let _entered = runtime.enter();
        host.spawn_reconciler()
    };
    tracing::info!(
        config = %config.path.display(),
        storage = %config.storage.url,
        loaded = host.providers().len(),
        failed = failed.len(),
        open_files = nofile,
        max_connections = edge.max_connections,
        "payhost ready on http://{bound}"
    );
    println!("listening on http://{bound}");
    let grace = edge.shutdown_grace;
    runtime.block_on(payhost::http::edge::serve(
        listener,
        app,
        edge,
        shutdown_signal(),
    ));
    reconciler.abort();
    tracing::info!(
        "shutting down: waiting up to {} ms for provider calls in progress",
        grace.as_millis()
    );
    runtime.shutdown_timeout(grace);
    ExitCode::SUCCESS
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
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
                    println!(
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
                match host.resolve_attempt(&id, as_, &by, &note).await {
                    Ok(a) if json => {
                        println!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(a) => {
                        println!(
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

fn print_attempts(list: &[payhost::domain::Attempt]) {
    if list.is_empty() {
        println!("no open attempts");
        return;
    }
    for a in list {
        println!(
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
    println!("{} open", list.len());
}
