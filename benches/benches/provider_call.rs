//! What one provider call costs across the plugin boundary, against the same call in-process.
//!
//! `cargo bench -p payhost-benches --bench provider_call`
//!
//! - `in_process/trait`: the system provider's `authorize`, called as a Rust method.
//! - `in_process/json_envelope`: the same through the SDK's JSON envelope, without the dylib
//!   (the test kit's path): what the JSON costs.
//! - `boundary/blocking`: through the loaded `.so` (abi_stable trait object + JSON both ways).
//! - `boundary/async`: what the engine pays: semaphore, `spawn_blocking`, deadline, then the
//!   boundary call.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use payhost::{Config, Loader};
use payhost_benches::authorize_request;
use payhost_provider_api::testkit::TestHost;
use payhost_provider_api::{PaymentProvider, ProviderContext};
use payhost_provider_system::{SystemOptions, SystemProvider};

fn calls(c: &mut Criterion) {
    payhost_e2e::ensure_built();
    let request = authorize_request();

    let mut group = c.benchmark_group("authorize");
    let native = SystemProvider::new(
        SystemOptions::default(),
        ProviderContext {
            instance_id: "bench".into(),
            protocol: 1,
            config_dir: ".".into(),
            host: TestHost::new().services(),
        },
    )
    .unwrap();
    group.bench_function("in_process/trait", |b| {
        b.iter(|| native.authorize(black_box(request.clone())).unwrap())
    });

    let enveloped = TestHost::new()
        .instantiate::<SystemProvider>(serde_json::json!({}))
        .unwrap();
    group.bench_function("in_process/json_envelope", |b| {
        b.iter(|| enveloped.authorize(black_box(&request)).unwrap())
    });

    let scratch = payhost_e2e::Scratch::new();
    let path = scratch.config(
        "[plugins]\ndir = \"{plugins}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\n",
    );
    let config = Config::from_file(&path).unwrap();
    let report = Loader::new(&config).load_all(&config);
    let system = report.providers.get("system").unwrap().clone();
    group.bench_function("boundary/blocking", |b| {
        b.iter(|| system.call_blocking(black_box(&request)).unwrap())
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    group.bench_function("boundary/async", |b| {
        b.to_async(&runtime)
            .iter(|| async { system.call(black_box(request.clone())).await.unwrap() })
    });
    group.finish();
}

criterion_group!(benches, calls);
criterion_main!(benches);
