//! Shared set-up for the benchmarks in `benches/`.

#![allow(missing_docs)]

use payhost_provider_api::AuthorizeRequest;
use serde_json::Value;

/// The request every call benchmark sends: a plain 15.00 EUR authorization.
pub fn authorize_request() -> AuthorizeRequest {
    AuthorizeRequest {
        session_id: "ps_01JBENCH000000000000000000".into(),
        idempotency_key: "ps_01JBENCH000000000000000000:authorize:1".into(),
        amount: 1500,
        currency_code: "eur".into(),
        context: serde_json::json!({"email": "customer@example.com", "ip": "203.0.113.7"}),
        data: Value::Null,
        input: Value::Null,
        account_holder: None,
        payment_method: None,
        deadline_unix_ms: None,
    }
}

/// One complete flow through the library API with the system provider: create collection →
/// create session → authorize → capture. Returns the payment's id and when the capture returned.
pub async fn flow(host: &payhost::Host) -> (String, std::time::Instant) {
    use payhost::engine::*;
    let col = host
        .create_collection(
            NewCollection {
                amount: 2500,
                currency_code: "eur".into(),
                metadata: Value::Null,
            },
            None,
        )
        .await
        .unwrap();
    let session = host
        .create_session(
            NewSession {
                payment_collection_id: Some(col.id.0),
                provider_id: "system".into(),
                cart_id: Some("cart_bench".into()),
                cart: Value::Null,
                context: Value::Null,
                data: Value::Null,
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
        .unwrap();
    let payment = host
        .authorize_session(&session.id.0, AuthorizeInput::default(), None)
        .await
        .unwrap()
        .payment
        .unwrap();
    host.capture_payment(&payment.id.0, CaptureInput::default(), None)
        .await
        .unwrap();
    (payment.id.0, std::time::Instant::now())
}

/// The `p` quantile of sorted durations.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
