//! Time to load and instantiate one plugin, from a file never loaded before (dlopen, abi_stable's
//! layout check, manifest, protocol negotiation, options check, instantiation), and to
//! instantiate again from a library already loaded.
//!
//! `cargo bench -p payhost-benches --bench plugin_load`
//!
//! A library is never unloaded, so every cold sample loads a fresh copy of the file; the copies
//! stay mapped until the process exits, which is why this is a bench binary with a fixed number
//! of samples and not a criterion loop.

use std::time::{Duration, Instant};

use payhost::Loader;
use payhost::config::{LibrarySource, ProviderSettings};
use sha2::{Digest, Sha256};

const COLD_SAMPLES: usize = 30;
const WARM_SAMPLES: usize = 2000;

fn settings(id: &str, path: std::path::PathBuf) -> ProviderSettings {
    ProviderSettings {
        id: id.into(),
        library: LibrarySource::Path(path),
        enabled: true,
        sha256: None,
        timeout: Duration::from_secs(5),
        max_concurrency: 8,
        resend_unknown: true,
        webhook_rate: payhost::config::DEFAULT_WEBHOOK_RATE,
        isolation: payhost::config::Isolation::InProcess,
        max_memory_mb: None,
        kill_after: Duration::from_secs(2),
        http_max_response_bytes: payhost::config::DEFAULT_HTTP_MAX_RESPONSE_BYTES,
        options: serde_json::json!({}),
    }
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<44} n={:<5} min {:>9.1} µs  median {:>9.1} µs  p90 {:>9.1} µs  max {:>9.1} µs",
        samples.len(),
        us(samples[0]),
        us(samples[samples.len() / 2]),
        us(samples[samples.len() * 9 / 10]),
        us(samples[samples.len() - 1]),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument would be ignored here.
    let original = payhost_e2e::library("payhost_provider_system");
    let size = std::fs::metadata(&original).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::with_plugin_dir(dir.path());

    let mut cold = Vec::with_capacity(COLD_SAMPLES);
    for i in 0..COLD_SAMPLES {
        let copy = dir.path().join(format!("libcopy{i}.so"));
        std::fs::copy(&original, &copy).unwrap();
        let started = Instant::now();
        let provider = loader.load(&settings("system", copy), None).unwrap();
        cold.push(started.elapsed());
        drop(provider);
    }
    let warm_path = dir.path().join("libcopy0.so");
    let mut warm = Vec::with_capacity(WARM_SAMPLES);
    for _ in 0..WARM_SAMPLES {
        let started = Instant::now();
        let provider = loader
            .load(&settings("system", warm_path.clone()), None)
            .unwrap();
        warm.push(started.elapsed());
        drop(provider);
    }
    let mut hashing = Vec::with_capacity(COLD_SAMPLES);
    for _ in 0..COLD_SAMPLES {
        let started = Instant::now();
        let digest = Sha256::digest(std::fs::read(&original).unwrap());
        hashing.push(started.elapsed());
        std::hint::black_box(digest);
    }
    println!("library {} ({} KiB)", original.display(), size / 1024);
    report("load + instantiate, file never loaded", cold);
    report("of which: read + sha256 of the file", hashing);
    report("instantiate again (library loaded, file unchanged)", warm);
}
