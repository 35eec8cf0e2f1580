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
        deadline_unix_ms: None,
    }
}
