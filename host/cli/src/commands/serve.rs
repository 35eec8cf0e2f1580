//! `payhost serve`: the config's providers loaded, the host opened, and [`payhost::serve`] until
//! SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use payhost::Loader;

use crate::output::{EXIT_CONFIG, init_logging, load_config, runtime};

/// Runs the server with the config at `path`.
pub(crate) fn serve(path: &Path, listen: Option<std::net::SocketAddr>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.level, config.log.format);
    // The safe default, checked before anything loads: an API that moves money is not put on a
    // network without keys, nor operator keys in clear text, unless the operator says so.
    if let Err(e) = payhost::serve::preflight(&config, listen) {
        eprintln!("error[{}]: {e}", e.code());
        return ExitCode::from(EXIT_CONFIG);
    }
    // Many connections need many descriptors: take what the hard limit allows.
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
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
    let failed_providers: Vec<(String, String)> = report
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
    let options = payhost::serve::ServeOptions {
        listen,
        failed_providers,
        open_files,
    };
    let served = runtime.block_on(payhost::serve::serve(
        &config,
        host,
        options,
        |serving| {
            say!("listening on {}://{}", serving.api.1, serving.api.0);
            if let Some((address, scheme)) = serving.admin {
                say!("admin listening on {scheme}://{address}");
            }
        },
        shutdown_signal(),
    ));
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code(), "{e}");
            ExitCode::FAILURE
        }
    }
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
