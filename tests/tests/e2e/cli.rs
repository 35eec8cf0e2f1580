//! `payhost check` and `payhost inspect` against the real built libraries, and every kind of bad
//! config an operator can write.

use payhost_e2e::{BOTH, Scratch, library, payhost, text};

#[test]
fn check_loads_the_system_and_sandbox_plugins_and_shows_their_provenance() {
    let s = Scratch::new();
    let config = s.config(BOTH);
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for expected in [
        "ok    sandbox",
        "ok    system",
        "System (system) 1.0.0",
        "Sandbox (sandbox) 1.0.0",
        "protocol 1",
        "partial_capture",
        "async_authorization, webhooks",
        "webhooks, account_holders",
        "libpayhost_provider_sandbox.so",
        "sha256",
        "2 loaded, 0 failed, 0 disabled",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("whsec_test_secret"), "{stdout}");
}

#[test]
fn check_json_reports_manifests_and_digests() {
    let s = Scratch::new();
    let config = s.config(BOTH);
    let out = payhost(
        &["check", "--json", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let loaded = report["loaded"].as_array().unwrap();
    assert_eq!(loaded.len(), 2);
    let sandbox = loaded.iter().find(|p| p["id"] == "sandbox").unwrap();
    assert_eq!(sandbox["manifest"]["capabilities"]["webhooks"], true);
    assert_eq!(sandbox["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(sandbox["timeout_ms"], 500);
}

#[test]
fn inspect_prints_a_manifest_without_a_config() {
    let path = library("payhost_provider_sandbox");
    let out = payhost(&["inspect", path.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("id            sandbox"), "{stdout}");
    assert!(stdout.contains("speaks 1"), "{stdout}");

    // A bare name is looked up in the plugin folder.
    let dir = path.parent().unwrap().to_str().unwrap().to_owned();
    let out = payhost(
        &["inspect", "payhost_provider_system", "--plugin-dir", &dir],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("name          System"));
}

#[test]
fn a_text_file_is_refused_as_not_a_library() {
    let s = Scratch::new();
    let file = s.dir.path().join("libfake.so");
    std::fs::write(&file, "this is not a library\n").unwrap();
    let out = payhost(&["inspect", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("plugin.not_a_library"), "{stderr}");
    assert!(stderr.contains("libfake.so"), "{stderr}");
}

#[test]
fn a_system_library_is_refused_as_not_a_payhost_plugin() {
    let libz = [
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/libz.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libz is on every Debian machine");
    let out = payhost(&["inspect", libz], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("plugin.not_a_plugin"), "{stderr}");
    assert!(
        stderr.contains("is not a payhost provider plugin"),
        "{stderr}"
    );
}

#[test]
fn an_incompatible_plugin_is_refused_and_the_others_still_load() {
    let s = Scratch::new();
    let config = s.config(&format!(
        "{BOTH}\n[providers.old]\nlibrary = \"payhost_fixture_incompatible\"\n"
    ));
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL  old"), "{stdout}");
    assert!(stdout.contains("plugin.incompatible_abi"), "{stdout}");
    assert!(
        stdout.contains("libpayhost_fixture_incompatible.so"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "plugin 1.9.0, host {}",
            payhost_provider_api::API_VERSION
        )),
        "both versions must be named:\n{stdout}"
    );
    assert!(
        stdout.contains("ok    system") && stdout.contains("ok    sandbox"),
        "{stdout}"
    );
    assert!(stdout.contains("2 loaded, 1 failed"), "{stdout}");
    // Only the first lines of abi_stable's report are shown.
    let report_lines = stdout.lines().filter(|l| l.contains("  | ")).count();
    assert!(
        (1..=9).contains(&report_lines),
        "{report_lines} lines:\n{stdout}"
    );
}

#[test]
fn a_plugin_with_no_protocol_in_common_is_refused_naming_both() {
    let s = Scratch::new();
    let config = s.config(&format!(
        "{BOTH}\n[providers.future]\nlibrary = \"payhost_fixture_future_protocol\"\n"
    ));
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("plugin.incompatible_protocol"), "{stdout}");
    assert!(
        stdout.contains("[99]") && stdout.contains("[1]"),
        "{stdout}"
    );
    assert!(stdout.contains("2 loaded, 1 failed"), "{stdout}");
}

/// Runs `check` on a config and returns (exit code, stderr + stdout).
fn check(config_text: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let s = Scratch::new();
    let config = s.config(config_text);
    let out = payhost(&["check", "--config", config.to_str().unwrap()], env);
    (
        out.status.code(),
        format!("{}{}", text(&out.stderr), text(&out.stdout)),
    )
}

#[test]
fn an_unknown_key_names_file_line_and_column() {
    let (code, out) = check(
        "[providers.system]\nlibrary = \"payhost_provider_system\"\ntimeout = 5\n",
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("payhost.toml:3:1"), "{out}");
    assert!(out.contains("unknown field `timeout`"), "{out}");
    assert!(out.contains("config.schema"), "{out}");
}

#[test]
fn a_wrong_type_names_the_position_and_key() {
    let (code, out) = check(
        "[providers.system]\nlibrary = \"payhost_provider_system\"\nmax_concurrency = \"many\"\n",
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("payhost.toml:3:"), "{out}");
    assert!(out.contains("providers.system.max_concurrency"), "{out}");
}

#[test]
fn a_missing_config_file_is_named() {
    let out = payhost(&["check", "--config", "/nonexistent/payhost.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/nonexistent/payhost.toml"), "{stderr}");
    assert!(stderr.contains("config.io"), "{stderr}");
}

#[test]
fn a_missing_env_var_is_named_and_a_set_one_is_never_shown() {
    let text = BOTH.replace("\"whsec_test_secret\"", "\"${SANDBOX_WEBHOOK_SECRET}\"");
    let (code, out) = check(&text, &[]);
    assert_eq!(code, Some(2));
    assert!(out.contains("SANDBOX_WEBHOOK_SECRET"), "{out}");
    assert!(out.contains("config.missing_env"), "{out}");
    assert!(out.contains("payhost.toml:"), "{out}");

    // Set but refused by the provider (too short): the message must not quote the value.
    let (code, out) = check(&text, &[("SANDBOX_WEBHOOK_SECRET", "short")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plugin.options_rejected"), "{out}");
    assert!(out.contains("webhook_secret"), "{out}");
    assert!(!out.contains("short\""), "{out}");

    let (code, out) = check(&text, &[("SANDBOX_WEBHOOK_SECRET", "whsec_from_env_123")]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("whsec_from_env_123"), "{out}");
}

#[test]
fn options_a_provider_refuses_point_at_their_line() {
    let text = BOTH.replace(
        "webhook_secret = \"whsec_test_secret\"",
        "webhook_secret = \"whsec_test_secret\"\nwebhook_secert = \"typo\"",
    );
    let (code, out) = check(&text, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plugin.options_rejected"), "{out}");
    assert!(out.contains("webhook_secert"), "{out}");
    // The typo is on line 16 of the generated config.
    assert!(out.contains("payhost.toml:16:"), "{out}");
}

#[test]
fn a_sha256_mismatch_shows_expected_and_actual() {
    let pin = "0".repeat(64);
    let (code, out) = check(
        &format!(
            "[plugins]\ndir = \"{{plugins}}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nsha256 = \"{pin}\"\n"
        ),
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plugin.checksum_mismatch"), "{out}");
    assert!(out.contains(&format!("expected {pin}")), "{out}");
    assert!(out.contains("actual "), "{out}");
}

#[test]
fn a_correct_sha256_pin_loads() {
    let bytes = std::fs::read(library("payhost_provider_system")).unwrap();
    let out = payhost(
        &[
            "inspect",
            library("payhost_provider_system").to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    let digest = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!bytes.is_empty());
    let (code, out) = check(
        &format!(
            "[plugins]\ndir = \"{{plugins}}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nsha256 = \"{}\"\n",
            digest.to_uppercase()
        ),
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn an_unknown_library_names_where_it_was_looked_for() {
    let (code, out) = check(
        "[plugins]\ndir = \"{plugins}\"\n[providers.card]\nlibrary = \"payhost_provider_nope\"\n",
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plugin.not_found"), "{out}");
    assert!(out.contains("libpayhost_provider_nope.so"), "{out}");
    assert!(out.contains("[plugins] dir"), "{out}");
}

#[test]
fn a_group_writable_plugin_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let copy = s.dir.path().join("libcopy.so");
    std::fs::copy(library("payhost_provider_system"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o775)).unwrap();
    let out = payhost(&["inspect", copy.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("plugin.insecure_permissions"), "{stderr}");
    assert!(stderr.contains("chmod go-w"), "{stderr}");
}

#[test]
fn a_disabled_provider_is_not_loaded() {
    let (code, out) = check(
        "[plugins]\ndir = \"{plugins}\"\n[providers.card]\nlibrary = \"payhost_provider_nope\"\nenabled = false\n",
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("off   card"), "{out}");
}

#[test]
fn the_example_config_checks_out_of_the_box() {
    let config = payhost_e2e::workspace().join("config/payhost.toml");
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A reader that stops early (`payhost check … | head -1`) ends the command quietly: no panic,
/// exit 0, the line it read.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let scratch = payhost_e2e::Scratch::new();
    let config = scratch.config(payhost_e2e::BOTH);
    for args in [
        vec!["check", "--config", config.to_str().unwrap()],
        vec!["keys", "new", "--scope", "read"],
        vec!["check", "--config", config.to_str().unwrap(), "--json"],
    ] {
        let mut child = std::process::Command::new(payhost_e2e::payhost_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read nothing: close the pipe at once, as `head -0` would.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = payhost_e2e::text(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}
