//! Store outages: a TCP proxy between `payhost serve` and PostgreSQL cuts connections (RST),
//! blackholes them (no answer at all) and slows them, while keyed clients run flows and retry
//! with their keys. Every acknowledged operation must be there afterwards, no key stuck past the
//! outage by more than a bound, the sandbox's ledger in agreement, and no call made twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use payhost_e2e::{Backend, HOST, Scratch, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;
const SLOW: u8 = 3;

/// A proxy whose behaviour the test switches.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = m.clone();
                tokio::spawn(async move {
                    match mode.load(Ordering::SeqCst) {
                        CUT => return reset(client),
                        BLACKHOLE => {
                            tokio::time::sleep(Duration::from_secs(120)).await;
                            return;
                        }
                        _ => {}
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return reset(client);
                    };
                    pipe(client, server, mode).await;
                });
            }
        });
        Proxy { port, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

fn reset(stream: TcpStream) {
    #[allow(deprecated)] // the point: a reset, not a graceful close
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Copies one way, obeying the mode. `true`: cut (reset both ends).
async fn one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    dead: Arc<AtomicBool>,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if mode.load(Ordering::SeqCst) == CUT {
                    return (from, to, true);
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return (from, to, false),
            Ok(n) => n,
        };
        match mode.load(Ordering::SeqCst) {
            CUT => return (from, to, true),
            BLACKHOLE => dead.store(true, Ordering::SeqCst),
            SLOW => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => {}
        }
        // Once blackholed, a connection never forwards again (a partition).
        if dead.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return (from, to, false);
        }
    }
}

/// Copies both ways until either side closes; a cut resets both ends.
async fn pipe(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let dead = Arc::new(AtomicBool::new(false));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(one_way(cr, sw, mode.clone(), dead.clone()));
    let down = tokio::spawn(one_way(sr, cw, mode, dead));
    let (Ok((cr, sw, cut_up)), Ok((sr, cw, cut_down))) = (up.await, down.await) else {
        return;
    };
    if cut_up || cut_down {
        if let Ok(client) = cr.reunite(cw) {
            reset(client);
        }
        if let Ok(server) = sr.reunite(sw) {
            reset(server);
        }
    }
}

