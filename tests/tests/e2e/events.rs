//! Events out: every committed change reaches the embedder's stream and the merchant's endpoint,
//! signed, at least once, in order per session — through webhooks, a SIGKILL during
//! deliveries, an endpoint that fails, and two hosts sharing a database.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use payhost::Host;
use payhost::domain::SessionStatus;
use payhost::engine::*;
use payhost::events::{Cursor, Event};
use payhost_e2e::receiver::{Answer, Receiver};
use payhost_e2e::{Backend, HOST, Scratch, Server, payhost, text};
use serde_json::{Value, json};

const SECRET: &str = "whsec_events_test_secret";

/// `config` with an `[events]` table (extra settings in `events`) and one endpoint at `url`
/// (extra settings in `endpoint`).
fn with_endpoint(config: &str, url: &str, events: &str, endpoint: &str) -> String {
    format!(
        "{config}\n[events]\n{events}\n[[events.endpoints]]\nid = \"shop\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n{endpoint}\n"
    )
}

/// Aborts a background task when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn collection(host: &Host, amount: i64) -> String {
    host.create_collection(
        NewCollection {
            amount,
            currency_code: "eur".into(),
            metadata: Value::Null,
        },
        None,
    )
    .await
    .unwrap()
    .id
    .0
}

fn sandbox_session(collection: &str, data: Value) -> NewSession {
    NewSession {
        payment_collection_id: Some(collection.into()),
        provider_id: "sandbox".into(),
        cart_id: Some("cart_events".into()),
        cart: Value::Null,
        context: Value::Null,
        data,
        amount: None,
        currency_code: None,
        metadata: Value::Null,
        reference: None,
        account_holder_id: None,
        initiate: true,
    }
}

/// Posts a sandbox webhook (`hook`: `{"body", "headers"}`) to the host's intake.
async fn deliver_hook(host: &Host, hook: Value) {
    let headers: Vec<(String, String)> = serde_json::from_value(hook["headers"].clone()).unwrap();
    host.receive_webhook(
        "sandbox",
        hook["body"].as_str().unwrap().to_owned(),
        headers,
    )
    .await
    .unwrap();
}

/// The types of the events of `session`, in order.
fn types_of<'a>(events: impl IntoIterator<Item = &'a Event>, session: &str) -> Vec<String> {
    events
        .into_iter()
        .filter(|e| e.payment_session_id.as_deref() == Some(session))
        .map(|e| e.kind.as_str().to_owned())
        .collect()
}

