//! Repository commands, so that the README's two commands stay one line each:
//! - `cargo xtask run [-- <payhost args>]`: build the host and every plugin, then run
//!   `payhost serve --config config/payhost.toml` (or the given arguments);
//! - `cargo xtask test`: start what the tests need (PostgreSQL, localstripe, schemathesis),
//!   build everything, then run every test (doctests, the Medusa bridge's unit and integration
//!   tests, then nextest); a test that cannot run fails, unless
//!   `PAYHOST_SKIP=postgres,localstripe,root,failover,medusa` names what to skip, and the run
//!   ends with how many were skipped and why;
//! - `cargo xtask fuzz`: only the API fuzzing that `test` runs (schemathesis);
//! - `cargo xtask tidy`: only the layering rules that `test` checks first (see `tidy.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod tidy;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&root, &args[1..]),
        Some("test") => test(&root, &args[1..]),
        Some("fuzz") => build_all(&root).and_then(|()| schemathesis(&root)),
        Some("tidy") => tidy(&root),
        _ => {
            eprintln!(
                "usage: cargo xtask run [payhost args…] | cargo xtask test [nextest args…] | cargo xtask fuzz | cargo xtask tidy"
            );
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
    // `cargo xtask run -- check …` and `cargo xtask run check …` mean the same.
    let args = args.strip_prefix(&["--".to_owned()]).unwrap_or(args);
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

/// The layering rules (`tidy.rs`): every finding printed, and an error if there is one.
fn tidy(root: &Path) -> Result<(), String> {
    let findings = tidy::check(root);
    for f in &findings {
        eprintln!("{f}");
    }
    match findings.len() {
        0 => Ok(()),
        n => Err(format!("tidy: {n} layering rule(s) broken (see above)")),
    }
}

fn test(root: &Path, args: &[String]) -> Result<(), String> {
    // The layering rules first: they need no build.
    tidy(root)?;
    let skip = std::env::var("PAYHOST_SKIP").unwrap_or_default();
    let skipping = |need: &str| skip.split(',').any(|s| s.trim() == need);
    if !skipping("postgres") {
        ensure_postgres()?;
    }
    build_all(root)?;
    // Doctests and the API fuzzing first, so the run closes on nextest's summary.
    let mut c = cargo(root);
    c.args(["test", "--workspace", "--doc", "--quiet"]);
    status(c)?;
    if !skipping("localstripe") {
        python_venv(root, "localstripe-venv", LOCALSTRIPE)?;
    }
    schemathesis(root)?;
    // A test that cannot run fails saying why, unless PAYHOST_SKIP names what it needs: then it
    // is recorded here and counted below.
    let skips = root.join("target/test-skips.log");
    let _ = std::fs::remove_file(&skips);
    // The Medusa bridge's tests (only when no nextest filter narrows the run).
    let bridge = if args.is_empty() {
        if skipping("medusa") {
            let _ = std::fs::write(
                &skips,
                "medusa\tintegrations/medusa (unit and integration)\tPAYHOST_SKIP names medusa\n",
            );
            Ok(())
        } else {
            medusa(root)
        }
    } else {
        Ok(())
    };
    let mut c = cargo(root);
    c.args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .env("PAYHOST_SKIP_LOG", &skips)
        .args(args);
    let result = status(c);
    report_skips(&skips);
    bridge.and(result)
}

/// The Medusa bridge (`integrations/medusa`): its npm packages installed from the lockfile
/// (`npm ci`, again only when the lockfile changed), its unit tests, then its integration tests
/// — Medusa's Payment Module on a fresh PostgreSQL database against the `payhost` just built.
fn medusa(root: &Path) -> Result<(), String> {
    let dir = root.join("integrations/medusa");
    let lock = std::fs::read(dir.join("package-lock.json"))
        .map_err(|e| format!("integrations/medusa/package-lock.json: {e}"))?;
    let stamp = dir.join("node_modules/.payhost-lockfile");
    if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
        let mut c = Command::new("npm");
        c.current_dir(&dir).args(["ci", "--no-audit", "--no-fund"]);
        status(c).map_err(|e| {
            format!("{e}: the Medusa bridge's packages (Node 20 and npm are needed)")
        })?;
        std::fs::write(&stamp, &lock).map_err(|e| format!("{}: {e}", stamp.display()))?;
    }
    let mut c = Command::new("npm");
    c.current_dir(&dir).args(["test"]);
    status(c)?;
    let mut c = Command::new("npm");
    c.current_dir(&dir)
        .args(["run", "test:integration"])
        .env("PAYHOST_BIN", root.join("target/debug/payhost"));
    status(c)
}

