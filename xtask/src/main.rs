//! Repository commands, so that the README's two commands stay one line each:
//! - `cargo xtask run [-- <payhost args>]`: build the host and every plugin, then run
//!   `payhost serve --config config/payhost.toml` (or the given arguments);
//! - `cargo xtask test`: build everything, then run every test (doctests, then nextest);
//! - `cargo xtask fuzz`: only the API fuzzing that `test` runs (schemathesis).

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
        Some("fuzz") => build_all(&root).and_then(|()| schemathesis(&root)),
        _ => {
            eprintln!(
                "usage: cargo xtask run [payhost args…] | cargo xtask test [nextest args…] | cargo xtask fuzz"
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

fn test(root: &Path, args: &[String]) -> Result<(), String> {
    build_all(root)?;
    // Doctests and the API fuzzing first, so the run closes on nextest's summary.
    let mut c = cargo(root);
    c.args(["test", "--workspace", "--doc", "--quiet"]);
    status(c)?;
    python_venv(root, "localstripe-venv", LOCALSTRIPE)?;
    schemathesis(root)?;
    let mut c = cargo(root);
    c.args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(args);
    status(c)
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
