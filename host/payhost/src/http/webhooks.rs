//! `POST /hooks/{provider_id}`: a provider's webhook, verified before any 2xx, under two
//! budgets (the provider's for verified events, the sending address's for failures).

use axum::Json;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};

use super::ApiResult;
use super::access::Admitted;
use super::error::{ApiError, ErrorResponses};
use crate::engine::{EngineError, WebhookReceipt};

/// How many webhooks that fail verification one client address may send a provider: 2 per
/// second, 20 at once. Past it the address gets `429` without its webhooks being verified.
pub const WEBHOOK_FAILURE_RATE: crate::auth::RateLimit = crate::auth::RateLimit {
    rate: 2.0,
    burst: 20.0,
};

/// A provider's webhook: verified by the provider before any 2xx, stored once per event id,
/// applied through the engine. Two budgets: one per provider for verified events (the
/// provider's `webhook_rate`), and one per client address for events that fail verification,
/// so unsigned junk never takes the processor's real webhooks' budget.
#[utoipa::path(post, path = "/hooks/{provider_id}", params(("provider_id" = String, Path)),
    request_body(content = String, description = "The provider's raw event"),
    responses((status = 200, body = WebhookReceipt), ErrorResponses))]
pub(super) async fn receive_webhook(
    Admitted(s): Admitted,
    Path(provider_id): Path<String>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<WebhookReceipt>> {
    let m = crate::metrics::global();
    // Only ids of loaded providers become label values.
    let provider = s.host.providers().get(&provider_id).cloned();
    let known = provider.as_ref().map_or("other", |p| p.id());
    let address = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let failures_of = format!("{known}/{address}");
    if let Err(retry_after) = s.webhook_failures.has_room(&failures_of) {
        m.webhooks.with_label_values(&[known, "rate_limited"]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            "this address sent too many webhooks that failed verification",
        )
        .retry_after(retry_after));
    }
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "invalid_request_error",
            "invalid_body",
            e.body_text(),
        )
    })?;
    let failed = |e: EngineError| {
        let _ = s.webhook_failures.take(&failures_of, WEBHOOK_FAILURE_RATE);
        m.webhooks.with_label_values(&[known, e.code()]).inc();
        tracing::info!(peer = %address, provider = %provider_id, code = e.code(), "webhook refused: {e}");
        match e {
            EngineError::ProviderNotLoaded(id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "provider_not_loaded",
                format!("no provider `{id}`"),
            ),
            other => ApiError::from(other),
        }
    };
    let body = match String::from_utf8(body.to_vec()) {
        Ok(body) => body,
        Err(_) => {
            let _ = s.webhook_failures.take(&failures_of, WEBHOOK_FAILURE_RATE);
            return Err(ApiError::bad_request(
                "body",
                "the webhook body is not UTF-8",
            ));
        }
    };
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let verified = s
        .host
        .verify_webhook(&provider_id, body, headers)
        .await
        .map_err(failed)?;
    if let Some(p) = &provider
        && let Err(retry_after) = s.webhook_limiter.take(p.id(), p.webhook_rate())
    {
        m.webhooks.with_label_values(&[known, "rate_limited"]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            format!(
                "provider `{}` sends webhooks faster than its webhook rate",
                p.id()
            ),
        )
        .retry_after(retry_after));
    }
    let result = s.host.accept_webhook(verified).await;
    let label = match &result {
        Ok(r) if r.duplicate => "duplicate",
        Ok(_) => "applied",
        Err(e) => e.code(),
    };
    m.webhooks.with_label_values(&[known, label]).inc();
    Ok(Json(result?))
}
