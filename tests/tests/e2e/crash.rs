//! A process running payment flows is SIGKILLed at random points, many times, and restarted
//! each time (start-up recovery reconciles what the dead one left in flight). At the end every
//! operation that returned success is there, no attempt is left open, the invariants hold, and
//! the sandbox's ledger agrees with payhost on every authorization, capture and refund.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use payhost::domain::{AttemptState, SessionStatus};
use payhost_e2e::{Backend, HOST, Scratch, artifacts, ensure_built};
use serde_json::json;

const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_survive_sigkill_at_random_points_on_sqlite() {
    flows_survive_sigkill(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_survive_sigkill_at_random_points_on_postgres() {
    flows_survive_sigkill(Backend::Postgres).await;
}

async fn flows_survive_sigkill(backend: Backend) {
    ensure_built();
    let scratch = Scratch::new();
    let Some(url) = scratch.storage_url(backend).await else {
        return;
    };
    let with_store = HOST.replace(
        "url = \"sqlite://{dir}/payhost.db\"",
        &format!("url = \"{url}\""),
    );
    // The sandbox acts inside its call, so nothing of a killed process can land after it.
    let config = format!("{with_store}\n[reconcile]\nlanding_margin_ms = 0\n")
        .replace("{dir}", &scratch.dir.path().display().to_string());
    let path = scratch.config(&config);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = seed;
    let mut confirmed: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(artifacts().join("crashloop"))
            .arg(&path)
            .arg((seed + round as u64).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn crashloop");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line == "READY" => break,
                Ok(_) => {}
                Err(e) => panic!("round {round}: crashloop did not start ({e}); seed {seed}"),
            }
        }
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let run_for = Duration::from_millis(20 + (rng >> 33) % 400);
        std::thread::sleep(run_for);
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        reader.join().unwrap();
        let lines: Vec<String> = rx.try_iter().collect();
        assert!(started.elapsed() < Duration::from_secs(60));
        confirmed.extend(lines.into_iter().filter(|l| l.starts_with("OK ")));
    }
    assert!(
        confirmed.iter().any(|l| l.starts_with("OK captured")),
        "the runs were too short to capture anything; seed {seed}"
    );

    // Restart once more, in-process, and let recovery and the reconciler finish. Every earlier
    // process is dead, so every in-flight attempt is abandoned (on a shared store recovery would
    // otherwise wait for them to go stale).
    let host = scratch.host_on(backend, HOST).await.expect("store");
    let host = std::sync::Arc::new(
        std::sync::Arc::try_unwrap(host)
            .unwrap_or_else(|_| panic!("the test holds the only reference"))
            .with_reconcile(payhost::engine::ReconcileSettings {
                first_check_ms: 0,
                base_backoff_ms: 0,
                stale_after_ms: 0,
                // The sandbox acted inside the killed processes: nothing of theirs can land.
                landing_margin_ms: 0,
                ..Default::default()
            }),
    );
    host.recover().await.unwrap();
    // The last killed process's calls could land until their deadlines (400 ms) have passed.
    payhost_e2e::reconcile_until_settled(&host, Duration::from_secs(5)).await;
    let open = host.open_attempts().await.unwrap();
    assert!(open.is_empty(), "left open: {open:?}; seed {seed}");

    let sandbox = host.providers().get("sandbox").unwrap().clone();
    let mut sessions = 0;
    for line in &confirmed {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[1] {
            "collection" => {
                host.collection(words[2]).await.unwrap();
            }
            "session" => {
                sessions += 1;
                let session = host.session(words[2]).await.unwrap();
                let view = host.collection(words[3]).await.unwrap();
                let payment = view
                    .payments
                    .iter()
                    .find(|p| p.payment_session_id == session.id);
                for p in &view.payments {
                    assert!(
                        p.captured_amount() <= p.amount
                            && p.refunded_amount() <= p.captured_amount()
                    );
                }
                assert_eq!(
                    payment.is_some(),
                    session.status == SessionStatus::Authorized
                );
                let ledger = sandbox
                    .call_custom("ledger", json!({"session_id": session.id.0}))
                    .await
                    .unwrap();
                let sum = |op: &str| -> i64 {
                    ledger
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|e| {
                            e["op"] == op && e["response"]["outcome"]["status"] == "processed"
                        })
                        .map(|e| e["amount"].as_i64().unwrap())
                        .sum()
                };
                assert_eq!(
                    sum("authorize") > 0,
                    session.status == SessionStatus::Authorized,
                    "{line}; seed {seed}"
                );
                assert_eq!(
                    sum("capture"),
                    payment.map_or(0, |p| p.captured_amount()),
                    "{line}; seed {seed}"
                );
                assert_eq!(
                    sum("refund"),
                    payment.map_or(0, |p| p.refunded_amount()),
                    "{line}; seed {seed}"
                );
                for a in host.attempts_of(&session.id.0).await.unwrap() {
                    assert!(matches!(
                        a.state,
                        AttemptState::Succeeded | AttemptState::Failed
                    ));
                }
            }
            "authorized" => {
                let session = host.session(words[2]).await.unwrap();
                assert_eq!(session.status, SessionStatus::Authorized, "{line}");
                host.payment(words[3]).await.unwrap();
            }
            "captured" => {
                let p = host.payment(words[2]).await.unwrap();
                assert!(
                    p.captured_amount() >= words[3].parse::<i64>().unwrap(),
                    "{line}"
                );
            }
            "refunded" => {
                let p = host.payment(words[2]).await.unwrap();
                assert!(
                    p.refunded_amount() >= words[3].parse::<i64>().unwrap(),
                    "{line}"
                );
            }
            other => panic!("unexpected line kind {other}"),
        }
    }
    assert!(
        sessions > ROUNDS,
        "too few flows ran ({sessions}); seed {seed}"
    );
}