async fn webhook_completions_reach_the_stream_and_the_endpoint_once_committed(backend: Backend) {
    let s = Scratch::new();
    let receiver = Receiver::start(SECRET).await;
    let config = with_endpoint(HOST, &receiver.url, "poll_ms = 50", "");
    let Some(host) = s.host_on(backend, &config).await else {
        return;
    };
    let _deliverer = Task(host.spawn_deliverer());

    // The embedder: on `payment_session.authorized`, the change must already be readable.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let consumer = {
        let host = host.clone();
        Task(tokio::spawn(async move {
            let mut stream = Box::pin(host.events(None));
            while let Some(event) = stream.next().await {
                let event = event.unwrap();
                if event.kind.as_str() == "payment_session.authorized" {
                    let id = event.payment_session_id.clone().unwrap();
                    let session = host.session(&id).await.unwrap();
                    assert_eq!(session.status, SessionStatus::Authorized, "committed first");
                    let payment = host
                        .store()
                        .payment_of_session(&session.id)
                        .await
                        .unwrap()
                        .expect("its payment is committed with it");
                    assert_eq!(event.payment_id.as_deref(), Some(payment.id.0.as_str()));
                }
                if seen_tx.send(event).is_err() {
                    return;
                }
            }
        }))
    };

    let col = collection(&host, 2500).await;
    let sandbox = host.providers().get("sandbox").unwrap().clone();

    // 3-D Secure: the customer is sent away, the processor confirms by webhook.
    let three_ds = host
        .create_session(
            sandbox_session(&col, json!({"card_number": "4000002500003155"})),
            None,
        )
        .await
        .unwrap();
    let r = host
        .authorize_session(&three_ds.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::RequiresMore);
    let hook = sandbox
        .call_custom(
            "webhook",
            json!({"session_id": three_ds.id.0, "type": "payment.authorized"}),
        )
        .await
        .unwrap();
    deliver_hook(&host, hook).await;

    // A pending card: the processor settles it later and says so by webhook.
    let pending = host
        .create_session(
            sandbox_session(&col, json!({"card_number": "4000000000000051"})),
            None,
        )
        .await
        .unwrap();
    let r = host
        .authorize_session(&pending.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap();
    assert_eq!(r.payment_session.status, SessionStatus::Pending);
    let hook = sandbox
        .call_custom(
            "settle",
            json!({"session_id": pending.id.0, "outcome": "authorized"}),
        )
        .await
        .unwrap();
    deliver_hook(&host, hook).await;

    // The stream sees both authorizations, each once, after the rest of its session's story.
    let mut streamed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while streamed
        .iter()
        .filter(|e: &&Event| e.kind.as_str() == "webhook.applied")
        .count()
        < 2
    {
        let event = tokio::time::timeout_at(deadline, seen_rx.recv())
            .await
            .expect("the stream delivers within 15 s")
            .unwrap();
        streamed.push(event);
    }
    drop(consumer);
    assert_eq!(
        streamed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=streamed.len() as i64).collect::<Vec<_>>(),
        "gap-free, in order"
    );
    assert_eq!(streamed[0].kind.as_str(), "payment_collection.created");
    assert_eq!(
        types_of(&streamed, &three_ds.id.0),
        [
            "payment_session.created",
            "payment_session.requires_more",
            "payment_session.authorized",
            "webhook.applied"
        ]
    );
    assert_eq!(
        types_of(&streamed, &pending.id.0),
        [
            "payment_session.created",
            "payment_session.authorized",
            "webhook.applied"
        ],
        "created pending, so authorize's pending is no change"
    );
    let authorized = streamed
        .iter()
        .find(|e| {
            e.kind.as_str() == "payment_session.authorized"
                && e.payment_session_id.as_deref() == Some(&pending.id.0)
        })
        .unwrap();
    assert_eq!(authorized.data["status"], "authorized", "the session after");
    assert_eq!(authorized.data["id"], pending.id.0);
    assert_eq!(authorized.amount, Some(2500));
    assert_eq!(authorized.currency_code.as_deref(), Some("eur"));

    // The endpoint receives the same events, signed, in order per session.
    let all: HashSet<String> = streamed.iter().map(|e| e.id.clone()).collect();
    let received = receiver
        .wait_until(Duration::from_secs(15), |r| {
            r.iter().map(|r| &r.id).collect::<HashSet<_>>().len() >= all.len()
        })
        .await;
    assert!(received.iter().all(|r| r.verified), "every POST is signed");
    let accepted = receiver.accepted();
    assert_eq!(
        accepted
            .iter()
            .map(|r| r.id.clone())
            .collect::<HashSet<_>>(),
        all
    );
    for session in [&three_ds.id.0, &pending.id.0] {
        let at_endpoint: Vec<String> = accepted
            .iter()
            .filter(|r| r.session.as_deref() == Some(session.as_str()))
            .map(|r| r.kind.clone())
            .collect();
        assert_eq!(
            at_endpoint,
            types_of(&streamed, session),
            "order of {session}"
        );
    }
    for r in &accepted {
        let e = streamed.iter().find(|e| e.id == r.id).unwrap();
        assert_eq!(r.body, serde_json::to_value(e).unwrap(), "the same event");
    }
}

