//! `/v1/payment-collections`: create a collection, read it with its sessions and payments.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;

use super::ApiResult;
use super::access::Admitted;
use super::error::ErrorResponses;
use super::json::{ApiJson, IdempotencyKey};
use crate::domain::*;
use crate::engine::*;

/// Create a payment collection.
#[utoipa::path(post, path = "/v1/payment-collections", request_body = NewCollection,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = PaymentCollection), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn create_collection(
    Admitted(s): Admitted,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<NewCollection>,
) -> ApiResult<(StatusCode, Json<PaymentCollection>)> {
    let c = s.host.create_collection(input, key.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

/// A payment collection with its derived status, sessions and payments.
#[utoipa::path(get, path = "/v1/payment-collections/{id}", params(("id" = String, Path)),
    responses((status = 200, body = CollectionView), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn get_collection(
    Admitted(s): Admitted,
    Path(id): Path<String>,
) -> ApiResult<Json<CollectionView>> {
    Ok(Json(s.host.collection(&id).await?))
}
