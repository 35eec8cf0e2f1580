//! What the outbox costs and how fast events arrive: complete flows (4 events each) with no
//! endpoint configured and with one endpoint receiving every event (a real HTTP server in this
//! process), on the durable SQLite store and on PostgreSQL, in one run; and the delivery latency
//! from the moment a capture returned (its change committed) to the endpoint's receipt of its
//! `payment.captured` event, p50/p99, at concurrency 1 and 16.
//!
//! `cargo bench -p payhost-benches --bench events`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost::{Config, Host, Loader};
use payhost_benches::{flow, percentile};
use payhost_e2e::receiver::Receiver;

const SECRET: &str = "whsec_bench_secret_0123";

/// Runs `flows` flows with `concurrency` tasks; flows/s and when each capture returned.
async fn run(
    host: &Arc<Host>,
    concurrency: usize,
    flows: usize,
) -> (f64, HashMap<String, Instant>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for _ in 0..flows / concurrency {
                    done.push(flow(&host).await);
                }
                done
            })
        })
        .collect();
    let mut captured = HashMap::new();
    for t in tasks {
        captured.extend(t.await.unwrap());
    }
    (
        captured.len() as f64 / started.elapsed().as_secs_f64(),
        captured,
    )
}

/// Commit-to-receipt latency of each capture's event.
async fn latencies(receiver: &Receiver, captured: &HashMap<String, Instant>) -> Vec<Duration> {
    let wanted: Vec<&String> = captured.keys().collect();
    receiver
        .wait_until(Duration::from_secs(60), |r| {
            let got: std::collections::HashSet<&str> = r
                .iter()
                .filter(|r| r.kind == "payment.captured")
                .filter_map(|r| r.body["payment_id"].as_str())
                .collect();
            wanted.iter().all(|p| got.contains(p.as_str()))
        })
        .await;
    let mut out: Vec<Duration> = receiver
        .received()
        .iter()
        .filter(|r| r.kind == "payment.captured")
        .filter_map(|r| {
            let at = captured.get(r.body["payment_id"].as_str()?)?;
            Some(r.at.saturating_duration_since(*at))
        })
        .collect();
    out.sort();
    out
}

fn main() {
    payhost_e2e::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pg = payhost_e2e::fresh_postgres_database().await;
        let mut stores = vec![("SQLite", None)];
        if let Some(url) = &pg {
            stores.push(("PostgreSQL", Some(url.clone())));
        } else {
            println!("PostgreSQL: skipped (not reachable)");
        }
        for (name, url) in stores {
            for with_endpoint in [false, true, false, true] {
                let receiver = Receiver::start(SECRET).await;
                let n = uuid_like();
                let storage = url
                    .clone()
                    .unwrap_or_else(|| format!("sqlite://{}/bench-{n}.db", dir.path().display()));
                let endpoint = if with_endpoint {
                    format!(
                        "[events]\n[[events.endpoints]]\nid = \"bench\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
                        receiver.url
                    )
                } else {
                    String::new()
                };
                let path = dir.path().join(format!("bench-{n}.toml"));
                std::fs::write(
                    &path,
                    format!(
                        "[storage]\nurl = \"{storage}\"\npool_size = 16\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nmax_concurrency = 64\n{endpoint}",
                        payhost_e2e::artifacts().display()
                    ),
                )
                .unwrap();
                let config = Config::from_file(&path).unwrap();
                let report = Loader::new(&config).load_all(&config);
                let host = Arc::new(Host::open(&config, report.providers).await.unwrap());
                let deliverer = host.spawn_deliverer();
                run(&host, 4, 40).await; // warm-up
                let mut line = format!(
                    "{name:<10} {:<13}",
                    if with_endpoint { "one endpoint" } else { "no endpoint" }
                );
                for (concurrency, flows) in [(1, 200), (16, 1600)] {
                    let (rate, captured) = run(&host, concurrency, flows).await;
                    line += &format!("  c={concurrency:<2} {rate:>7.1} flows/s");
                    if with_endpoint {
                        let l = latencies(&receiver, &captured).await;
                        line += &format!(
                            " (commit→receipt p50 {:>5.1} ms p99 {:>6.1} ms, n={})",
                            percentile(&l, 0.5).as_secs_f64() * 1e3,
                            percentile(&l, 0.99).as_secs_f64() * 1e3,
                            l.len()
                        );
                    }
                }
                println!("{line}");
                deliverer.abort();
            }
        }
        if let Some(url) = pg {
            payhost_e2e::drop_postgres_database(&url);
        }
    });
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
