//! One error shape for every HTTP answer: `{"error": {"type", "code", "message", "param"?}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::EngineError;

/// The error envelope.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The family: `invalid_request_error`, `not_found`, `conflict`, `invalid_state`,
    /// `idempotency_error`, `payment_declined`, `outcome_pending`, `unauthorized`,
    /// `provider_error`, `provider_unavailable`, `outcome_unknown`, `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The stable code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    /// An error with this status, family, code and message.
    pub fn new(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            retry_after: None,
            body: ErrorBody {
                error: ErrorDetail {
                    kind: kind.into(),
                    code: code.into(),
                    message: message.into(),
                    param: None,
                },
            },
        }
    }

    /// Says when to retry (`Retry-After`, whole seconds, at least 1).
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Names the field at fault.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.body.error.param = Some(param.into());
        self
    }

    /// A 400 about `param`.
    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_input",
            message,
        )
        .param(param)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let code = e.code();
        use StatusCode as S;
        match e {
            EngineError::NotFound { .. } => ApiError::new(S::NOT_FOUND, "not_found", code, message),
            EngineError::InvalidInput { field, .. } => {
                ApiError::new(S::BAD_REQUEST, "invalid_request_error", code, message).param(field)
            }
            EngineError::InvalidTransition(_)
            | EngineError::Unsupported(_)
            | EngineError::AmountOverflow(_) => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "invalid_state", code, message)
            }
            EngineError::ProviderNotLoaded(_) => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                code,
                message,
            )
            .param("provider_id"),
            EngineError::AttemptUnresolved { .. } => {
                ApiError::new(S::CONFLICT, "outcome_pending", code, message)
            }
            EngineError::InProgress(_) | EngineError::CallMayLand { .. } => {
                ApiError::new(S::CONFLICT, "conflict", code, message)
            }
            EngineError::IdempotencyMismatch { .. } => {
                ApiError::new(S::UNPROCESSABLE_ENTITY, "idempotency_error", code, message)
                    .param("Idempotency-Key")
            }
            EngineError::Declined { .. } => {
                ApiError::new(S::PAYMENT_REQUIRED, "payment_declined", code, message)
            }
            EngineError::Unverified(_) => {
                ApiError::new(S::UNAUTHORIZED, "unauthorized", code, message)
            }
            EngineError::Provider(_) => {
                ApiError::new(S::BAD_GATEWAY, "provider_error", code, message)
            }
            EngineError::NotAttempted { .. } => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "provider_unavailable",
                code,
                message,
            ),
            EngineError::OutcomeUnknown { .. } => {
                ApiError::new(S::GATEWAY_TIMEOUT, "outcome_unknown", code, message)
            }
            EngineError::EventsPruned { .. } => {
                ApiError::new(S::GONE, "invalid_request_error", code, message).param("after")
            }
            EngineError::Store(_) => {
                tracing::error!(code, "storage error: {message}");
                // The store is down or failing over: retry shortly, with the same key.
                ApiError::new(S::SERVICE_UNAVAILABLE, "api_error", code, message)
                    .retry_after(std::time::Duration::from_secs(1))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// Puts every error answer that is not already JSON in the envelope: the router's own
/// rejections (a path that does not decode, a query that does not parse) answer in text, and a
/// client must be able to read every error the same way.
pub(super) async fn envelope_every_error(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let kind = match status.as_u16() {
        404 => "not_found",
        500.. => "api_error",
        _ => "invalid_request_error",
    };
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace([' ', '-'], "_");
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let enveloped = ApiError::new(status, kind, &code, message).into_response();
    // Keep what the original answer said about the connection (`connection: close`, `allow`).
    for (name, value) in enveloped.headers() {
        parts.headers.insert(name, value.clone());
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, enveloped.into_body())
}

/// The error answers every endpoint may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum ErrorResponses {
    /// Malformed JSON, a wrong type, a missing or invalid field (`param` names it).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, an unknown one, or a webhook whose signature did not verify.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The API key lacks the operation's scope.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The provider declined.
    #[response(status = 402)]
    Declined(ErrorBody),
    /// No such object.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Another operation on the object is in progress, or an earlier outcome is still unknown.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The request (head or body) did not arrive in time.
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The body is too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not JSON.
    #[response(status = 415)]
    UnsupportedMedia(ErrorBody),
    /// Without API keys, a request addressed to a name that is not loopback (DNS rebinding).
    #[response(status = 421)]
    Misdirected(ErrorBody),
    /// The object's state does not allow it, or the idempotency key was used for another request.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// The API key's rate (or the provider's webhook rate) is spent; see `Retry-After`.
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// The provider answered with an error.
    #[response(status = 502)]
    ProviderError(ErrorBody),
    /// The provider was not reached (safe to retry), or storage is unavailable.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The provider did not answer in time: the outcome is unknown and will be reconciled.
    #[response(status = 504)]
    OutcomeUnknown(ErrorBody),
}
