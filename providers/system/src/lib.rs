//! The system provider: payhost's counterpart of Medusa's `pp_system_default`. For payments
//! settled outside any processor (cash on delivery, invoices, manual bank transfers): it
//! authorizes at once, and capture, refund and cancel are bookkeeping. It makes no external calls,
//! so a retry is always safe. It remembers the keys it answered in this process (the most recent
//! [`REMEMBERED`]), so `retrieve` reports a call it made as processed; a key it does not hold
//! never moved anything anywhere, so it is "not attempted".

#![forbid(unsafe_code)]

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use payhost_provider_api::*;
use serde::Deserialize;

/// How many idempotency keys the system provider remembers.
pub const REMEMBERED: usize = 65_536;

/// The system provider takes no options; any key is refused so a typo is caught at load.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemOptions {}

/// The system provider.
#[derive(Debug, Default)]
pub struct SystemProvider {
    seen: Mutex<Seen>,
}

/// The keys answered, oldest first, bounded.
#[derive(Debug, Default)]
struct Seen {
    keys: HashSet<String>,
    order: VecDeque<String>,
}

impl SystemProvider {
    fn processed(&self, key: &str) -> Result<ProviderResponse, ProviderError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.keys.insert(key.to_owned()) {
            seen.order.push_back(key.to_owned());
            if seen.order.len() > REMEMBERED
                && let Some(old) = seen.order.pop_front()
            {
                seen.keys.remove(&old);
            }
        }
        Ok(ProviderResponse::processed())
    }
}

fn amount_ok(amount: i64) -> Result<(), ProviderError> {
    if amount <= 0 {
        return Err(ProviderError::invalid_request(format!(
            "amount must be positive, got {amount}"
        ))
        .param("amount"));
    }
    Ok(())
}

impl PaymentProvider for SystemProvider {
    type Options = SystemOptions;

    fn manifest() -> Manifest {
        Manifest::new("system", "System", env!("CARGO_PKG_VERSION"))
            .description("Manual payments: authorizes at once, no external calls")
            .capabilities(Capabilities {
                partial_capture: true,
                multiple_captures: true,
                partial_refund: true,
                update_amount: true,
                async_authorization: false,
                webhooks: false,
            })
    }

    fn new(_options: SystemOptions, _ctx: ProviderContext) -> Result<Self, ProviderError> {
        Ok(SystemProvider::default())
    }

    fn initiate(&self, r: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        self.processed(&r.idempotency_key)
    }

    fn update(&self, r: UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        self.processed(&r.idempotency_key)
    }

    fn authorize(&self, r: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        self.processed(&r.idempotency_key)
    }

    fn capture(&self, r: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        self.processed(&r.idempotency_key)
    }

    fn refund(&self, r: RefundRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        self.processed(&r.idempotency_key)
    }

    fn cancel(&self, r: CancelRequest) -> Result<ProviderResponse, ProviderError> {
        self.processed(&r.idempotency_key)
    }

    fn retrieve(&self, r: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        // Nothing happens outside payhost: a call it answered is processed, and one it holds no
        // record of (never made, made before a restart, or long forgotten) moved nothing.
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        Ok(RetrieveResponse::attempt(r.attempt.map(|a| {
            if seen.keys.contains(&a.idempotency_key) {
                Outcome::Processed
            } else {
                Outcome::NotAttempted {
                    reason: "the system provider makes no external calls".into(),
                }
            }
        })))
    }
}

export_provider!(SystemProvider);

#[cfg(test)]
mod tests {
    use super::SystemProvider;
    use payhost_provider_api::testkit::{TestHost, check_conformance};
    use payhost_provider_api::*;
    use serde_json::json;

    #[test]
    fn it_conforms() {
        check_conformance::<SystemProvider>(&TestHost::new(), json!({})).unwrap();
    }

    #[test]
    fn a_whole_flow_is_processed() {
        let host = TestHost::new();
        let p = host.instantiate::<SystemProvider>(json!({})).unwrap();
        let ok = |r: Result<ProviderResponse, ProviderError>| {
            assert_eq!(r.unwrap().outcome, Outcome::Processed)
        };
        ok(p.initiate(&TestHost::initiate_request("ps_1", 1500, "eur")));
        ok(p.authorize(&TestHost::authorize_request("ps_1", 1500, "eur")));
        ok(p.capture(&TestHost::capture_request("ps_1", 1000, "eur")));
        ok(p.capture(&TestHost::capture_request("ps_1", 500, "eur")));
        ok(p.refund(&TestHost::refund_request("ps_1", 200, "eur")));
        ok(p.cancel(&TestHost::cancel_request("ps_1", 1500, "eur")));
    }

    #[test]
    fn unknown_options_are_refused_naming_the_key() {
        let err = TestHost::new()
            .instantiate::<SystemProvider>(json!({"api_key": "x"}))
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::InvalidOptions);
        assert!(err.message.contains("api_key"), "{}", err.message);
    }

    #[test]
    fn a_call_it_answered_is_reported_as_processed() {
        let p = TestHost::new()
            .instantiate::<SystemProvider>(json!({}))
            .unwrap();
        let capture = TestHost::capture_request("ps_1", 100, "eur");
        p.capture(&capture).unwrap();
        let attempt = AttemptRef {
            operation: Operation::Capture,
            idempotency_key: capture.idempotency_key.clone(),
            amount: 100,
        };
        let answer = p
            .retrieve(&TestHost::retrieve_request(
                "ps_1",
                100,
                "eur",
                Some(attempt),
            ))
            .unwrap();
        assert_eq!(answer.attempt, Some(Outcome::Processed));
    }

    #[test]
    fn a_lost_attempt_is_reported_as_never_made() {
        let p = TestHost::new()
            .instantiate::<SystemProvider>(json!({}))
            .unwrap();
        let attempt = AttemptRef {
            operation: Operation::Capture,
            idempotency_key: "k".into(),
            amount: 100,
        };
        let answer = p
            .retrieve(&TestHost::retrieve_request(
                "ps_1",
                100,
                "eur",
                Some(attempt),
            ))
            .unwrap();
        assert!(matches!(answer.attempt, Some(Outcome::NotAttempted { .. })));
    }
}
