//! A plugin built against an earlier provider-api (1.0.0, at the commit in
//! `tests/compat/BASELINE`) loads and works in today's host.

use std::path::PathBuf;
use std::process::Command;

use payhost::Loader;
use payhost_e2e::{Scratch, artifacts, workspace};
use payhost_provider_api::{API_VERSION, AuthorizeRequest, CaptureRequest, Outcome};
use serde_json::Value;

/// Extracts the baseline commit and builds its system provider; returns the library file.
fn build_baseline_plugin() -> PathBuf {
    let root = workspace();
    let sha = std::fs::read_to_string(root.join("tests/compat/BASELINE"))
        .expect("tests/compat/BASELINE")
        .trim()
        .to_owned();
    let known = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{sha}^{{commit}}")])
        .status()
        .expect("git is installed");
    assert!(
        known.success(),
        "baseline commit {sha} is not in this clone's history; the compatibility test needs it \
         (in a shallow clone run `git fetch --unshallow`)"
    );
    let target = artifacts().parent().unwrap().join("compat");
    let src = target.join(format!("src-{sha}"));
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&src).unwrap();
        let archive = Command::new("git")
            .current_dir(&root)
            .args(["archive", "--format=tar", &sha])
            .output()
            .expect("git archive");
        assert!(archive.status.success());
        let mut tar = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("tar");
        use std::io::Write;
        tar.stdin
            .take()
            .unwrap()
            .write_all(&archive.stdout)
            .unwrap();
        assert!(tar.wait().unwrap().success());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "payhost-provider-system",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .expect("cargo build of the baseline");
    assert!(
        out.status.success(),
        "building the baseline plugin failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug").join(format!(
        "{}payhost_provider_system{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_provider_api_1_0_loads_and_works_in_todays_host() {
    let library = build_baseline_plugin();
    let s = Scratch::new();
    let (config, report) = s.load(&format!(
        "[providers.old_system]\npath = \"{}\"\n",
        library.display()
    ));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let old = report.providers.get("old_system").unwrap();
    assert_eq!(
        old.manifest().api_version,
        "1.0.0",
        "built against the baseline"
    );
    assert_ne!(API_VERSION, "1.0.0", "today's provider-api has moved on");
    assert_eq!(old.protocol(), 1);

    let answer = old
        .call(AuthorizeRequest {
            session_id: "ps_old".into(),
            idempotency_key: "old-a1".into(),
            amount: 1234,
            currency_code: "eur".into(),
            context: Value::Null,
            data: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Processed);
    let answer = old
        .call(CaptureRequest {
            session_id: "ps_old".into(),
            payment_id: "pay_old".into(),
            idempotency_key: "old-c1".into(),
            amount: 1234,
            currency_code: "eur".into(),
            data: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Processed);

    // `payhost inspect` reads it as well.
    let inspected = Loader::new(&config).inspect(&library).unwrap();
    assert_eq!(inspected.manifest.id, "system");
}
