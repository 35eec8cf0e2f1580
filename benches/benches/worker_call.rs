//! What a provider call costs through a worker process (`isolation = "process"`), beside the
//! same call in-process: round trip p50/p99 at concurrency 1, calls/s at concurrency 16.
//!
//! `cargo bench -p payhost-benches --bench worker_call`

use std::time::{Duration, Instant};

use payhost::{Config, Loader};
use payhost_benches::authorize_request;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn measure(label: &str, provider: &payhost::Provider) {
    let request = authorize_request();
    for _ in 0..2_000 {
        provider.call_blocking(&request).unwrap();
    }
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        provider.call_blocking(&request).unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < run_for {
                        provider.call_blocking(&request).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    println!(
        "{label:<12} c=1 p50 {:>9.1?} p99 {:>9.1?}   c=16 {:>8.0} calls/s",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        total as f64 / started.elapsed().as_secs_f64()
    );
}

fn main() {
    payhost_e2e::ensure_built();
    let scratch = payhost_e2e::Scratch::new();
    // The worker is the payhost binary, not this bench.
    let path = scratch.config(&format!(
        "[plugins]\ndir = \"{{plugins}}\"\nworker = \"{}\"\n[providers.inproc]\nlibrary = \"payhost_provider_system\"\n[providers.worker]\nlibrary = \"payhost_provider_system\"\nisolation = \"process\"\n",
        payhost_e2e::payhost_bin().display()
    ));
    let config = Config::from_file(&path).unwrap();
    let report = Loader::new(&config).load_all(&config);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    measure("in_process", report.providers.get("inproc").unwrap());
    measure("process", report.providers.get("worker").unwrap());
}
