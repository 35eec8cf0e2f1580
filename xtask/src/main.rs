//! Repository commands, so that the README's two commands stay one line each:
//! - `cargo xtask run [-- <payhost args>]`: build the host and every plugin, then run
//!   `payhost serve --config config/payhost.toml` (or the given arguments);
//! - `cargo xtask test`: build everything, then run every test (doctests, then nextest).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&root, &args[1..]),
        Some("test") => test(&root, &args[1..]),
        _ => {
            eprintln!("usage: cargo xtask run [payhost args…] | cargo xtask test [nextest args…]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root);
    c
}

fn status(mut c: Command) -> Result<(), String> {
    let s = c.status().map_err(|e| format!("cannot run {c:?}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{c:?} failed ({s})"))
    }
}

fn build_all(root: &Path) -> Result<(), String> {
    let mut c = cargo(root);
    c.args(["build", "--workspace"]);
    status(c)
}

fn run(root: &Path, args: &[String]) -> Result<(), String> {
    build_all(root)?;
    let exe = root
        .join("target/debug")
        .join(format!("payhost{}", std::env::consts::EXE_SUFFIX));
    let mut c = Command::new(exe);
    c.current_dir(root);
    if args.is_empty() {
        c.args(["serve", "--config"])
            .arg(PathBuf::from("config/payhost.toml"));
    } else {
        c.args(args);
    }
    status(c)
}

fn test(root: &Path, args: &[String]) -> Result<(), String> {
    build_all(root)?;
    // Doctests first (nextest does not run them), so the run closes on nextest's summary.
    let mut c = cargo(root);
    c.args(["test", "--workspace", "--doc", "--quiet"]);
    status(c)?;
    let mut c = cargo(root);
    c.args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(args);
    status(c)
}
