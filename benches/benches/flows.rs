//! Complete payment flows through the library API on the durable SQLite store, with the system
//! provider: create collection → create session → authorize → capture (7 durable commits per
//! flow). Reports flows/s, p50/p99 flow latency and peak memory at concurrency 1 and 16, and the
//! disk's own limit (durable 4 KiB appends per second) for comparison.
//!
//! Then the same on PostgreSQL (`PAYHOST_TEST_POSTGRES`, default the local server; a fresh
//! database is made and dropped): one host, and two hosts on the one database sharing the load.
//!
//! `cargo bench -p payhost-benches --bench flows`
//!
//! `cargo bench -p payhost-benches --bench flows -- --callgrind` instead counts the host's CPU
//! instructions per flow with `valgrind --tool=callgrind` (repeatable on a noisy machine): it
//! runs itself under callgrind with 40 and with 120 flows at concurrency 1 on each store, and
//! divides the difference by 80, so start-up and warm-up cancel out. On PostgreSQL that is the
//! client's side only (the server is another process).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use payhost::{Config, Host, Loader};

const COMMITS_PER_FLOW: f64 = 7.0;

async fn flow(host: &Host) -> Duration {
    let started = Instant::now();
    payhost_benches::flow(host).await;
    started.elapsed()
}

use payhost_benches::percentile;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Durable 4 KiB appends per second on the folder's disk: the ceiling for un-batched commits.
fn disk_syncs_per_second(dir: &std::path::Path) -> f64 {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = [7u8; 4096];
    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(path);
    rate
}

async fn run(host: Arc<Host>, concurrency: usize, flows: usize) -> (f64, Vec<Duration>) {
    run_on(&[host], concurrency, flows).await
}

/// Runs `flows` flows with `concurrency` tasks spread over `hosts`.
async fn run_on(hosts: &[Arc<Host>], concurrency: usize, flows: usize) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let per_task = flows / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let host = hosts[i % hosts.len()].clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    latencies.push(flow(&host).await);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(flows);
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    (rate, latencies)
}

/// Runs `n` flows at `concurrency` on `store` (`sqlite` or a PostgreSQL URL) after a warm-up,
/// and nothing else: what `--callgrind` measures (at concurrency 1), and a process to point a
/// profiler at (`--flows-only sqlite 20000 16`).
fn flows_only(store: &str, n: usize, concurrency: usize) {
    let dir = tempfile::tempdir().unwrap();
    let url = if store == "sqlite" {
        format!("sqlite://{}/bench.db", dir.path().display())
    } else {
        store.to_owned()
    };
    let path = dir.path().join("payhost.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\nurl = \"{url}\"\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nmax_concurrency = 64\n",
            payhost_e2e::artifacts().display()
        ),
    )
    .unwrap();
    let config = Config::from_file(&path).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let report = Loader::new(&config).load_all(&config);
        let host = Arc::new(Host::open(&config, report.providers).await.unwrap());
        run(host.clone(), 1, 10).await; // warm-up
        let (rate, _) = run(host, concurrency, n).await;
        eprintln!("{rate:.1} flows/s");
    });
}

/// Instructions the whole process executed under callgrind (its `Collected` line).
fn instructions(store: &str, n: usize) -> u64 {
    let out = std::process::Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(std::env::current_exe().unwrap())
        .args(["--flows-only", store, &n.to_string()])
        .output()
        .expect("valgrind (Debian package valgrind) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no instruction count from callgrind:\n{err}"))
}

fn callgrind() {
    payhost_e2e::ensure_built();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pg = runtime.block_on(payhost_e2e::fresh_postgres_database());
    let mut stores = vec![("SQLite", "sqlite".to_owned())];
    if let Some(url) = &pg {
        stores.push(("PostgreSQL", url.clone()));
    }
    for (name, store) in stores {
        let few = instructions(&store, 40);
        let many = instructions(&store, 120);
        println!(
            "{name}: {:.0} instructions per flow (callgrind; {few} for 40 flows, {many} for 120)",
            (many.saturating_sub(few)) as f64 / 80.0
        );
    }
    if let Some(url) = pg {
        payhost_e2e::drop_postgres_database(&url);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--flows-only") {
        let concurrency = args.get(i + 3).map_or(1, |c| c.parse().unwrap());
        return flows_only(&args[i + 1], args[i + 2].parse().unwrap(), concurrency);
    }
    if args.iter().any(|a| a == "--callgrind") {
        return callgrind();
    }
    payhost_e2e::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("payhost.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"sqlite://{}/bench.db\"\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nmax_concurrency = 64\n",
            dir.path().display(),
            payhost_e2e::artifacts().display()
        ),
    )
    .unwrap();
    let config = Config::from_file(&config).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let syncs = disk_syncs_per_second(dir.path());
    println!(
        "disk: {syncs:.0} durable 4 KiB appends/s → at most {:.0} flows/s without shared commits",
        syncs / COMMITS_PER_FLOW
    );
    runtime.block_on(async {
        let report = Loader::new(&config).load_all(&config);
        let host = Arc::new(Host::open(&config, report.providers).await.unwrap());
        run(host.clone(), 4, 40).await; // warm-up
        for (concurrency, flows) in [(1, 200), (16, 1600)] {
            let (rate, latencies) = run(host.clone(), concurrency, flows).await;
            println!(
                "concurrency {concurrency:>2}: {rate:>7.1} flows/s ({:.0} commits/s)  p50 {:>6.2} ms  p99 {:>6.2} ms  n={}",
                rate * COMMITS_PER_FLOW,
                percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                latencies.len()
            );
        }
    });
    println!("peak memory (VmHWM): {:.1} MiB", peak_rss_mib());

    runtime.block_on(async {
        let Some(url) = payhost_e2e::fresh_postgres_database().await else {
            println!("PostgreSQL: skipped (not reachable)");
            return;
        };
        let pg_config = dir.path().join("pg.toml");
        std::fs::write(
            &pg_config,
            format!(
                "[storage]\nurl = \"{url}\"\npool_size = 16\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\nmax_concurrency = 64\n",
                payhost_e2e::artifacts().display()
            ),
        )
        .unwrap();
        let config = Config::from_file(&pg_config).unwrap();
        let open = || async {
            let report = Loader::new(&config).load_all(&config);
            Arc::new(Host::open(&config, report.providers).await.unwrap())
        };
        let one = open().await;
        run(one.clone(), 4, 40).await; // warm-up
        for (concurrency, flows) in [(1, 200), (16, 1600)] {
            let before = one.store().statement_counts().unwrap_or_default();
            let (rate, latencies) = run(one.clone(), concurrency, flows).await;
            let after = one.store().statement_counts().unwrap_or_default();
            println!(
                "PostgreSQL, one host,  concurrency {concurrency:>2}: {rate:>7.1} flows/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {:.1} statements, {:.1} write transactions per flow",
                percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                (after.0 - before.0) as f64 / flows as f64,
                (after.1 - before.1) as f64 / flows as f64,
            );
        }
        let two = [one, open().await];
        let (rate, latencies) = run_on(&two, 16, 1600).await;
        println!(
            "PostgreSQL, two hosts, concurrency 16: {rate:>7.1} flows/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        );
        drop(two);
        payhost_e2e::drop_postgres_database(&url);
    });
}