async fn a_consumer_behind_the_pruned_prefix_is_told_and_a_new_one_starts_at_the_oldest_kept(
    backend: Backend,
) {
    let s = Scratch::new();
    let config = format!("{HOST}\n[events]\nretention_ms = 1\n");
    let Some(host) = s.host_on(backend, &config).await else {
        return;
    };
    for _ in 0..3 {
        collection(&host, 100).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    host.prune_events().await.unwrap();
    let kept_from = host.oldest_cursor().await.unwrap();
    assert_eq!(
        kept_from,
        Cursor(3),
        "every delivered event past the retention"
    );
    match host.events_page(1, None, 10).await {
        Err(EngineError::EventsPruned {
            after: 1,
            pruned_through: 3,
        }) => {}
        other => panic!("a cursor inside the pruned prefix is refused: {other:?}"),
    }
    let mut from_cursor = Box::pin(host.events(Some(Cursor(2))));
    let err = tokio::time::timeout(Duration::from_secs(5), from_cursor.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "events_pruned");
    assert!(from_cursor.next().await.is_none(), "and the stream ends");

    let fresh = collection(&host, 200).await;
    let mut from_oldest = Box::pin(host.events(None));
    let first = tokio::time::timeout(Duration::from_secs(5), from_oldest.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 4);
    assert_eq!(first.payment_collection_id.as_deref(), Some(fresh.as_str()));
}

async fn a_session_held_back_by_a_failed_delivery_resumes_in_order(backend: Backend) {
    let s = Scratch::new();
    let receiver = Receiver::start(SECRET).await;
    receiver.answer(Answer::Fail);
    let config = with_endpoint(
        HOST,
        &receiver.url,
        "poll_ms = 20\nclaim_ms = 2000",
        "timeout_ms = 500\nretry_base_ms = 50\nretry_max_ms = 100",
    );
    let Some(host) = s.host_on(backend, &config).await else {
        return;
    };
    let _deliverer = Task(host.spawn_deliverer());
    let col = collection(&host, 900).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let session = host
            .create_session(sandbox_session(&col, Value::Null), None)
            .await
            .unwrap();
        let r = host
            .authorize_session(&session.id.0, AuthorizeInput::default(), None)
            .await
            .unwrap();
        let payment = r.payment.unwrap();
        host.capture_payment(&payment.id.0, CaptureInput { amount: Some(300) }, None)
            .await
            .unwrap();
        sessions.push(session.id.0);
    }
    // Each session's first event fails again and again; nothing after it goes.
    receiver
        .wait_until(Duration::from_secs(10), |r| r.len() >= 12)
        .await;
    let tried: Vec<String> = receiver.received().iter().map(|r| r.kind.clone()).collect();
    assert!(
        tried
            .iter()
            .all(|k| k == "payment_session.created" || k == "payment_collection.created"),
        "only the first of each session was tried: {tried:?}"
    );
    receiver.answer(Answer::Ok);
    let events = host.events_page(0, None, 1000).await.unwrap();
    assert_eq!(events.len(), 1 + 3 * 3);
    receiver
        .wait_until(Duration::from_secs(10), |_| {
            receiver.accepted().len() >= events.len()
        })
        .await;
    let accepted = receiver.accepted();
    for session in &sessions {
        let got: Vec<String> = accepted
            .iter()
            .filter(|r| r.session.as_deref() == Some(session))
            .map(|r| r.kind.clone())
            .collect();
        assert_eq!(got, types_of(&events, session), "order of {session}");
    }
    assert_eq!(accepted.len(), events.len());
}

/// Every scenario above, on SQLite and on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(payhost_e2e::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(payhost_e2e::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_stores!(
    webhook_completions_reach_the_stream_and_the_endpoint_once_committed,
    a_session_held_back_by_a_failed_delivery_resumes_in_order,
    a_consumer_behind_the_pruned_prefix_is_told_and_a_new_one_starts_at_the_oldest_kept,
);

