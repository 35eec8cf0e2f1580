//! The OpenAPI document, generated from the handlers and the domain types, and the route that
//! serves it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::error::ErrorBody;
use super::events::EventSchemas;

/// The OpenAPI document of this API, generated from the code.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "payhost",
        description = "Payment sessions, payments, account holders with their saved payment methods, and their providers."
    ),
    paths(
        super::collections::create_collection,
        super::collections::get_collection,
        super::sessions::create_session,
        super::sessions::list_sessions,
        super::sessions::get_session,
        super::sessions::update_session,
        super::sessions::delete_session,
        super::sessions::select_session,
        super::sessions::authorize_session,
        super::sessions::sync_session,
        super::payments::get_payment,
        super::payments::capture_payment,
        super::payments::refund_payment,
        super::payments::cancel_payment,
        super::holders::create_account_holder,
        super::holders::list_account_holders,
        super::holders::get_account_holder,
        super::holders::update_account_holder,
        super::holders::delete_account_holder,
        super::holders::list_payment_methods,
        super::holders::save_payment_method,
        super::holders::delete_payment_method,
        super::operations::list_attempts,
        super::operations::resolve_attempt,
        super::operations::list_providers,
        super::operations::reload_config,
        super::events::list_events,
        super::events::parked_deliveries,
        super::events::redeliver,
        super::webhooks::receive_webhook,
        super::probes::health,
        super::probes::ready,
        super::probes::metrics,
        openapi_json
    ),
    components(schemas(ErrorBody, super::payments::PaymentView)),
    modifiers(&BearerKeys, &EventSchemas)
)]
pub struct ApiDoc;

/// Declares the `api_key` bearer scheme the operations' `security` names.
pub(super) struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("phk_<key id>_<secret>")
                    .description(Some(
                        "An API key from `payhost keys new`. Each operation names the scope it needs.",
                    ))
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json",
    responses((status = 200, content_type = "application/json", body = Object, description = "The OpenAPI 3.1 document of this API")))]
pub(super) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}
