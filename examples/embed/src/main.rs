//! An embedder's own server with payhost inside it: the storefront's routes at `/store/…`, and
//! payhost's whole API (lifecycle, webhooks, health, metrics) nested under `/payments`, sharing
//! one `Host` that the storefront's own handlers call too.
//!
//! `embed --config config/payhost.toml --listen 127.0.0.1:3000`

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use payhost::engine::NewCollection;
use payhost::{Config, Host, Loader};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let config = Config::from_file(arg("--config").unwrap_or("config/payhost.toml".into()))
        .unwrap_or_else(|e| panic!("{e}"));
    let report = Loader::new(&config).load_all(&config);
    let host = Arc::new(
        Host::open(&config, report.providers)
            .await
            .expect("open payhost"),
    );
    host.spawn_reconciler();

    let payments = payhost::http::router(payhost::http::AppState::new(host.clone(), Vec::new()));
    let app = Router::new()
        .route(
            "/store/hello",
            get(|| async { "hello from the storefront" }),
        )
        .route("/store/checkout", get(checkout).with_state(host))
        .nest("/payments", payments);

    let listen = arg("--listen").unwrap_or("127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    println!(
        "listening on http://{}",
        listener.local_addr().expect("address")
    );
    axum::serve(listener, app).await.expect("serve");
}

/// A storefront handler using the same Host directly.
async fn checkout(State(host): State<Arc<Host>>) -> Json<payhost::domain::PaymentCollection> {
    let collection = host
        .create_collection(
            NewCollection {
                amount: 4200,
                currency_code: "eur".into(),
                metadata: Default::default(),
            },
            None,
        )
        .await
        .expect("collection");
    Json(collection)
}
