//! `/v1/payments`: read a payment with its derived amounts, capture, refund, cancel.

use axum::Json;
use axum::extract::Path;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::Admitted;
use super::error::ErrorResponses;
use super::json::{ApiJson, IdempotencyKey};
use super::{ApiResult, Empty};
use crate::domain::*;
use crate::engine::*;

/// A payment with its derived amounts and status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    /// The payment.
    #[serde(flatten)]
    pub payment: Payment,
    /// Derived status.
    pub status: PaymentStatus,
    /// Σ captures.
    pub captured_amount: i64,
    /// Σ refunds.
    pub refunded_amount: i64,
}

impl From<Payment> for PaymentView {
    fn from(payment: Payment) -> Self {
        PaymentView {
            status: payment.status(),
            captured_amount: payment.captured_amount(),
            refunded_amount: payment.refunded_amount(),
            payment,
        }
    }
}

/// A payment with its captures and refunds.
#[utoipa::path(get, path = "/v1/payments/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn get_payment(
    Admitted(s): Admitted,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(s.host.payment(&id).await?.into()))
}

/// Capture `amount` (default: what remains).
#[utoipa::path(post, path = "/v1/payments/{id}/capture", request_body = CaptureInput,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn capture_payment(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<CaptureInput>,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(
        s.host
            .capture_payment(&id, input, key.as_deref())
            .await?
            .into(),
    ))
}

/// Refund `amount` (default: everything captured and not refunded).
#[utoipa::path(post, path = "/v1/payments/{id}/refund", request_body = RefundInput,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn refund_payment(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<RefundInput>,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(
        s.host
            .refund_payment(&id, input, key.as_deref())
            .await?
            .into(),
    ))
}

/// Cancel (void) a payment with no captures.
#[utoipa::path(post, path = "/v1/payments/{id}/cancel", request_body = Empty,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["payments"])))]
pub(super) async fn cancel_payment(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(Empty {}): ApiJson<Empty>,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(
        s.host.cancel_payment(&id, key.as_deref()).await?.into(),
    ))
}
