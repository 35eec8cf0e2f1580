//! Helpers for the end-to-end tests: build the real plugins and the `payhost` binary once, find
//! them, and write throw-away configs.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use payhost::{Config, LoadReport, Loader};

pub mod receiver;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// The profile folder the tests were built into (`target/debug`), where the plugins are too.
pub fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// Builds the host binary, the providers and the fixtures (a no-op when up to date), once per
/// test process. Cargo's own lock makes concurrent test processes wait for each other.
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = artifacts();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let target = dir.parent().expect("target dir").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(workspace())
            .args([
                "build",
                "--quiet",
                "-p",
                "payhost-cli",
                "-p",
                "payhost-provider-system",
                "-p",
                "payhost-provider-sandbox",
                "-p",
                "payhost-provider-stripe",
                "-p",
                "payhost-fixture-incompatible",
                "-p",
                "payhost-fixture-future-protocol",
                "-p",
                "payhost-fixture-faulty",
                "-p",
                "payhost-fixture-liar",
                "-p",
                "payhost-example-minimal-provider",
                "-p",
                "payhost-e2e",
                "-p",
                "payhost-example-embed",
                "--profile",
                &profile,
                "--target-dir",
            ])
            .arg(&target)
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The built library file of a crate (`payhost_provider_system` → `…/libpayhost_provider_system.so`).
pub fn library(name: &str) -> PathBuf {
    ensure_built();
    artifacts().join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// The `payhost` binary.
pub fn payhost_bin() -> PathBuf {
    ensure_built();
    artifacts().join(format!("payhost{}", std::env::consts::EXE_SUFFIX))
}

/// Runs `payhost` with these arguments and an environment without `PAYHOST_*`/`SANDBOX_*`.
pub fn payhost(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(payhost_bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PAYHOST_") || k.starts_with("SANDBOX_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run payhost")
}

/// A scratch folder with a config in it (and, for PostgreSQL tests, a database).
pub struct Scratch {
    pub dir: tempfile::TempDir,
    postgres: std::sync::Mutex<Option<String>>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(url) = self.postgres.lock().ok().and_then(|mut p| p.take()) {
            drop_postgres_database(&url);
        }
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
            postgres: std::sync::Mutex::new(None),
        }
    }

    /// Writes `payhost.toml`, with `{plugins}` replaced by the plugin folder and `{state}` by a
    /// state folder inside the scratch folder; returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("payhost.toml");
        let text = text
            .replace("{plugins}", &artifacts().display().to_string())
            .replace(
                "{state}",
                &self.dir.path().join("state").display().to_string(),
            );
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Writes the config and loads its providers in-process.
    pub fn load(&self, text: &str) -> (Config, LoadReport) {
        ensure_built();
        let path = self.config(text);
        let config = Config::from_file_with_env(&path, |_| None).expect("valid config");
        let report = Loader::new(&config).load_all(&config);
        (config, report)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// A config with the system and sandbox providers (sandbox with a short timeout).
pub const BOTH: &str = r#"
[plugins]
dir = "{plugins}"

[providers.system]
library = "payhost_provider_system"

[providers.sandbox]
library = "payhost_provider_sandbox"
timeout_ms = 500
max_concurrency = 4

[providers.sandbox.options]
state_dir = "{state}"
webhook_secret = "whsec_test_secret"
"#;

/// Text of an output stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config with both providers and a SQLite store in the scratch folder.
pub const HOST: &str = r#"
[storage]
url = "sqlite://{dir}/payhost.db"

[plugins]
dir = "{plugins}"

[providers.system]
library = "payhost_provider_system"

[providers.sandbox]
library = "payhost_provider_sandbox"
timeout_ms = 400
max_concurrency = 16

[providers.sandbox.options]
state_dir = "{state}"
webhook_secret = "whsec_test_secret"
"#;

impl Scratch {
    /// Writes `text` (with `{dir}` as the scratch folder) and opens a host on it, with a
    /// reconciler that checks unknown attempts at once.
    pub async fn host(&self, text: &str) -> std::sync::Arc<payhost::Host> {
        ensure_built();
        let text = text.replace("{dir}", &self.dir.path().display().to_string());
        let path = self.config(&text);
        let config = Config::from_file_with_env(&path, |_| None).expect("valid config");
        let report = Loader::new(&config).load_all(&config);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let host = payhost::Host::open(&config, report.providers)
            .await
            .expect("host opens");
        std::sync::Arc::new(host.with_reconcile(payhost::engine::ReconcileSettings {
            first_check_ms: 0,
            base_backoff_ms: 0,
            max_checks: 3,
            stale_after_ms: 60_000,
            // The sandbox acts inside its call: once a call returned (or its process died),
            // nothing more can land, so no margin is needed. Calls still running are live.
            landing_margin_ms: 0,
            ..Default::default()
        }))
    }

    /// The config file written by [`Scratch::host`].
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("payhost.toml")
    }
}

/// Runs reconciliation passes until no attempt is open; fails the test if one still is after
/// `within` (an attempt whose call may still land stays open until its deadline, plus the
/// configured margin, has passed).
pub async fn reconcile_until_settled(host: &payhost::Host, within: std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        host.reconcile_due().await.expect("a reconciliation pass");
        let open = host.open_attempts().await.expect("open attempts");
        if open.is_empty() {
            return;
        }
        assert!(
            started.elapsed() <= within,
            "attempts still open after {within:?} of reconciliation: {open:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A `payhost serve` process on a free loopback port, killed when dropped.
pub struct Server {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Server {
    /// Starts `program args… --listen 127.0.0.1:0` and waits for its `listening on` line.
    pub fn start_program(program: &Path, args: &[&str]) -> Server {
        let stderr = if std::env::var_os("PAYHOST_TEST_SERVER_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        Server::spawn(program, args, stderr)
    }

    /// [`Server::start`] with the server's log (its stderr) written to `log`.
    pub fn start_logging(config: &Path, log: &Path) -> Server {
        let file = std::fs::File::create(log).expect("create the log file");
        Server::spawn(
            &payhost_bin(),
            &["serve", "--config", config.to_str().expect("UTF-8 path")],
            file.into(),
        )
    }

    fn spawn(program: &Path, args: &[&str], stderr: std::process::Stdio) -> Server {
        let mut c = Command::new(program);
        c.args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stderr(stderr);
        Server::from_command(c)
    }

    /// Starts a prepared command (its arguments must make it listen and print `listening on`).
    pub fn from_command(mut c: Command) -> Server {
        use std::io::BufRead;
        let mut child = c
            .stdout(std::process::Stdio::piped())
            .env_remove("RUST_LOG")
            .spawn()
            .expect("start the server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        break url.trim().to_owned();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("the server exited before listening");
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base }
    }

    /// Starts `payhost serve` with this config.
    pub fn start(config: &Path) -> Server {
        Server::start_program(
            &payhost_bin(),
            &["serve", "--config", config.to_str().expect("UTF-8 path")],
        )
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite store, in the scratch folder.
    Sqlite,
    /// PostgreSQL: a fresh database on `PAYHOST_TEST_POSTGRES` (default
    /// `postgres://root@127.0.0.1:5432/test`), dropped afterwards.
    Postgres,
}

/// The PostgreSQL server tests use, as an admin URL.
pub fn postgres_admin_url() -> String {
    std::env::var("PAYHOST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

/// Creates a fresh database and returns its URL. An unreachable PostgreSQL fails the test,
/// saying why; `None` only when the run opted out with `PAYHOST_SKIP=postgres` ([`cannot_run`]).
pub async fn fresh_postgres_database() -> Option<String> {
    let admin = postgres_admin_url();
    let connected = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_postgres::connect(&admin, tokio_postgres::NoTls),
    )
    .await;
    let (client, connection) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return unreachable_postgres(&admin, &e.to_string()),
        Err(_) => return unreachable_postgres(&admin, "connection timed out"),
    };
    tokio::spawn(connection);
    let name = format!("payhost_t_{}", uuid_like());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(b, _)| b)
        .to_owned();
    Some(format!("{base}/{name}"))
}

fn unreachable_postgres(url: &str, why: &str) -> Option<String> {
    cannot_run(
        "postgres",
        &format!(
            "PostgreSQL is not reachable at {url} ({why}); start it (`cargo xtask test` starts the machine's own), or point PAYHOST_TEST_POSTGRES=postgres://user@host:port/db at one"
        ),
    );
    None
}

/// A test cannot run: `need` (`postgres`, `localstripe`, `root`, `failover`) is missing. It
/// fails, saying why — unless the run opted out with `PAYHOST_SKIP=<need>[,…]`: then the skip is
/// written to `PAYHOST_SKIP_LOG` (for the run's summary, which `cargo xtask test` prints) and
/// the caller returns. A test never passes for what it did not run.
pub fn cannot_run(need: &str, why: &str) {
    let opted_out = std::env::var("PAYHOST_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == need);
    if !opted_out {
        panic!(
            "cannot run: {why}. (PAYHOST_SKIP={need} skips the tests that need it, counted in the run's summary.)"
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    eprintln!("SKIPPED (PAYHOST_SKIP={need}): {test}: {why}");
    if let Ok(log) = std::env::var("PAYHOST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{need}\t{test}\t{why}");
        }
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// Drops a test database (best effort).
pub fn drop_postgres_database(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    let name = name.to_owned();
    let admin = postgres_admin_url();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok((client, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    })
    .join();
}

impl Scratch {
    /// The storage URL for `backend`: a SQLite file here, or this scratch's own PostgreSQL
    /// database (made on first use). `None`: PostgreSQL unreachable outside CI (skip the test).
    pub async fn storage_url(&self, backend: Backend) -> Option<String> {
        match backend {
            Backend::Sqlite => Some(format!("sqlite://{}/payhost.db", self.dir.path().display())),
            Backend::Postgres => {
                let mut slot = self.postgres.lock().unwrap().clone();
                if slot.is_none() {
                    slot = fresh_postgres_database().await;
                    *self.postgres.lock().unwrap() = slot.clone();
                }
                slot
            }
        }
    }

    /// [`Scratch::host`] on `backend`; `None` when the test must be skipped.
    pub async fn host_on(
        &self,
        backend: Backend,
        text: &str,
    ) -> Option<std::sync::Arc<payhost::Host>> {
        let url = self.storage_url(backend).await?;
        let text = text.replace(
            "url = \"sqlite://{dir}/payhost.db\"",
            &format!("url = \"{url}\""),
        );
        Some(self.host(&text).await)
    }
}

/// A localstripe server (PyPI `localstripe`, installed by `cargo xtask test` in
/// `target/localstripe-venv`) on a loopback port, fresh each time, stopped when dropped.
pub struct LocalStripe {
    child: Option<std::process::Child>,
    port: u16,
}

impl LocalStripe {
    /// The venv's python, if localstripe is installed; otherwise the test fails saying how to
    /// get it (or is skipped, counted, with `PAYHOST_SKIP=localstripe`).
    fn python() -> Option<PathBuf> {
        let python = workspace().join("target/localstripe-venv/bin/python");
        if python.exists() {
            return Some(python);
        }
        cannot_run(
            "localstripe",
            "localstripe is not installed (cargo xtask test installs it in target/localstripe-venv)",
        );
        None
    }

    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Option<LocalStripe> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut s = LocalStripe { child: None, port };
        s.spawn(&Self::python()?);
        Some(s)
    }

    fn spawn(&mut self, python: &Path) {
        // localstripe's own CLI listens on every interface; run its app on loopback instead.
        let child = Command::new(python)
            .args([
                "-c",
                "import sys; from aiohttp import web; import localstripe.server as s; web.run_app(s.app, host='127.0.0.1', port=int(sys.argv[1]), print=None)",
                &self.port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start localstripe");
        self.child = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "localstripe did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (its port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        self.stop();
    }
}