/// Prints how many tests were skipped (only ever by `PAYHOST_SKIP`) and why.
fn report_skips(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by_need: std::collections::BTreeMap<&str, (usize, &str)> = Default::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(need), Some(_test), Some(why)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let entry = by_need.entry(need).or_insert((0, why));
        entry.0 += 1;
    }
    for (need, (n, why)) in &by_need {
        eprintln!(
            "xtask: SKIPPED {n} test{} (PAYHOST_SKIP={need}): {why}",
            if *n == 1 { "" } else { "s" }
        );
    }
    if by_need.is_empty() {
        eprintln!("xtask: no test skipped");
    }
}

/// Makes sure the PostgreSQL the tests use answers: the machine's own cluster is started if it
/// is down (as on a fresh machine). A server that still does not answer fails the run here, with
/// the reason, instead of failing dozens of tests one by one.
fn ensure_postgres() -> Result<(), String> {
    let url = std::env::var("PAYHOST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned());
    let address = postgres_address(&url);
    let answers = || {
        use std::net::ToSocketAddrs;
        address
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| {
                std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok()
            })
    };
    if answers() {
        return Ok(());
    }
    if let Some(version) = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
    {
        eprintln!(
            "xtask: PostgreSQL at {address} does not answer; starting cluster {version}/main"
        );
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "start"])
            .status();
        for _ in 0..50 {
            if answers() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    Err(format!(
        "PostgreSQL does not answer at {address} (PAYHOST_TEST_POSTGRES={url}): start it, point PAYHOST_TEST_POSTGRES at one, or run with PAYHOST_SKIP=postgres to skip the tests that need it"
    ))
}

/// `host:port` of a `postgres://user@host:port/db` URL.
fn postgres_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    }
}

/// The schemathesis release the API is fuzzed with (from PyPI, in a venv under target/).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// The Stripe-compatible server the Stripe provider is tested against (PyPI).
const LOCALSTRIPE: &str = "localstripe==1.15.10";

/// Makes `target/<name>` a Python venv with `package` installed (once).
fn python_venv(root: &Path, name: &str, package: &str) -> Result<PathBuf, String> {
    let venv = root.join("target").join(name);
    let marker = venv.join(format!(".installed-{package}"));
    if !marker.exists() {
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        status(c).map_err(|e| format!("{e} (needs python3 with venv)"))?;
        let mut c = Command::new(venv.join("bin/pip"));
        c.args(["install", "--quiet", "--disable-pip-version-check", package]);
        status(c)?;
        std::fs::write(&marker, "").map_err(|e| e.to_string())?;
    }
    Ok(venv)
}

