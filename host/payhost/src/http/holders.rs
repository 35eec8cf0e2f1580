//! `/v1/account-holders`: a customer's record at a provider and the payment methods saved to it
//! (create, list by customer, read, update, delete; save, list, delete a method).

use axum::Json;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiResult;
use super::access::Admitted;
use super::error::{ApiError, ErrorResponses};
use super::json::{ApiJson, IdempotencyKey};
use crate::domain::*;
use crate::engine::*;

/// Create a customer's account holder at a provider (the existing live one is returned as it
/// is). `503`-class answers and `outcome_unknown` leave it `pending` until reconciled.
#[utoipa::path(post, path = "/v1/account-holders", request_body = NewAccountHolder,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = AccountHolder), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn create_account_holder(
    Admitted(s): Admitted,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<NewAccountHolder>,
) -> ApiResult<(StatusCode, Json<AccountHolder>)> {
    let holder = s.host.create_account_holder(input, key.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(holder)))
}

/// Which account holders to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct HolderFilter {
    /// The embedder's customer id (required).
    customer_id: Option<String>,
}

/// Account holders.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct HolderList {
    /// Oldest first, every provider and status.
    account_holders: Vec<AccountHolder>,
}

/// List a customer's account holders.
#[utoipa::path(get, path = "/v1/account-holders", params(HolderFilter),
    responses((status = 200, body = HolderList), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn list_account_holders(
    Admitted(s): Admitted,
    filter: Result<Query<HolderFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<HolderList>> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let Some(customer_id) = filter.customer_id else {
        return Err(ApiError::bad_request(
            "customer_id",
            "give the customer whose account holders to list",
        ));
    };
    let account_holders = s.host.account_holders_of_customer(&customer_id).await?;
    Ok(Json(HolderList { account_holders }))
}

/// An account holder with its saved payment methods.
#[utoipa::path(get, path = "/v1/account-holders/{id}", params(("id" = String, Path)),
    responses((status = 200, body = AccountHolderView), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn get_account_holder(
    Admitted(s): Admitted,
    Path(id): Path<String>,
) -> ApiResult<Json<AccountHolderView>> {
    Ok(Json(s.host.account_holder(&id).await?))
}

/// Change an account holder's customer details at its provider.
#[utoipa::path(post, path = "/v1/account-holders/{id}", request_body = AccountHolderUpdate,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = AccountHolder), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn update_account_holder(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<AccountHolderUpdate>,
) -> ApiResult<Json<AccountHolder>> {
    Ok(Json(
        s.host
            .update_account_holder(&id, input, key.as_deref())
            .await?,
    ))
}

/// Delete an account holder at its provider, detaching every method saved to it.
#[utoipa::path(delete, path = "/v1/account-holders/{id}",
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = AccountHolder), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn delete_account_holder(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> ApiResult<Json<AccountHolder>> {
    Ok(Json(
        s.host.delete_account_holder(&id, key.as_deref()).await?,
    ))
}

/// Saved payment methods.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct MethodList {
    /// Status `saved`, oldest first.
    payment_methods: Vec<PaymentMethod>,
}

/// The payment methods saved to an account holder.
#[utoipa::path(get, path = "/v1/account-holders/{id}/payment-methods", params(("id" = String, Path)),
    responses((status = 200, body = MethodList), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn list_payment_methods(
    Admitted(s): Admitted,
    Path(id): Path<String>,
) -> ApiResult<Json<MethodList>> {
    let payment_methods = s.host.payment_methods(&id).await?;
    Ok(Json(MethodList { payment_methods }))
}

/// Save a payment method (a card or a processor's token in `data`, never stored) to an account
/// holder. `402` when the processor refuses it.
#[utoipa::path(post, path = "/v1/account-holders/{id}/payment-methods", request_body = NewPaymentMethod,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = PaymentMethod), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn save_payment_method(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<NewPaymentMethod>,
) -> ApiResult<(StatusCode, Json<PaymentMethod>)> {
    let method = s
        .host
        .save_payment_method(&id, input, key.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(method)))
}

/// Delete a saved payment method (detach it at the processor).
#[utoipa::path(delete, path = "/v1/account-holders/{id}/payment-methods/{method_id}",
    params(("id" = String, Path), ("method_id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentMethod), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn delete_payment_method(
    Admitted(s): Admitted,
    Path((id, method_id)): Path<(String, String)>,
    IdempotencyKey(key): IdempotencyKey,
) -> ApiResult<Json<PaymentMethod>> {
    Ok(Json(
        s.host
            .delete_payment_method(&id, &method_id, key.as_deref())
            .await?,
    ))
}
