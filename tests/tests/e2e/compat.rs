//! Plugins built against earlier provider-apis (1.0.0 at the commit in `tests/compat/BASELINE`,
//! 1.3.0 at `tests/compat/BASELINE_1_3`) load and work in today's host, and one built against a
//! later 1.x does too.

use std::path::PathBuf;
use std::process::Command;

use payhost::{CallError, Loader};
use payhost_e2e::{Scratch, artifacts, workspace};
use payhost_provider_api::{
    API_VERSION, AuthorizeRequest, CaptureRequest, CreateAccountHolderRequest, Customer, ErrorKind,
    Operation, Outcome,
};
use serde_json::Value;

/// Extracts the commit named in `tests/compat/<file>` and builds its system provider; returns
/// the library file.
fn build_baseline_plugin(file: &str) -> PathBuf {
    let root = workspace();
    let sha = std::fs::read_to_string(root.join("tests/compat").join(file))
        .unwrap_or_else(|e| panic!("tests/compat/{file}: {e}"))
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
        .arg(target.join(format!("build-{file}")))
        .output()
        .expect("cargo build of the baseline");
    assert!(
        out.status.success(),
        "building the baseline plugin failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join(format!("build-{file}/debug")).join(format!(
        "{}payhost_provider_system{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// A plugin built before provider-api 1.4 is reported as keeping no account holders, so the
/// host refuses those operations up front; called anyway, it answers `unsupported`.
async fn has_no_account_holders(provider: &payhost::Provider) {
    assert!(!provider.manifest().account_holders);
    for op in Operation::ACCOUNT_HOLDER {
        assert!(!provider.supports(op), "{op}");
    }
    let err = provider
        .call(CreateAccountHolderRequest {
            account_holder_id: "ach_old".into(),
            idempotency_key: "old-h1".into(),
            customer: Customer {
                id: "cus_1".into(),
                ..Default::default()
            },
            input: Value::Null,
            deadline_unix_ms: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Provider(e) if e.kind == ErrorKind::Unsupported),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_provider_api_1_3_keeps_working_and_has_no_account_holders() {
    let library = build_baseline_plugin("BASELINE_1_3");
    let s = Scratch::new();
    let (_config, report) = s.load(&format!(
        "[providers.system_1_3]\npath = \"{}\"\n",
        library.display()
    ));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let old = report.providers.get("system_1_3").unwrap();
    assert_eq!(old.manifest().api_version, "1.3.0", "built against 1.3");
    assert_eq!(old.protocol(), 1);
    let answer = old
        .call(AuthorizeRequest {
            session_id: "ps_13".into(),
            idempotency_key: "13-a1".into(),
            amount: 500,
            currency_code: "eur".into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Processed);
    has_no_account_holders(old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_provider_api_1_0_loads_and_works_in_todays_host() {
    let library = build_baseline_plugin("BASELINE");
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
            input: Value::Null,
            account_holder: None,
            payment_method: None,
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

    has_no_account_holders(old).await;

    // `payhost inspect` reads it as well.
    let inspected = Loader::new(&config).inspect(&library).unwrap();
    assert_eq!(inspected.manifest.id, "system");
}

/// Builds today's system provider against today's provider-api renumbered 1.99.0 (a future minor
/// release with the same envelope and protocol); returns the library file.
fn build_future_plugin() -> PathBuf {
    let root = workspace();
    let target = artifacts().parent().unwrap().join("compat");
    let src = target.join("src-future");
    let _ = std::fs::remove_dir_all(&src);
    for dir in ["provider-api/src", "providers/system/src"] {
        std::fs::create_dir_all(src.join(dir)).unwrap();
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), src.join(dir).join(entry.file_name())).unwrap();
        }
    }
    let api_manifest = std::fs::read_to_string(root.join("provider-api/Cargo.toml")).unwrap();
    let renumbered = api_manifest.replacen(
        &format!("version = \"{API_VERSION}\""),
        "version = \"1.99.0\"",
        1,
    );
    assert_ne!(
        api_manifest, renumbered,
        "provider-api's version line moved"
    );
    std::fs::write(src.join("provider-api/Cargo.toml"), renumbered).unwrap();
    std::fs::copy(
        root.join("providers/system/Cargo.toml"),
        src.join("providers/system/Cargo.toml"),
    )
    .unwrap();
    std::fs::copy(root.join("README.md"), src.join("README.md")).unwrap();
    std::fs::copy(root.join("Cargo.lock"), src.join("Cargo.lock")).unwrap();
    let workspace_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = workspace_manifest.find("members = [").unwrap();
    let end = workspace_manifest[start..].find("]\n").unwrap() + start + 2;
    let mut manifest = workspace_manifest.clone();
    manifest.replace_range(
        start..end,
        "members = [\"provider-api\", \"providers/system\"]\n",
    );
    let manifest = manifest
        .lines()
        .filter(|l| !l.starts_with("default-members"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            &format!("version = \"{API_VERSION}\" }}"),
            "version = \"1.99.0\" }",
        );
    std::fs::write(src.join("Cargo.toml"), manifest).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "--quiet",
            "-p",
            "payhost-provider-system",
            "--target-dir",
        ])
        .arg(target.join("future"))
        .output()
        .expect("cargo build of the future plugin");
    assert!(
        out.status.success(),
        "building the future plugin failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("future/debug").join(format!(
        "{}payhost_provider_system{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_a_newer_provider_api_loads_while_they_share_a_protocol() {
    let library = build_future_plugin();
    let s = Scratch::new();
    let (_config, report) = s.load(&format!(
        "[providers.new_system]\npath = \"{}\"\n",
        library.display()
    ));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let new = report.providers.get("new_system").unwrap();
    assert_eq!(new.manifest().api_version, "1.99.0");
    assert_eq!(new.protocol(), 1);
    let answer = new
        .call(AuthorizeRequest {
            session_id: "ps_new".into(),
            idempotency_key: "new-a1".into(),
            amount: 99,
            currency_code: "jpy".into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            payment_method: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Processed);
}
