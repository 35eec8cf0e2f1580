//! The command line, as clap reads it: one variant per command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The payment-session host.
#[derive(Parser)]
#[command(version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Make a running `payhost serve` read its config file again and apply it (API keys, event
    /// endpoints), without a restart. The file is validated here first; the server validates it
    /// again and changes nothing if it is invalid or needs a restart. Same as `SIGHUP`.
    Reload {
        /// The config file the server runs (its admin listener is asked, else its API one).
        #[arg(long, short)]
        config: PathBuf,
        /// The server's base URL, when the config's address is not where it listens (a
        /// `--listen` override): `http://127.0.0.1:8081`.
        #[arg(long)]
        url: Option<String>,
        /// The environment variable holding an operator key (`phk_…`), when keys are configured.
        #[arg(long, default_value = "PAYHOST_API_KEY")]
        key_env: String,
        /// Print the server's answer as JSON.
        #[arg(long)]
        json: bool,
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
pub(crate) enum EventsAction {
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
pub(crate) enum AttemptsAction {
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
pub(crate) enum ProviderAction {
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
pub(crate) enum KeysAction {
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
pub(crate) enum Resolved {
    Succeeded,
    Failed,
}
