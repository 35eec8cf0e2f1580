//! Complete payment flows over HTTP against a spawned `payhost serve` (release build, durable
//! SQLite store, system provider): POST collection → POST session → authorize → capture, at
//! concurrency 1 and 16, reporting flows/s and p50/p99 flow latency.
//!
//! `cargo bench -p payhost-benches --bench http_flows`

use std::time::{Duration, Instant};

use payhost_e2e::Server;
use serde_json::{Value, json};

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client.post(url).json(&body).send().await.expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("json")
}

async fn flow(client: &reqwest::Client, base: &str) -> Duration {
    let started = Instant::now();
    let col = post(
        client,
        format!("{base}/v1/payment-collections"),
        json!({"amount": 2500, "currency_code": "eur"}),
    )
    .await;
    let session = post(
        client,
        format!("{base}/v1/payment-sessions"),
        json!({"payment_collection_id": col["id"], "provider_id": "system", "cart_id": "cart_bench"}),
    )
    .await;
    let sid = session["id"].as_str().unwrap();
    let auth = post(
        client,
        format!("{base}/v1/payment-sessions/{sid}/authorize"),
        json!({}),
    )
    .await;
    let pay = auth["payment"]["id"].as_str().unwrap();
    post(
        client,
        format!("{base}/v1/payments/{pay}/capture"),
        json!({}),
    )
    .await;
    started.elapsed()
}

async fn run(base: &str, concurrency: usize, flows: usize) -> (f64, Vec<Duration>) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, base) = (client.clone(), base.to_owned());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for _ in 0..flows / concurrency {
                    latencies.push(flow(&client, &base).await);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    (rate, latencies)
}

fn main() {
    payhost_e2e::ensure_built();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("payhost.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"sqlite://{}/bench.db\"\n[log]\nlevel = \"warn\"\n[plugins]\ndir = \"{}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\n",
            dir.path().display(),
            payhost_e2e::artifacts().display()
        ),
    )
    .unwrap();
    let server = Server::start(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        run(&server.base, 4, 40).await; // warm-up
        for (concurrency, flows) in [(1, 200), (16, 1600)] {
            let (rate, latencies) = run(&server.base, concurrency, flows).await;
            let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
            println!(
                "HTTP concurrency {concurrency:>2}: {rate:>7.1} flows/s  p50 {:>6.2} ms  p99 {:>6.2} ms  n={}",
                p(0.5),
                p(0.99),
                latencies.len()
            );
        }
    });
}
