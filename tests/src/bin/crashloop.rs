//! Runs payment flows against a config until it is killed, printing one `OK …` line after every
//! operation that returned success. The crash test SIGKILLs it at random points and checks that
//! everything it printed survived.
//!
//! `crashloop <config> <seed>`

use payhost::engine::*;
use payhost::{Config, Host, Loader};
use serde_json::{Value, json};

/// A small deterministic generator (no dependency needed for test randomness).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let config = args.next().expect("config path");
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let config = Config::from_file(&config).expect("config");
    let report = Loader::new(&config).load_all(&config);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let host = Host::open(&config, report.providers).await.expect("host");
    println!("READY");
    let mut rng = Lcg(seed);
    loop {
        let amount = 1000 + (rng.next() % 4000) as i64;
        let Ok(col) = host
            .create_collection(
                NewCollection {
                    amount,
                    currency_code: "eur".into(),
                    metadata: Value::Null,
                },
                None,
            )
            .await
        else {
            continue;
        };
        println!("OK collection {}", col.id);
        let behaviour = json!({"sandbox": {
            "authorize": rng.pick(&["processed", "processed", "processed", "unknown", "declined", "panic"]),
            "capture": rng.pick(&["processed", "processed", "unknown", "error"]),
            "refund": rng.pick(&["processed", "processed", "unknown", "panic"]),
        }});
        let session = match host
            .create_session(
                NewSession {
                    payment_collection_id: Some(col.id.0.clone()),
                    provider_id: "sandbox".into(),
                    cart_id: None,
                    cart: Value::Null,
                    context: Value::Null,
                    data: behaviour,
                    amount: None,
                    currency_code: None,
                    metadata: Value::Null,
                    reference: None,
                    account_holder_id: None,
                    initiate: true,
                },
                None,
            )
            .await
        {
            Ok(s) => s,
            Err(_) => continue,
        };
        println!("OK session {} {}", session.id, col.id);
        let Ok(result) = host
            .authorize_session(&session.id.0, AuthorizeInput::default(), None)
            .await
        else {
            continue;
        };
        let Some(payment) = result.payment else {
            continue;
        };
        println!("OK authorized {} {}", session.id, payment.id);
        let half = payment.amount / 2;
        if let Ok(p) = host
            .capture_payment(&payment.id.0, CaptureInput { amount: Some(half) }, None)
            .await
        {
            println!("OK captured {} {}", p.id, p.captured_amount());
        }
        if let Ok(p) = host
            .capture_payment(&payment.id.0, CaptureInput::default(), None)
            .await
        {
            println!("OK captured {} {}", p.id, p.captured_amount());
        }
        if let Ok(p) = host
            .refund_payment(
                &payment.id.0,
                RefundInput {
                    amount: Some(payment.amount / 3),
                    reason: None,
                },
                None,
            )
            .await
        {
            println!("OK refunded {} {}", p.id, p.refunded_amount());
        }
    }
}
