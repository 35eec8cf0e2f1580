//! PostgreSQL failover under keyed load: a primary with a synchronous streaming standby, both
//! on loopback ports, `payhost serve` on the multi-host URL (`target_session_attrs=read-write`).
//! Round one kills the primary's postmaster (a machine death) and promotes the standby; round
//! two rebuilds a standby and switches over on purpose. Every acknowledged operation must survive,
//! no key stay stuck, the sandbox's ledger agree, and the time from losing the primary to the
//! first acknowledged operation is reported.
//!
//! Runs as root with the machine's PostgreSQL 15 binaries, as the `postgres` user; skips (or, in
//! CI, fails) when they are missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use payhost_e2e::{HOST, Scratch, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn bin(name: &str) -> PathBuf {
    Path::new("/usr/lib/postgresql/15/bin").join(name)
}

/// Runs a PostgreSQL tool as the `postgres` user.
fn as_postgres(program: &Path, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("run a PostgreSQL tool")
}

fn ok(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One PostgreSQL server in its own folder.
struct Node {
    dir: PathBuf,
    port: u16,
}

impl Node {
    fn start(&self) {
        let log = self.dir.with_extension("log");
        ok(
            as_postgres(
                &bin("pg_ctl"),
                &[
                    "-D",
                    self.dir.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &format!("-p {} -k /tmp -c listen_addresses=127.0.0.1", self.port),
                    "-w",
                    "start",
                ],
            ),
            "pg_ctl start",
        );
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// A machine death: the postmaster and every backend SIGKILLed. The fault is checked: the
    /// node no longer takes connections.
    fn kill(&self) {
        let pid = self.postmaster_pid().expect("the node is running");
        // The backends (pkill finds none when there are none: exit 1, which is fine).
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &pid.to_string()])
            .status();
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success(), "SIGKILL the postmaster {pid}");
        self.refuses_connections();
    }

    /// Stops whatever is left of a node (a killed one, or at the end), best effort.
    fn clean_up(&self) {
        let _ = as_postgres(
            &bin("pg_ctl"),
            &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }

    /// Stops a running node: checked, and it then refuses connections.
    fn stop(&self) {
        ok(
            as_postgres(
                &bin("pg_ctl"),
                &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"],
            ),
            "pg_ctl stop",
        );
        self.refuses_connections();
    }

    /// Waits until the node's port refuses connections (at most 10 s).
    fn refuses_connections(&self) {
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "node on port {} still takes connections",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn promote(&self) {
        ok(
            as_postgres(
                &bin("pg_ctl"),
                &["-D", self.dir.to_str().unwrap(), "-w", "promote"],
            ),
            "pg_ctl promote",
        );
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("timeout")
            .args([
                "20",
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
            ])
            .arg(self.port.to_string())
            .args(["-d", db, "-Atc", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A primary with a synchronous standby: (primary, standby).
struct Formation {
    root: PathBuf,
    nodes: Vec<Node>,
}

impl Formation {
    fn new() -> Option<Formation> {
        if !bin("initdb").exists() || Command::new("runuser").arg("--help").output().is_err() {
            payhost_e2e::cannot_run(
                "failover",
                "PostgreSQL 15 server binaries (/usr/lib/postgresql/15/bin) and runuser are needed",
            );
            return None;
        }
        let root = std::env::temp_dir().join(format!("payhost-failover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", root.to_str().unwrap()])
            .status();
        Some(Formation {
            root,
            nodes: Vec::new(),
        })
    }

    fn primary(&mut self, port: u16) -> usize {
        let dir = self.root.join(format!("n{port}"));
        ok(
            as_postgres(
                &bin("initdb"),
                &[
                    "-D",
                    dir.to_str().unwrap(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ],
            ),
            "initdb",
        );
        // Synchronous once a standby is attached (see `standby`): a commit must not wait for one
        // that does not exist yet.
        let conf = "\nwal_level = replica\nmax_wal_senders = 5\nsynchronous_commit = on\nfsync = on\nwal_keep_size = 64MB\n";
        append(&dir.join("postgresql.conf"), conf);
        append(
            &dir.join("pg_hba.conf"),
            "\nhost replication postgres 127.0.0.1/32 trust\n",
        );
        let node = Node { dir, port };
        node.start();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// A synchronous standby of `primary` on `port`.
    fn standby(&mut self, primary: usize, port: u16) -> usize {
        let dir = self.root.join(format!("n{port}-{}", self.nodes.len()));
        let from = &self.nodes[primary];
        ok(
            as_postgres(
                &bin("pg_basebackup"),
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &from.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    dir.to_str().unwrap(),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                    "-c",
                    "fast",
                ],
            ),
            "pg_basebackup",
        );
        // Named as the primary's synchronous standby; once promoted it has none of its own, so
        // it must not wait for one.
        append(
            &dir.join("postgresql.auto.conf"),
            &format!(
                "\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=standby'\nsynchronous_standby_names = ''\n",
                from.port
            ),
        );
        let node = Node { dir, port };
        node.start();
        self.nodes.push(node);
        let idx = self.nodes.len() - 1;
        self.nodes[primary].psql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = 'standby'",
        );
        self.nodes[primary].psql("postgres", "SELECT pg_reload_conf()");
        // Wait until the primary sees it as synchronous.
        let started = Instant::now();
        while self.nodes[primary].psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        ) != "1"
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the standby never became synchronous"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        idx
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.clean_up();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// One keyed step retried with its key until answered for good; (status, body, first ack time).
async fn keyed(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    give_up: Instant,
) -> (StatusCode, Value) {
    let started = Instant::now();
    loop {
        if let Ok(r) = http
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
        {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if !matches!(status.as_u16(), 409 | 500..=599) {
                // No key is stuck: answered within the failover plus a bound.
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "key {key} took {:?}",
                    started.elapsed()
                );
                return (status, body);
            }
        }
        assert!(Instant::now() < give_up, "key {key} never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_lost_or_switched_over_loses_no_acknowledged_payment() {
    let Some(mut f) = Formation::new() else {
        return;
    };
    let (p1, p2) = (free_port(), free_port());
    let primary = f.primary(p1);
    f.nodes[primary].psql("postgres", "CREATE DATABASE payhost");
    let standby = f.standby(primary, p2);

    let scratch = Scratch::new();
    let url = format!(
        "postgres://postgres@127.0.0.1:{p1},127.0.0.1:{p2}/payhost?target_session_attrs=read-write"
    );
    let text = HOST.replace(
        "url = \"sqlite://{dir}/payhost.db\"",
        &format!("url = \"{url}\"\nconnect_timeout_ms = 1000\nstatement_timeout_ms = 3000\nlease_ms = 30000"),
    );
    let config = scratch.config(&format!(
        "{text}\n[reconcile]\nlanding_margin_ms = 0\ninterval_ms = 200\n"
    ));
    let check = payhost_e2e::payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        report.contains("storage primary") && report.contains("synchronous standbys 1"),
        "{report}"
    );
    let server = Server::start(&config);
    let base = server.base.clone();

    // Keyed clients run flows; every acknowledged capture is noted with when it was answered.
    let running = Arc::new(AtomicBool::new(true));
    let give_up = Instant::now() + Duration::from_secs(120);
    // (when the capture was first sent, when it was acknowledged, session, payment)
    type Ack = (Instant, Instant, String, String);
    let acks = Arc::new(std::sync::Mutex::new(Vec::<Ack>::new()));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (base, running, acks) = (base.clone(), running.clone(), acks.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut i = 0;
            while running.load(Ordering::SeqCst) {
                i += 1;
                let k = |s: &str| format!("c{c}-f{i}-{s}");
                let (s, col) = keyed(
                    &http,
                    &format!("{base}/v1/payment-collections"),
                    &k("col"),
                    &json!({"amount": 1000, "currency_code": "eur"}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED, "{col}");
                let (s, ses) = keyed(
                    &http,
                    &format!("{base}/v1/payment-sessions"),
                    &k("ses"),
                    &json!({"payment_collection_id": col["id"], "provider_id": "sandbox"}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED, "{ses}");
                let sid = ses["id"].as_str().unwrap().to_owned();
                let (s, a) = keyed(
                    &http,
                    &format!("{base}/v1/payment-sessions/{sid}/authorize"),
                    &k("auth"),
                    &json!({}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{a}");
                let pay = a["payment"]["id"].as_str().unwrap().to_owned();
                let sent = Instant::now();
                let (s, p) = keyed(
                    &http,
                    &format!("{base}/v1/payments/{pay}/capture"),
                    &k("cap"),
                    &json!({"amount": 700}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{p}");
                acks.lock().unwrap().push((sent, Instant::now(), sid, pay));
            }
        }));
    }
    let acked_after = |t: Instant| acks.lock().unwrap().iter().filter(|a| a.0 > t).count();
    // The first capture sent after the loss and acknowledged: when service was back.
    let wait_first_ack_after = |t: Instant| {
        let acks = acks.clone();
        async move {
            loop {
                if let Some(a) = acks
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|a| a.0 > t)
                    .map(|a| a.1)
                    .min()
                {
                    return a - t;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "no acknowledged operation after losing the primary"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Round 1: the primary's machine dies; the standby is promoted.
    let lost = Instant::now();
    f.nodes[primary].kill();
    std::thread::sleep(Duration::from_millis(500));
    f.nodes[standby].promote();
    let death = wait_first_ack_after(lost).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(acked_after(lost) > 0);

    // Round 2: a new standby for the new primary, then a planned switchover to it.
    // What the killed primary left (a stale pid file) goes, and the node with it.
    f.nodes[primary].clean_up();
    let _ = std::fs::remove_dir_all(&f.nodes[primary].dir);
    let rebuilt = f.standby(standby, p1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let switched = Instant::now();
    f.nodes[standby].stop();
    f.nodes[rebuilt].promote();
    let switchover = wait_first_ack_after(switched).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    running.store(false, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() >= 8, "only {} flows acknowledged", acks.len());
    let http = reqwest::Client::new();
    let ledger =
        std::fs::read_to_string(scratch.dir.path().join("state/sandbox.ledger.jsonl")).unwrap();
    let entries: Vec<Value> = ledger
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for (_, _, sid, pay) in &acks {
        let p: Value = http
            .get(format!("{base}/v1/payments/{pay}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            p["captured_amount"], 700,
            "an acknowledged capture was lost: {p}"
        );
        let captures: Vec<i64> = entries
            .iter()
            .filter(|e| e["session_id"] == sid.as_str() && e["op"] == "capture")
            .map(|e| e["amount"].as_i64().unwrap())
            .collect();
        assert_eq!(captures, vec![700], "captured once: {sid}");
    }
    eprintln!(
        "{} acknowledged flows, 0 lost; primary lost to first ack: machine death {death:?}, switchover {switchover:?}",
        acks.len()
    );
}