// ------------------------------------------------------------------ `payhost serve`

/// A server config on `storage` with the system provider and one endpoint.
fn serve_config(storage: &str, url: &str, events: &str, endpoint: &str) -> String {
    with_endpoint(
        &format!(
            "[storage]\nurl = \"{storage}\"\n[plugins]\ndir = \"{{plugins}}\"\n[providers.system]\nlibrary = \"payhost_provider_system\"\n"
        ),
        url,
        events,
        endpoint,
    )
}

/// One whole flow over HTTP (collection → session → authorize → capture): four events.
async fn http_flow(client: &reqwest::Client, base: &str) {
    let post = |path: String, body: Value| {
        let client = client.clone();
        async move {
            let r = client
                .post(path)
                .json(&body)
                .send()
                .await
                .expect("the server answers");
            assert!(r.status().is_success(), "{}", r.status());
            r.json::<Value>().await.unwrap()
        }
    };
    let col = post(
        format!("{base}/v1/payment-collections"),
        json!({"amount": 1200, "currency_code": "eur"}),
    )
    .await;
    let session = post(
        format!("{base}/v1/payment-sessions"),
        json!({"payment_collection_id": col["id"], "provider_id": "system"}),
    )
    .await;
    let authorized = post(
        format!(
            "{base}/v1/payment-sessions/{}/authorize",
            session["id"].as_str().unwrap()
        ),
        json!({}),
    )
    .await;
    let payment = authorized["payment"]["id"].as_str().unwrap().to_owned();
    post(format!("{base}/v1/payments/{payment}/capture"), json!({})).await;
}

