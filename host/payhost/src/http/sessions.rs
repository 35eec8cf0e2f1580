//! `/v1/payment-sessions`: create, list, read, update, delete, select, authorize and sync.

use axum::Json;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::access::Admitted;
use super::error::{ApiError, ErrorResponses};
use super::json::{ApiJson, IdempotencyKey};
use super::{ApiResult, Empty};
use crate::domain::*;
use crate::engine::*;

/// Create a payment session (initiated with its provider unless `initiate` is false).
#[utoipa::path(post, path = "/v1/payment-sessions", request_body = NewSession,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn create_session(
    Admitted(s): Admitted,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<NewSession>,
) -> ApiResult<(StatusCode, Json<PaymentSession>)> {
    let session = s.host.create_session(input, key.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(session)))
}

/// Which sessions to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SessionFilter {
    /// Sessions of this cart.
    cart_id: Option<String>,
    /// Sessions of this collection.
    payment_collection_id: Option<String>,
    /// Sessions created with this `reference` (the caller's own id).
    reference: Option<String>,
}

/// Sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct SessionList {
    /// Oldest first.
    payment_sessions: Vec<PaymentSession>,
}

/// List the sessions of a cart, of a collection, or with a reference.
#[utoipa::path(get, path = "/v1/payment-sessions", params(SessionFilter),
    responses((status = 200, body = SessionList), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn list_sessions(
    Admitted(s): Admitted,
    filter: Result<Query<SessionFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<SessionList>> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let payment_sessions = match (
        filter.cart_id,
        filter.payment_collection_id,
        filter.reference,
    ) {
        (Some(cart), None, None) => s.host.sessions_of_cart(&cart).await?,
        (None, Some(col), None) => s.host.sessions_of_collection(&col).await?,
        (None, None, Some(reference)) => s.host.sessions_with_reference(&reference).await?,
        _ => {
            return Err(ApiError::bad_request(
                "cart_id",
                "give exactly one of cart_id, payment_collection_id and reference",
            ));
        }
    };
    Ok(Json(SessionList { payment_sessions }))
}

/// A payment session.
#[utoipa::path(get, path = "/v1/payment-sessions/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn get_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.session(&id).await?))
}

/// Update a session's amount, cart, context, data or metadata.
#[utoipa::path(post, path = "/v1/payment-sessions/{id}", request_body = SessionUpdate,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn update_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<SessionUpdate>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(
        s.host.update_session(&id, input, key.as_deref()).await?,
    ))
}

/// Delete a session that was never authorized (kept as `canceled`).
#[utoipa::path(delete, path = "/v1/payment-sessions/{id}", params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn delete_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.delete_session(&id, key.as_deref()).await?))
}

/// Select a session for its cart and collection (initiating a placeholder).
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/select", params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")), request_body = Empty,
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn select_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(Empty {}): ApiJson<Empty>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.select_session(&id, key.as_deref()).await?))
}

/// Authorize a session. `200` with `next_action` when the customer must act; `402` when declined
/// (the session is then in `error`).
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/authorize", request_body = AuthorizeInput,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = AuthorizeResult), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn authorize_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<AuthorizeInput>,
) -> ApiResult<Json<AuthorizeResult>> {
    let result = s.host.authorize_session(&id, input, key.as_deref()).await?;
    if let Some(decline) = &result.decline {
        return Err(EngineError::Declined {
            code: decline.code.clone(),
            message: decline.message.clone(),
        }
        .into());
    }
    Ok(Json(result))
}

/// Ask the provider where a session stands and apply it (never backwards).
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/sync", params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")), request_body = Empty,
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn sync_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(Empty {}): ApiJson<Empty>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.sync_session(&id, key.as_deref()).await?))
}
