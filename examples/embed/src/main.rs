//! An embedder's own server with payhost inside it: the storefront's routes at `/store/…`, and
//! payhost's whole API (lifecycle, webhooks, health, metrics) nested under `/payments`, sharing
//! one `Host` that the storefront's own handlers call too. Orders are marked paid from payhost's
//! event stream (`Host::events`) — whether the payment was authorized by a call, by a 3-D Secure
//! return or by the processor's webhook — and the stream's cursor is saved with the orders, so a
//! restart resumes where it stopped and handles each event once.
//!
//! `embed --config config/payhost.toml --listen 127.0.0.1:3000 [--orders <file>]` (the orders
//! file defaults to `orders.json` beside the config)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use payhost::engine::NewCollection;
use payhost::events::{Cursor, EventType};
use payhost::{Config, Host, Loader};
use serde::{Deserialize, Serialize};

/// The storefront's own books: its orders and how far it has read payhost's events, saved
/// together (one file, replaced atomically) so that no event is handled twice or skipped.
#[derive(Default, Serialize, Deserialize)]
struct Books {
    cursor: Option<Cursor>,
    orders: BTreeMap<String, Order>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Order {
    /// The payment collection that pays for it.
    id: String,
    amount: i64,
    status: String,
    /// The payhost event that marked it paid.
    paid_by_event: Option<String>,
}

#[derive(Clone)]
struct Store {
    host: Arc<Host>,
    books: Arc<Mutex<Books>>,
    file: PathBuf,
}

impl Store {
    fn save(&self, books: &Books) {
        let tmp = self.file.with_extension("tmp");
        let text = serde_json::to_vec_pretty(books).expect("books serialize");
        std::fs::write(&tmp, text).expect("write the books");
        std::fs::rename(&tmp, &self.file).expect("replace the books");
    }
}

/// Follows payhost's events from the saved cursor: an authorized session marks its order paid.
async fn follow_payments(store: Store) {
    let after = store.books.lock().unwrap().cursor;
    let mut events = Box::pin(store.host.events(after));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                eprintln!("payhost events: {e}");
                continue;
            }
        };
        let mut books = store.books.lock().unwrap();
        if event.kind == EventType::SessionAuthorized
            && let Some(order) = event
                .payment_collection_id
                .as_ref()
                .and_then(|id| books.orders.get_mut(id))
        {
            order.status = "paid".into();
            order.paid_by_event = Some(event.id.clone());
        }
        books.cursor = Some(event.cursor());
        store.save(&books);
    }
}

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

    // The storefront's books live beside the config unless told otherwise.
    let file = arg("--orders")
        .map(PathBuf::from)
        .unwrap_or_else(|| config.dir.join("orders.json"));
    let books = std::fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let store = Store {
        host: host.clone(),
        books: Arc::new(Mutex::new(books)),
        file,
    };
    tokio::spawn(follow_payments(store.clone()));

    // With `[[api_keys]]` in the config, payhost's routes need them, under any prefix.
    let mut state = payhost::http::AppState::new(host, Vec::new());
    if !config.api_keys.is_empty() {
        state = state.with_keys(payhost::auth::Keys::new(config.api_keys.clone()));
    }
    let payments = payhost::http::router(state);
    let app = Router::new()
        .route(
            "/store/hello",
            get(|| async { "hello from the storefront" }),
        )
        .route("/store/checkout", get(checkout))
        .route("/store/orders/{id}", get(order))
        .with_state(store)
        .nest("/payments", payments);

    let listen = arg("--listen").unwrap_or("127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    println!(
        "listening on http://{}",
        listener.local_addr().expect("address")
    );
    // The client's address reaches payhost's audit log and per-client limits.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .await
    .expect("serve");
}

/// A storefront handler using the same Host directly: a new order and the collection paying it.
async fn checkout(State(store): State<Store>) -> Json<payhost::domain::PaymentCollection> {
    let collection = store
        .host
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
    let mut books = store.books.lock().unwrap();
    books.orders.insert(
        collection.id.0.clone(),
        Order {
            id: collection.id.0.clone(),
            amount: collection.amount,
            status: "awaiting_payment".into(),
            paid_by_event: None,
        },
    );
    store.save(&books);
    Json(collection)
}

/// An order, as the storefront knows it.
async fn order(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Order>, StatusCode> {
    let books = store.books.lock().unwrap();
    books
        .orders
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}