/// Every committed event, read from a server's `GET /v1/events`.
async fn committed(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = client
            .get(format!("{base}/v1/events?after={after}&limit=1000"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = page["data"].as_array().unwrap().clone();
        after = page["next_after"].as_i64().unwrap();
        let more = page["has_more"].as_bool().unwrap();
        all.extend(data);
        if !more {
            return all;
        }
    }
}

/// What the receiver accepted equals `events` exactly (deduplicated by id), each session's
/// events arrived in their order, and every POST was signed.
fn assert_received_exactly(receiver: &Receiver, events: &[Value]) {
    assert!(receiver.received().iter().all(|r| r.verified), "signed");
    let accepted = receiver.accepted();
    let got: HashSet<&str> = accepted.iter().map(|r| r.id.as_str()).collect();
    let want: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got.len(), accepted.len());
    assert_eq!(
        got,
        want,
        "missing {:?}, extra {:?}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>()
    );
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &accepted {
        let key = r
            .session
            .clone()
            .or_else(|| r.body["payment_collection_id"].as_str().map(str::to_owned))
            .unwrap();
        by_key.entry(key).or_default().push(r.seq);
    }
    for (key, seqs) in by_key {
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "the events of {key} arrived in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_during_deliveries_delivers_every_event_at_least_once_in_order_per_session() {
    let s = Scratch::new();
    let receiver = Receiver::start(SECRET).await;
    // Slow enough that the kill finds deliveries in flight.
    receiver.delay(Duration::from_millis(40));
    let db = s.dir.path().join("payhost.db");
    let config = s.config(&serve_config(
        &format!("sqlite://{}", db.display()),
        &receiver.url,
        "poll_ms = 50",
        "timeout_ms = 2000",
    ));
    let client = reqwest::Client::new();
    let mut server = Server::start(&config);
    for _ in 0..12 {
        http_flow(&client, &server.base).await;
    }
    receiver
        .wait_until(Duration::from_secs(10), |r| r.len() >= 6)
        .await;
    server.kill();
    let at_kill = receiver.received().len();
    assert!(
        (6..48).contains(&at_kill),
        "the kill came during deliveries ({at_kill} of 48 received)"
    );

    let server = Server::start(&config);
    let events = committed(&client, &server.base).await;
    assert_eq!(events.len(), 48, "four events per flow");
    receiver
        .wait_until(Duration::from_secs(30), |_| {
            receiver.accepted().len() >= events.len()
        })
        .await;
    assert_received_exactly(&receiver, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_with_backoff_then_parked_then_redelivered_by_the_cli() {
    let s = Scratch::new();
    let receiver = Receiver::start(SECRET).await;
    // 500, no answer, a cut connection, in turn.
    receiver.answer(Answer::Cycle);
    let db = s.dir.path().join("payhost.db");
    let config = s.config(&serve_config(
        &format!("sqlite://{}", db.display()),
        &receiver.url,
        "poll_ms = 20\nclaim_ms = 1500",
        "timeout_ms = 200\nretry_base_ms = 100\nretry_max_ms = 400\nretry_for_ms = 1500\ntypes = [\"payment_collection.*\"]",
    ));
    let client = reqwest::Client::new();
    let server = Server::start(&config);
    http_flow(&client, &server.base).await;
    let events = committed(&client, &server.base).await;
    let wanted: Vec<Value> = events
        .into_iter()
        .filter(|e| e["type"] == "payment_collection.created")
        .collect();
    assert_eq!(wanted.len(), 1, "the endpoint takes collection events only");
    let id = wanted[0]["id"].as_str().unwrap().to_owned();

    // Retried, further and further apart, until the retry period is over.
    let config_arg = config.to_str().unwrap();
    let started = std::time::Instant::now();
    let parked = loop {
        let out = payhost(&["events", "failed", "--config", config_arg, "--json"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if !list.is_empty() || started.elapsed() > Duration::from_secs(15) {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(parked.len(), 1, "parked after its retry period: {parked:?}");
    assert_eq!(parked[0]["id"], format!("{id}:shop"));
    let tries = receiver.received();
    assert!(tries.iter().all(|t| t.id == id));
    assert_eq!(parked[0]["attempts"], tries.len());
    assert!(tries.len() >= 4, "retried: {} tries", tries.len());
    let kinds: HashSet<Answer> = tries.iter().map(|t| t.answered).collect();
    assert_eq!(
        kinds,
        HashSet::from([Answer::Fail, Answer::Hang, Answer::Close])
    );
    // Backoff: the gaps grow (base 100 ms doubling, each drawn in [½, 1] of its step).
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps.last().unwrap() > &(gaps[0] + Duration::from_millis(40)),
        "backoff grows: {gaps:?}"
    );
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_event_deliveries_parked 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "payhost_event_deliveries_seconds_count{endpoint=\"shop\",outcome=\"parked\"} 1"
    ));
    let human = payhost(&["events", "failed", "--config", config_arg], &[]);
    let human = text(&human.stdout);
    assert!(human.contains(&format!("{id}:shop")), "{human}");
    assert!(human.contains("1 parked"), "{human}");

    // The endpoint is fixed; the operator sends it again beside the running host.
    receiver.answer(Answer::Ok);
    let out = payhost(
        &["events", "redeliver", "--all", "--config", config_arg],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 delivery is pending again"));
    receiver
        .wait_until(Duration::from_secs(10), |_| !receiver.accepted().is_empty())
        .await;
    assert_received_exactly(&receiver, &wanted);
    let out = payhost(&["events", "failed", "--config", config_arg], &[]);
    assert!(text(&out.stdout).contains("no parked deliveries"));

    // Nothing else can be written beside the running host.
    let out = payhost(
        &[
            "events",
            "redeliver",
            "evt_nope:shop",
            "--config",
            config_arg,
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not_found"),
        "{}",
        text(&out.stderr)
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_deliver_each_event_once_and_a_survivor_finishes_a_dead_hosts_deliveries() {
    let s = Scratch::new();
    let Some(url) = s.storage_url(Backend::Postgres).await else {
        return;
    };
    let receiver = Receiver::start(SECRET).await;
    let config = s.config(&serve_config(
        &url,
        &receiver.url,
        "poll_ms = 50\nclaim_ms = 2000",
        "timeout_ms = 500",
    ));
    let client = reqwest::Client::new();
    let mut a = Server::start(&config);
    let b = Server::start(&config);

    // Steady state: both hosts write and deliver; each event reaches the endpoint once.
    let flows: Vec<_> = (0..16)
        .map(|i| {
            let (client, base) = (client.clone(), [&a.base, &b.base][i % 2].clone());
            tokio::spawn(async move { http_flow(&client, &base).await })
        })
        .collect();
    for f in flows {
        f.await.unwrap();
    }
    let events = committed(&client, &b.base).await;
    assert_eq!(events.len(), 64);
    receiver
        .wait_until(Duration::from_secs(20), |r| r.len() >= 64)
        .await;
    // Longer than a claim lasts: a second delivery from a lapsed claim would have come by now.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(receiver.received().len(), 64, "each event delivered once");
    assert_received_exactly(&receiver, &events);

    // Host a dies with deliveries in flight; b finishes them once a's claims lapse.
    receiver.delay(Duration::from_millis(100));
    for _ in 0..6 {
        http_flow(&client, &a.base).await;
    }
    receiver
        .wait_until(Duration::from_secs(10), |r| r.len() >= 66)
        .await;
    a.kill();
    let at_kill = receiver.received().len();
    assert!(
        at_kill < 88,
        "the kill came with deliveries left ({at_kill} of 88)"
    );
    let events = committed(&client, &b.base).await;
    assert_eq!(events.len(), 88);
    receiver
        .wait_until(Duration::from_secs(30), |_| {
            receiver.accepted().len() >= events.len()
        })
        .await;
    assert_received_exactly(&receiver, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_events_pages_long_polls_and_hides_attempts_from_keys_without_the_operator_scope() {
    let s = Scratch::new();
    let db = s.dir.path().join("payhost.db");
    let key = |scopes: &str, id: &str| {
        let out = payhost(&["keys", "new", "--scope", scopes, "--id", id], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let secret = stdout
            .lines()
            .find(|l| l.starts_with("phk_"))
            .unwrap()
            .to_owned();
        let table = stdout
            .lines()
            .skip_while(|l| !l.starts_with("[[api_keys]]"))
            .collect::<Vec<_>>()
            .join("\n");
        (secret, table)
    };
    let (reader, reader_table) = key("read", "reader");
    let (payer, payer_table) = key("payments,read", "payer");
    let (operator, operator_table) = key("operator,read", "ops");
    let config = s.config(&format!(
        "[storage]\nurl = \"sqlite://{}\"\n[plugins]\ndir = \"{{plugins}}\"\n[providers.sandbox]\nlibrary = \"payhost_provider_sandbox\"\ntimeout_ms = 300\n[providers.sandbox.options]\nstate_dir = \"{{state}}\"\nwebhook_secret = \"whsec_test_secret\"\n{reader_table}\n{payer_table}\n{operator_table}\n[events]\nmax_wait_ms = 30000\n",
        db.display()
    ));
    let server = Server::start(&config);
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let get = |key: &str, query: &str| {
        let (client, url, key) = (
            client.clone(),
            format!("{base}/v1/events{query}"),
            key.to_owned(),
        );
        async move { client.get(url).bearer_auth(key).send().await.unwrap() }
    };

    // A long poll returns as soon as an event commits (well before its 20 s wait ends).
    let waiting = tokio::spawn(get(&reader, "?after=0&wait_ms=20000"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let col: Value = client
        .post(format!("{base}/v1/payment-collections"))
        .bearer_auth(&payer)
        .json(&json!({"amount": 700, "currency_code": "eur"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let page: Value = waiting.await.unwrap().json().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woke by the commit: {:?}",
        started.elapsed()
    );
    assert_eq!(page["data"][0]["type"], "payment_collection.created");
    assert_eq!(page["data"][0]["payment_collection_id"], col["id"]);
    assert_eq!(page["next_after"], 1);

    // An authorize whose outcome is unknown: an attempt event, for the operator only.
    let session: Value = client
        .post(format!("{base}/v1/payment-sessions"))
        .bearer_auth(&payer)
        .json(&json!({"payment_collection_id": col["id"], "provider_id": "sandbox", "data": {"card_number": "4000000000000119"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = client
        .post(format!(
            "{base}/v1/payment-sessions/{}/authorize",
            session["id"].as_str().unwrap()
        ))
        .bearer_auth(&payer)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504, "{}", r.text().await.unwrap());
    let types = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    let as_reader: Value = get(&reader, "?after=0").await.json().await.unwrap();
    assert!(!types(&as_reader).iter().any(|t| t.starts_with("attempt.")));
    let as_operator: Value = get(&operator, "?after=0").await.json().await.unwrap();
    assert!(
        types(&as_operator).contains(&"attempt.unknown".to_owned()),
        "{:?}",
        types(&as_operator)
    );
    let filtered: Value = get(&operator, "?types=attempt.*,payment_collection.created")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        types(&filtered),
        ["payment_collection.created", "attempt.unknown"]
    );

    // Paging, and clear errors.
    let one: Value = get(&reader, "?after=0&limit=1").await.json().await.unwrap();
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    assert_eq!(one["has_more"], true);
    for (query, param) in [
        ("?limit=0", "limit"),
        ("?after=-1", "after"),
        ("?types=payment_sesion.*", "types"),
        ("?cursor=3", "query"),
    ] {
        let r = get(&reader, query).await;
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
    let r = client
        .get(format!("{base}/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a key is needed");
}

/// A delivery is done only when a 2xx arrived whole: a 200 cut off mid-body (a proxy dying, a
/// receiver crashing) or one too large to read is tried again, so no event is lost to an
/// answer nobody read. `check` warns about an endpoint in clear text on a network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_that_is_not_read_whole_is_not_a_delivery() {
    for answer in [Answer::CutOk, Answer::HugeOk] {
        let s = Scratch::new();
        let receiver = Receiver::start(SECRET).await;
        receiver.answer(answer);
        let config = s.config(&serve_config(
            &format!("sqlite://{}/payhost.db", s.dir.path().display()),
            &receiver.url,
            "poll_ms = 20\nclaim_ms = 2500",
            "timeout_ms = 1000\nretry_base_ms = 50\nretry_max_ms = 100\ntypes = [\"payment_collection.*\"]",
        ));
        let server = Server::start(&config);
        let client = reqwest::Client::new();
        http_flow(&client, &server.base).await;
        let tries = receiver
            .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
            .await;
        assert!(
            tries.len() >= 3,
            "{answer:?}: sent again, {} tries",
            tries.len()
        );
        assert!(tries.iter().all(|t| t.id == tries[0].id), "the same event");
        // Answered properly, it is delivered and no longer sent.
        receiver.answer(Answer::Ok);
        receiver
            .wait_until(Duration::from_secs(10), |r| {
                r.last().is_some_and(|t| t.answered == Answer::Ok)
            })
            .await;
        assert_eq!(receiver.accepted().len(), 1, "{answer:?}: delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let settled = receiver.received().len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            receiver.received().len(),
            settled,
            "{answer:?}: delivered at last"
        );
    }
    let s = Scratch::new();
    let config = s.config(&serve_config(
        "sqlite://payhost.db",
        "http://erp.example.com/hooks/payhost",
        "",
        "",
    ));
    let out = payhost(&["check", "--config", config.to_str().unwrap()], &[]);
    let report = text(&out.stdout);
    assert!(
        report.contains("WARN")
            && report.contains("http://erp.example.com")
            && report.contains("clear text"),
        "{report}"
    );
}