/// One keyed step: retried with the same key until it is answered for good. Returns the answer
/// and how long it took.
async fn keyed(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    give_up: Instant,
) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let sent = client
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        if let Err(e) = &sent {
            last = e.to_string();
        }
        if let Ok(r) = sent {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            last = format!("{status} {body}");
            // 409: in progress or an outcome still open; 503/504: the store or the provider.
            if !matches!(status.as_u16(), 409 | 500..=599) {
                return (status, body, started.elapsed());
            }
        }
        assert!(
            Instant::now() < give_up,
            "key {key} never completed: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Flow {
    session: String,
    payment: String,
    captured: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outages_lose_nothing_and_leave_no_key_stuck() {
    let scratch = Scratch::new();
    let Some(url) = scratch.storage_url(Backend::Postgres).await else {
        return;
    };
    let proxy = Proxy::start(5432).await;
    let proxied = url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(proxied, url, "the test database is on 127.0.0.1:5432");
    let text = HOST.replace(
        "url = \"sqlite://{dir}/payhost.db\"",
        &format!("url = \"{proxied}\"\nconnect_timeout_ms = 1000\nstatement_timeout_ms = 3000\nlease_ms = 30000\nrenew_ms = 1000"),
    );
    let path = scratch.config(&format!(
        "{text}\n[reconcile]\nlanding_margin_ms = 0\ninterval_ms = 200\n"
    ));
    let log = scratch.dir.path().join("server.log");
    let server = Server::start_logging(&path, &log);
    let base = server.base.clone();
    let running = Arc::new(AtomicBool::new(true));
    let give_up = Instant::now() + Duration::from_secs(90);
    let mut clients = Vec::new();
    for c in 0..4 {
        let (base, running) = (base.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut flows = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut i = 0;
            while running.load(Ordering::SeqCst) {
                i += 1;
                let k = |step: &str| format!("c{c}-f{i}-{step}");
                let (s, col, t1) = keyed(
                    &http,
                    &format!("{base}/v1/payment-collections"),
                    &k("col"),
                    &json!({"amount": 1000, "currency_code": "eur"}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED, "{col}");
                let (s, ses, t2) = keyed(
                    &http,
                    &format!("{base}/v1/payment-sessions"),
                    &k("ses"),
                    &json!({"payment_collection_id": col["id"], "provider_id": "sandbox"}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED, "{ses}");
                let sid = ses["id"].as_str().unwrap().to_owned();
                let (s, auth, t3) = keyed(
                    &http,
                    &format!("{base}/v1/payment-sessions/{sid}/authorize"),
                    &k("auth"),
                    &json!({}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{auth}");
                let pay = auth["payment"]["id"].as_str().unwrap().to_owned();
                let (s, p, t4) = keyed(
                    &http,
                    &format!("{base}/v1/payments/{pay}/capture"),
                    &k("cap"),
                    &json!({"amount": 600}),
                    give_up,
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{p}");
                assert_eq!(p["captured_amount"], 600, "{p}");
                slowest = slowest.max(t1).max(t2).max(t3).max(t4);
                flows.push(Flow {
                    session: sid,
                    payment: pay,
                    captured: 600,
                });
            }
            (flows, slowest)
        }));
    }
    let outages = [(CUT, "cut"), (BLACKHOLE, "blackhole"), (SLOW, "slow")];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut longest_outage = Duration::ZERO;
    for (mode, name) in outages {
        let began = Instant::now();
        proxy.set(mode);
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.set(PASS);
        longest_outage = longest_outage.max(began.elapsed());
        eprintln!("{name} for {:?}", began.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    running.store(false, Ordering::SeqCst);
    let mut flows = Vec::new();
    let mut slowest = Duration::ZERO;
    for c in clients {
        let (f, s) = c.await.unwrap_or_else(|e| {
            let logs = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            panic!(
                "{e}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
        flows.extend(f);
        slowest = slowest.max(s);
    }
    // A key answered at most the outage plus a bound after its first try.
    let bound = Duration::from_secs(10);
    assert!(
        slowest < longest_outage + bound,
        "a keyed step took {slowest:?} (outage {longest_outage:?} + bound {bound:?})"
    );
    assert!(flows.len() >= 8, "only {} flows completed", flows.len());
    // Everything acknowledged is there, and the processor agrees: each capture made once.
    let http = reqwest::Client::new();
    let ledger =
        std::fs::read_to_string(scratch.dir.path().join("state/sandbox.ledger.jsonl")).unwrap();
    let entries: Vec<Value> = ledger
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for f in &flows {
        let p: Value = http
            .get(format!("{base}/v1/payments/{}", f.payment))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(p["captured_amount"], f.captured, "{p}");
        let captures: Vec<i64> = entries
            .iter()
            .filter(|e| e["session_id"] == f.session.as_str() && e["op"] == "capture")
            .map(|e| e["amount"].as_i64().unwrap())
            .collect();
        assert_eq!(captures, vec![f.captured], "session {}", f.session);
    }
    let open: Value = http
        .get(format!("{base}/v1/attempts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(open["attempts"].as_array().unwrap().is_empty(), "{open}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("payhost_store_up 1"), "{metrics}");
    assert!(metrics.contains("payhost_owed_writes 0"), "{metrics}");
    // The outages reached payhost: it saw the store fail and counted the time it was down.
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("payhost_store_errors_total") >= 1.0, "{metrics}");
    assert!(
        value("payhost_store_outage_seconds_total") >= 1.0,
        "{metrics}"
    );
    // And each session was authorized once at the processor.
    for f in &flows {
        let authorizations = entries
            .iter()
            .filter(|e| e["session_id"] == f.session.as_str() && e["op"] == "authorize")
            .count();
        assert_eq!(authorizations, 1, "session {}", f.session);
    }
    eprintln!(
        "{} flows acknowledged through cut, blackhole and slow outages; slowest keyed step {slowest:?}",
        flows.len()
    );
}
