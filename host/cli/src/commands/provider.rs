//! The vendor kit's commands: `payhost provider new` and `payhost provider test`.

use std::path::Path;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::output::{EXIT_CONFIG, runtime};

pub(crate) fn provider_new(name: &str, dir: Option<&Path>, api_path: Option<&Path>) -> ExitCode {
    match crate::kit::new_provider(name, dir, api_path) {
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

pub(crate) fn provider_test(
    library: &Path,
    options: Option<&Path>,
    scenario: Option<&Path>,
    isolation: &str,
    json: bool,
    junit: Option<&Path>,
) -> ExitCode {
    use crate::kit::conformance::{self, Verdict};
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
