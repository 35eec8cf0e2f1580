//! The system provider: payhost's counterpart of Medusa's `pp_system_default`. For payments
//! settled outside any processor (cash on delivery, invoices, manual bank transfers): it
//! authorizes at once, and capture, refund and cancel are bookkeeping. It makes no external calls
//! and keeps no state, so a retry is always safe and an unknown outcome is always "not attempted".

#![forbid(unsafe_code)]

use payhost_provider_api::*;
use serde::Deserialize;

/// The system provider takes no options; any key is refused so a typo is caught at load.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemOptions {}

/// The system provider.
#[derive(Debug)]
pub struct SystemProvider;

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
        Ok(SystemProvider)
    }

    fn initiate(&self, r: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        Ok(ProviderResponse::processed())
    }

    fn update(&self, r: UpdateRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        Ok(ProviderResponse::processed())
    }

    fn authorize(&self, r: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        Ok(ProviderResponse::processed())
    }

    fn capture(&self, r: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        Ok(ProviderResponse::processed())
    }

    fn refund(&self, r: RefundRequest) -> Result<ProviderResponse, ProviderError> {
        amount_ok(r.amount)?;
        Ok(ProviderResponse::processed())
    }

    fn cancel(&self, _r: CancelRequest) -> Result<ProviderResponse, ProviderError> {
        Ok(ProviderResponse::processed())
    }

    fn retrieve(&self, r: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        // Nothing happens outside payhost, so there is nothing to learn: the host's own records
        // are the truth, and an attempt whose outcome it lost never reached anyone.
        Ok(RetrieveResponse {
            status: RemoteStatus::NotFound,
            amount_authorized: None,
            amount_captured: None,
            amount_refunded: None,
            attempt: r.attempt.map(|_| Outcome::NotAttempted {
                reason: "the system provider makes no external calls".into(),
            }),
            data: None,
        })
    }
}

export_provider!(SystemProvider);

#[cfg(test)]
mod tests {
    use super::*;
    use payhost_provider_api::testkit::{TestHost, check_conformance};
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