/// Fuzzes the HTTP API from its own `/openapi.json`: a bounded number of generated requests per
/// operation, failing on any 5xx or any response that breaks the schema.
fn schemathesis(root: &Path) -> Result<(), String> {
    use std::io::BufRead;
    let venv = root.join("target/schemathesis-venv");
    let st = venv.join("bin/schemathesis");
    if !st.exists() {
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        status(c).map_err(|e| format!("{e} (schemathesis needs python3 with venv)"))?;
        let mut c = Command::new(venv.join("bin/pip"));
        c.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCHEMATHESIS,
        ]);
        status(c)?;
    }
    let dir = root.join("target/schemathesis-run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("payhost.toml");
    // A key with every scope: the fuzzer exercises the API as an authenticated client would.
    let payhost = root.join("target/debug/payhost");
    let made = Command::new(&payhost)
        .args([
            "keys",
            "new",
            "--scope",
            "read,payments,operator",
            "--id",
            "fuzz",
        ])
        .output()
        .map_err(|e| format!("cannot run payhost keys new: {e}"))?;
    let made = String::from_utf8_lossy(&made.stdout).into_owned();
    let secret = made.lines().next().unwrap_or_default().to_owned();
    let key_table: String = made
        .lines()
        .skip_while(|l| !l.starts_with("[[api_keys]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"sqlite://{}/fuzz.db\"\n[log]\nlevel = \"warn\"\n[events]\nmax_wait_ms = 200\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\n{key_table}",
            dir.display(),
            root.join("target/debug").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut server = Command::new(&payhost)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start payhost: {e}"))?;
    let stdout = server.stdout.take().ok_or("no stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("listening on ") {
                    break url.trim().to_owned();
                }
            }
            _ => {
                let _ = server.kill();
                return Err("payhost exited before listening".into());
            }
        }
    };
    if let Err(e) = seed(&base, &secret) {
        let _ = server.kill();
        return Err(format!("seeding the fuzzed server failed: {e}"));
    }
    let mut c = Command::new(&st);
    c.args([
        "run",
        &format!("{base}/openapi.json"),
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "30",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        "--header",
        &format!("Authorization: Bearer {secret}"),
    ]);
    let result = status(c);
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// Makes one of everything the fuzzer cannot make on its own (it has no ids to start from): a
/// collection, a session authorized, captured and refunded, a canceled session — so that
/// `GET /v1/events` answers with events of those types and their schemas are checked.
fn seed(base: &str, key: &str) -> Result<(), String> {
    let col = request(
        base,
        key,
        "POST",
        "/v1/payment-collections",
        r#"{"amount": 1000, "currency_code": "eur"}"#,
    )?;
    let col = id_after(&col, "\"id\":\"", "paycol_")?;
    let new_session = format!(r#"{{"payment_collection_id": "{col}", "provider_id": "system"}}"#);
    let session = request(base, key, "POST", "/v1/payment-sessions", &new_session)?;
    let session = id_after(&session, "\"id\":\"", "ps_")?;
    let authorized = request(
        base,
        key,
        "POST",
        &format!("/v1/payment-sessions/{session}/authorize"),
        "{}",
    )?;
    let payment = id_after(&authorized, "\"payment\":{\"id\":\"", "pay_")?;
    request(
        base,
        key,
        "POST",
        &format!("/v1/payments/{payment}/capture"),
        r#"{"amount": 600}"#,
    )?;
    request(
        base,
        key,
        "POST",
        &format!("/v1/payments/{payment}/refund"),
        r#"{"amount": 100}"#,
    )?;
    let other = request(base, key, "POST", "/v1/payment-sessions", &new_session)?;
    let other = id_after(&other, "\"id\":\"", "ps_")?;
    request(
        base,
        key,
        "DELETE",
        &format!("/v1/payment-sessions/{other}"),
        "",
    )?;
    Ok(())
}

/// The id that follows `marker` in `body` and starts with `prefix`.
fn id_after(body: &str, marker: &str, prefix: &str) -> Result<String, String> {
    body.find(marker)
        .map(|i| &body[i + marker.len()..])
        .and_then(|rest| rest.split('"').next())
        .filter(|id| id.starts_with(prefix))
        .map(str::to_owned)
        .ok_or_else(|| format!("no `{prefix}…` id in {body}"))
}

/// One HTTP/1.1 request on its own connection; the body of a 2xx answer.
fn request(base: &str, key: &str, method: &str, path: &str, body: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://").unwrap_or(base);
    let mut stream =
        std::net::TcpStream::connect(address).map_err(|e| format!("{address}: {e}"))?;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let status = answer.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with('2') {
        return Err(format!("{method} {path}: {answer}"));
    }
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
