//! `payhost hosts`: the hosts sharing a PostgreSQL store, live and expired, with their open
//! attempts.

use std::path::Path;
use std::process::ExitCode;

use crate::output::{init_logging, load_config, runtime};

pub(crate) fn hosts(path: &Path, json: bool) -> ExitCode {
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
        if !config.storage.url.is_shared() {
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
