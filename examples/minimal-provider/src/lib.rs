//! The smallest provider that passes `payhost provider test` (see docs/vendors.md).

use payhost_provider_api::*;

/// Accepts every payment and remembers the keys it acted on, so `retrieve` tells the truth.
pub struct Minimal(std::sync::Mutex<std::collections::HashSet<String>>);

impl Minimal {
    fn act(&self, key: &str) -> Result<ProviderResponse, ProviderError> {
        self.0.lock().unwrap().insert(key.to_owned());
        Ok(ProviderResponse::processed())
    }
}

impl PaymentProvider for Minimal {
    type Options = NoOptions;
    fn manifest() -> Manifest {
        Manifest::new("minimal", "Minimal", "1.0.0")
    }
    fn new(_: NoOptions, _: ProviderContext) -> Result<Self, ProviderError> {
        Ok(Minimal(Default::default()))
    }
    fn initiate(&self, r: InitiateRequest) -> Result<ProviderResponse, ProviderError> {
        self.act(&r.idempotency_key)
    }
    fn authorize(&self, r: AuthorizeRequest) -> Result<ProviderResponse, ProviderError> {
        self.act(&r.idempotency_key)
    }
    fn capture(&self, r: CaptureRequest) -> Result<ProviderResponse, ProviderError> {
        self.act(&r.idempotency_key)
    }
    fn refund(&self, r: RefundRequest) -> Result<ProviderResponse, ProviderError> {
        self.act(&r.idempotency_key)
    }
    fn cancel(&self, r: CancelRequest) -> Result<ProviderResponse, ProviderError> {
        self.act(&r.idempotency_key)
    }
    fn retrieve(&self, r: RetrieveRequest) -> Result<RetrieveResponse, ProviderError> {
        let outcome = |a: AttemptRef| match self.0.lock().unwrap().contains(&a.idempotency_key) {
            true => Outcome::Processed,
            false => Outcome::not_attempted("no call with this key"),
        };
        Ok(RetrieveResponse::attempt(r.attempt.map(outcome)))
    }
}

export_provider!(Minimal);
