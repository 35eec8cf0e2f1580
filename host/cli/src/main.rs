//! The `payhost` command: one file per command under [`commands`], the clap definitions in
//! [`args`], the vendor kit in [`kit`].

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod args;
mod commands;
mod kit;

use std::process::ExitCode;

use args::{Cli, Command, KeysAction, ProviderAction};
use clap::Parser;
use commands::{attempts, check, events, hosts, inspect, keys, provider, reload, serve};
use output::EXIT_CONFIG;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, json } => check::check(&config, json),
        Command::Inspect {
            library,
            plugin_dir,
            json,
        } => inspect::inspect(&library, plugin_dir, json),
        Command::Serve { config, listen } => serve::serve(&config, listen),
        Command::Hosts { config, json } => hosts::hosts(&config, json),
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
        } => provider::provider_new(&name, dir.as_deref(), api_path.as_deref()),
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
        } => provider::provider_test(
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
        } => keys::new_key(&scope, id, rate_per_second),
        Command::Events { action } => events::events(action),
        Command::Reload {
            config,
            url,
            key_env,
            json,
        } => reload::reload(&config, url, &key_env, json),
        Command::Attempts {
            config,
            json,
            action,
        } => {
            let Some(config) = config else {
                eprintln!("error: --config <file> is required");
                return ExitCode::from(EXIT_CONFIG);
            };
            attempts::attempts(&config, json, action)
        }
    }
}
