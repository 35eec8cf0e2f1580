//! The vendor kit: `payhost provider new` gives a crate that builds, passes its own tests, passes
//! `payhost provider test` and loads with `payhost check`; the shipped providers and the
//! minimal one pass `provider test`; a provider with planted faults fails exactly those checks.

use std::path::Path;
use std::process::Command;

use payhost_e2e::{artifacts, library, payhost, text, workspace};
use serde_json::Value;

/// Runs `payhost provider test` with `--json`; gives the exit code and the failed and skipped
/// check names.
fn provider_test(lib: &Path, extra: &[&str]) -> (i32, Value) {
    let lib = lib.display().to_string();
    let mut args = vec!["provider", "test", lib.as_str(), "--json"];
    args.extend_from_slice(extra);
    let out = payhost(&args, &[]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "provider test printed no JSON ({e}):\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn named(report: &Value, verdict: &str) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == verdict)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_shipped_providers_and_the_minimal_one_pass_provider_test() {
    let scratch = tempfile::tempdir().unwrap();
    let options = scratch.path().join("sandbox.toml");
    std::fs::write(
        &options,
        format!(
            "state_dir = \"{}\"\nwebhook_secret = \"whsec_conformance\"\n",
            scratch.path().join("state").display()
        ),
    )
    .unwrap();
    let scenario = workspace().join("providers/sandbox/scenario.toml");
    let sandbox = library("payhost_provider_sandbox");
    let opts = options.display().to_string();
    let scen = scenario.display().to_string();
    for isolation in ["in_process", "process"] {
        let (code, report) = provider_test(
            &sandbox,
            &[
                "--options",
                &opts,
                "--scenario",
                &scen,
                "--isolation",
                isolation,
            ],
        );
        assert_eq!(code, 0, "sandbox ({isolation}): {report:#}");
        assert!(named(&report, "fail").is_empty());
        // Every check could run: the scenario gives the webhook scheme and a declining card.
        assert!(named(&report, "skip").is_empty(), "{report:#}");
    }
    // Without a scenario, exactly what could not be observed is skipped, and everything else
    // passed: a run that checked less would show here.
    for (lib, skipped) in [
        (
            "payhost_provider_system",
            &[
                "flow.decline",
                "webhook.valid",
                "webhook.stale",
                "secrets.not_logged",
            ][..],
        ),
        (
            "payhost_example_minimal_provider",
            &[
                "flow.capture_again",
                "flow.decline",
                "webhook.valid",
                "webhook.stale",
                "secrets.not_logged",
            ][..],
        ),
    ] {
        let (code, report) = provider_test(&library(lib), &[]);
        assert_eq!(code, 0, "{lib}: {report:#}");
        assert_eq!(named(&report, "skip"), skipped, "{lib}: {report:#}");
        assert!(named(&report, "fail").is_empty(), "{lib}: {report:#}");
        assert_eq!(
            named(&report, "pass").len() + skipped.len(),
            report["checks"].as_array().unwrap().len(),
            "{lib}"
        );
        assert!(named(&report, "pass").len() >= 19, "{lib}: {report:#}");
    }

    // The minimal provider is at most 40 lines of vendor code.
    let source =
        std::fs::read_to_string(workspace().join("examples/minimal-provider/src/lib.rs")).unwrap();
    let code_lines = source
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count();
    assert!(
        code_lines <= 40,
        "the minimal provider has {code_lines} lines of code"
    );
    // And the guide shows exactly it.
    let guide = std::fs::read_to_string(workspace().join("docs/vendors.md")).unwrap();
    assert!(
        guide.contains(source.trim()),
        "docs/vendors.md does not show examples/minimal-provider/src/lib.rs as it is"
    );
}

#[test]
fn a_provider_with_planted_faults_fails_exactly_those_checks() {
    let scratch = tempfile::tempdir().unwrap();
    let options = scratch.path().join("liar.toml");
    std::fs::write(&options, "api_key = \"sk_live_planted_secret\"\n").unwrap();
    let junit = scratch.path().join("junit.xml");
    let (code, report) = provider_test(
        &library("payhost_fixture_liar"),
        &[
            "--options",
            &options.display().to_string(),
            "--junit",
            &junit.display().to_string(),
        ],
    );
    assert_eq!(code, 1, "{report:#}");
    let mut failed = named(&report, "fail");
    failed.sort();
    assert_eq!(
        failed,
        [
            "idempotency.capture",
            "retrieve.never_sent",
            "secrets.not_logged",
            "webhook.forged"
        ],
        "{report:#}"
    );
    // Each failure says what was expected and what came back.
    for check in report["checks"].as_array().unwrap() {
        if check["verdict"] == "fail" {
            assert!(!check["expected"].as_str().unwrap().is_empty());
            assert!(!check["got"].as_str().unwrap().is_empty());
        }
    }
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"4\""), "{xml}");
    assert!(
        xml.contains(
            "<testcase classname=\"payhost.provider\" name=\"retrieve.never_sent\"><failure"
        ),
        "{xml}"
    );
    assert!(
        !xml.contains("sk_live_planted_secret"),
        "the report repeats the secret"
    );

    // A library that does not load fails the first check with the loader's message.
    let (code, report) = provider_test(&library("payhost_fixture_incompatible"), &[]);
    assert_eq!(code, 1);
    assert_eq!(named(&report, "fail"), ["loads"], "{report:#}");
}

#[test]
fn provider_new_gives_a_crate_that_builds_passes_its_tests_and_loads() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("acme");
    let api = workspace().join("provider-api");
    let out = payhost(
        &[
            "provider",
            "new",
            "acme_pay",
            "--dir",
            &dir.display().to_string(),
            "--api-path",
            &api.display().to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("payhost provider test"),
        "{}",
        text(&out.stdout)
    );
    // A second time into the same folder is refused, naming it.
    let again = payhost(
        &[
            "provider",
            "new",
            "acme_pay",
            "--dir",
            &dir.display().to_string(),
        ],
        &[],
    );
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    let bad = payhost(&["provider", "new", "Acme-Pay"], &[]);
    assert!(
        text(&bad.stderr).contains("`Acme-Pay` is not a provider name"),
        "{}",
        text(&bad.stderr)
    );

    // Build it offline against the versions this workspace already has, in a target folder
    // kept between runs.
    std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target = artifacts().parent().unwrap().join("vendor-kit");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for args in [
        &["test", "--offline", "--quiet"][..],
        &["build", "--offline", "--release", "--quiet"],
    ] {
        let out = Command::new(&cargo)
            .args(args)
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?} in the new crate failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let release = target.join("release");
    let lib = release.join(format!(
        "{}payhost_provider_acme_pay{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let (code, report) = provider_test(
        &lib,
        &[
            "--options",
            &dir.join("options.toml").display().to_string(),
            "--scenario",
            &dir.join("scenario.toml").display().to_string(),
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    assert!(named(&report, "skip").is_empty(), "{report:#}");
    let out = payhost(
        &[
            "check",
            "--config",
            &dir.join("payhost.example.toml").display().to_string(),
        ],
        &[("PAYHOST_PLUGIN_DIR", &release.display().to_string())],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("acme_pay"),
        "{}",
        text(&out.stdout)
    );
}
