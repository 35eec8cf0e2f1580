//! The HTTP API: REST JSON over the whole lifecycle, `POST /hooks/{provider_id}`, and the
//! operations endpoints. Handlers only translate between HTTP and the engine; they change no
//! status themselves. [`router`] is an axum `Router` an embedder can nest in its own server.

pub mod edge;
pub mod error;
mod events;
use events::EventSchemas;
mod guard;
pub mod json;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::domain::*;
use crate::engine::*;
use error::{ApiError, ErrorBody, ErrorResponses};
use json::{ApiJson, IdempotencyKey};

/// Largest API request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest webhook body.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    host: Arc<Host>,
    failed_providers: Arc<Vec<(String, String)>>,
    body_timeout: Duration,
    keys: Option<Arc<crate::auth::Keys>>,
    admin_apart: bool,
    webhook_limiter: Arc<crate::auth::Limiter>,
}

impl AppState {
    /// State over `host`; `failed_providers` (id, message) are reported by `/providers` and
    /// keep `/ready` false. No key checks: the embedder's own middleware guards the router, or
    /// it calls [`AppState::with_keys`].
    pub fn new(host: Arc<Host>, failed_providers: Vec<(String, String)>) -> AppState {
        AppState {
            host,
            failed_providers: Arc::new(failed_providers),
            body_timeout: DEFAULT_BODY_TIMEOUT,
            keys: None,
            admin_apart: false,
            webhook_limiter: Arc::default(),
        }
    }

    /// How long a request body may take to arrive (default 30 s); `408` after.
    pub fn with_body_timeout(mut self, timeout: Duration) -> AppState {
        self.body_timeout = timeout;
        self
    }

    /// Every route but `/health`, `/openapi.json` and the webhooks needs one of `keys`, with
    /// the route's scope ([`crate::auth::scope_for`]).
    pub fn with_keys(mut self, keys: crate::auth::Keys) -> AppState {
        self.keys = Some(Arc::new(keys));
        self
    }

    /// `/ready`, `/metrics` and the operator routes are served by [`admin_router`] instead of
    /// [`router`].
    pub fn with_admin_apart(mut self) -> AppState {
        self.admin_apart = true;
        self
    }
}

/// The default of [`AppState::with_body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

type ApiResult<T> = Result<T, ApiError>;

/// Which listener a router serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Api,
    Admin,
}

fn operator_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/attempts", get(list_attempts))
        .route("/v1/attempts/{id}/resolve", post(resolve_attempt))
        .route("/v1/providers", get(list_providers))
        .route(
            "/v1/event-deliveries/parked",
            get(events::parked_deliveries),
        )
        .route(
            "/v1/event-deliveries/{id}/redeliver",
            post(events::redeliver),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// Layers every router has: key checks, body guards, metrics.
fn finish(routes: Router<AppState>, state: AppState, listener: Listener) -> Router {
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            (state.clone(), listener),
            authorize,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::guard_body,
        ))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// The whole API as one router: mount it at the root, or nest it under a prefix of your own.
/// With [`AppState::with_admin_apart`] it leaves readiness, metrics and the operator routes to
/// [`admin_router`].
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/payment-collections", post(create_collection))
        .route("/v1/payment-collections/{id}", get(get_collection))
        .route(
            "/v1/payment-sessions",
            post(create_session).get(list_sessions),
        )
        .route(
            "/v1/payment-sessions/{id}",
            get(get_session).post(update_session).delete(delete_session),
        )
        .route("/v1/payment-sessions/{id}/select", post(select_session))
        .route(
            "/v1/payment-sessions/{id}/authorize",
            post(authorize_session),
        )
        .route("/v1/payment-sessions/{id}/sync", post(sync_session))
        .route("/v1/payments/{id}", get(get_payment))
        .route("/v1/payments/{id}/capture", post(capture_payment))
        .route("/v1/payments/{id}/refund", post(refund_payment))
        .route("/v1/payments/{id}/cancel", post(cancel_payment))
        .route("/v1/events", get(events::list_events))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let hooks = Router::new()
        .route("/hooks/{provider_id}", post(receive_webhook))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY));
    let mut routes = Router::new()
        .merge(api)
        .merge(hooks)
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json));
    if !state.admin_apart {
        routes = routes
            .merge(operator_routes())
            .route("/ready", get(ready))
            .route("/metrics", get(metrics));
    }
    finish(routes, state, Listener::Api)
}

/// The admin listener's router: `/health`, `/ready` and `/metrics` open (it should listen on a
/// private address), the operator routes behind the `operator` scope when keys exist.
pub fn admin_router(state: AppState) -> Router {
    let routes = operator_routes()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics));
    finish(routes, state, Listener::Admin)
}

/// Who the caller is, and whether it may: the key check of every route that needs one.
async fn authorize(
    State((s, listener)): State<(AppState, Listener)>,
    mut request: Request,
    next: Next,
) -> Response {
    use crate::auth::{AuthError, scope_for};
    if request
        .uri()
        .query()
        .is_some_and(crate::auth::query_holds_a_key)
    {
        return auth_refusal(&AuthError::InUrl);
    }
    let Some(keys) = s.keys.clone() else {
        return next.run(request).await;
    };
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let scope = template.as_deref().and_then(|t| {
        // The admin listener is private: probes and scrapes need no key there.
        match (listener, t) {
            (Listener::Admin, "/health" | "/ready" | "/metrics") => None,
            _ => scope_for(request.method(), t),
        }
    });
    let Some(scope) = scope else {
        return next.run(request).await;
    };
    let caller = match keys.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(caller) => caller,
        Err(e) => return auth_refusal(&e),
    };
    if !caller.may(scope) {
        return auth_refusal(&AuthError::MissingScope(scope));
    }
    if let Err(e) = keys.admit(&caller) {
        return auth_refusal(&e);
    }
    let mutating = !matches!(request.method().as_str(), "GET" | "HEAD");
    let method = request.method().clone();
    let key_id = caller.key_id.clone();
    request.extensions_mut().insert(caller);
    let response = acting_as(key_id.clone(), next.run(request)).await;
    if mutating {
        tracing::info!(
            key = %key_id,
            method = %method,
            route = template.as_deref().unwrap_or("?"),
            status = response.status().as_u16(),
            "request"
        );
    }
    response
}

fn auth_refusal(e: &crate::auth::AuthError) -> Response {
    use crate::auth::AuthError;
    let (status, kind) = match e {
        AuthError::MissingScope(_) => (StatusCode::FORBIDDEN, "permission_error"),
        AuthError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        AuthError::InUrl => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        _ => (StatusCode::UNAUTHORIZED, "authentication_error"),
    };
    let mut response = ApiError::new(status, kind, e.code(), e.to_string()).into_response();
    let headers = response.headers_mut();
    match e {
        AuthError::Missing => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"payhost\""),
            );
        }
        AuthError::Malformed(_) | AuthError::Unknown => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(
                    "Bearer realm=\"payhost\", error=\"invalid_token\"",
                ),
            );
        }
        AuthError::MissingScope(scope) => {
            if let Ok(v) = header::HeaderValue::from_str(&format!(
                "Bearer realm=\"payhost\", error=\"insufficient_scope\", scope=\"{}\"",
                scope.as_str()
            )) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        AuthError::RateLimited { retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        AuthError::InUrl => {}
    }
    response
}

/// Counts and times every request by its route template.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Label values come from a fixed set: a random method or path must not grow the registry.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let m = crate::metrics::global();
    m.http_requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[&method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "route_not_found",
        "no such route; see /openapi.json",
    )
}

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

/// Create a payment collection.
#[utoipa::path(post, path = "/v1/payment-collections", request_body = NewCollection,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = PaymentCollection), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn create_collection(
    State(s): State<AppState>,
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
async fn get_collection(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<CollectionView>> {
    Ok(Json(s.host.collection(&id).await?))
}

/// Create a payment session (initiated with its provider unless `initiate` is false).
#[utoipa::path(post, path = "/v1/payment-sessions", request_body = NewSession,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 201, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn create_session(
    State(s): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<NewSession>,
) -> ApiResult<(StatusCode, Json<PaymentSession>)> {
    let session = s.host.create_session(input, key.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(session)))
}

/// Which sessions to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SessionFilter {
    /// Sessions of this cart.
    cart_id: Option<String>,
    /// Sessions of this collection.
    payment_collection_id: Option<String>,
}

/// Sessions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct SessionList {
    /// Oldest first.
    payment_sessions: Vec<PaymentSession>,
}

/// List the sessions of a cart or of a collection.
#[utoipa::path(get, path = "/v1/payment-sessions", params(SessionFilter),
    responses((status = 200, body = SessionList), ErrorResponses),
    security(("api_key" = ["read"])))]
async fn list_sessions(
    State(s): State<AppState>,
    filter: Result<Query<SessionFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<SessionList>> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let payment_sessions = match (filter.cart_id, filter.payment_collection_id) {
        (Some(cart), None) => s.host.sessions_of_cart(&cart).await?,
        (None, Some(col)) => s.host.sessions_of_collection(&col).await?,
        _ => {
            return Err(ApiError::bad_request(
                "cart_id",
                "give exactly one of cart_id and payment_collection_id",
            ));
        }
    };
    Ok(Json(SessionList { payment_sessions }))
}

/// A payment session.
#[utoipa::path(get, path = "/v1/payment-sessions/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["read"])))]
async fn get_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.session(&id).await?))
}

/// Update a session's amount, cart, context, data or metadata.
#[utoipa::path(post, path = "/v1/payment-sessions/{id}", request_body = SessionUpdate,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn update_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<SessionUpdate>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(
        s.host.update_session(&id, input, key.as_deref()).await?,
    ))
}

/// Delete a session that was never authorized (kept as `canceled`).
#[utoipa::path(delete, path = "/v1/payment-sessions/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn delete_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.delete_session(&id).await?))
}

/// Select a session for its cart and collection (initiating a placeholder).
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/select", params(("id" = String, Path)),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn select_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.select_session(&id).await?))
}

/// Authorize a session. `200` with `next_action` when the customer must act; `402` when declined
/// (the session is then in `error`).
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/authorize", request_body = AuthorizeInput,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = AuthorizeResult), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn authorize_session(
    State(s): State<AppState>,
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
#[utoipa::path(post, path = "/v1/payment-sessions/{id}/sync", params(("id" = String, Path)),
    responses((status = 200, body = PaymentSession), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn sync_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.sync_session(&id).await?))
}

/// A payment with its captures and refunds.
#[utoipa::path(get, path = "/v1/payments/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["read"])))]
async fn get_payment(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(s.host.payment(&id).await?.into()))
}

/// Capture `amount` (default: what remains).
#[utoipa::path(post, path = "/v1/payments/{id}/capture", request_body = CaptureInput,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn capture_payment(
    State(s): State<AppState>,
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
async fn refund_payment(
    State(s): State<AppState>,
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
#[utoipa::path(post, path = "/v1/payments/{id}/cancel",
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["payments"])))]
async fn cancel_payment(
    State(s): State<AppState>,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
) -> ApiResult<Json<PaymentView>> {
    Ok(Json(
        s.host.cancel_payment(&id, key.as_deref()).await?.into(),
    ))
}

/// Attempts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct AttemptList {
    /// Oldest first.
    attempts: Vec<Attempt>,
}

/// Attempts whose outcome is open (in flight, unknown, waiting for an operator).
#[utoipa::path(get, path = "/v1/attempts", responses((status = 200, body = AttemptList), ErrorResponses),
    security(("api_key" = ["operator"])))]
async fn list_attempts(State(s): State<AppState>) -> ApiResult<Json<AttemptList>> {
    Ok(Json(AttemptList {
        attempts: s.host.open_attempts().await?,
    }))
}

/// How an operator settles an attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Resolve {
    /// `succeeded` or `failed`.
    #[serde(rename = "as")]
    outcome: ResolveOutcome,
    /// Who resolves it. Only without API keys: with keys, the key that asks is recorded.
    #[serde(default)]
    by: Option<String>,
    /// How they know.
    note: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum ResolveOutcome {
    Succeeded,
    Failed,
}

/// Settle an open attempt by hand, recorded with who (the API key), when and why. Refused while
/// its call may still reach the processor.
#[utoipa::path(post, path = "/v1/attempts/{id}/resolve", request_body = Resolve,
    params(("id" = String, Path)), responses((status = 200, body = Attempt), ErrorResponses),
    security(("api_key" = ["operator"])))]
async fn resolve_attempt(
    State(s): State<AppState>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    ApiJson(input): ApiJson<Resolve>,
) -> ApiResult<Json<Attempt>> {
    let as_ = match input.outcome {
        ResolveOutcome::Succeeded => ResolveAs::Succeeded,
        ResolveOutcome::Failed => ResolveAs::Failed,
    };
    let by = match (caller, input.by) {
        (Some(caller), None) => format!("key:{}", caller.key_id),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "by",
                "the operator is the API key that asks; leave `by` out",
            ));
        }
        (None, Some(by)) => by,
        (None, None) => {
            return Err(ApiError::bad_request("by", "say who resolves the attempt"));
        }
    };
    Ok(Json(
        s.host.resolve_attempt(&id, as_, &by, &input.note).await?,
    ))
}

/// A provider as the host sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct ProviderInfo {
    /// The operator's id.
    id: String,
    /// `loaded`, `restarting` (its worker died), `unhealthy` (its worker crash-loops) or
    /// `failed` (it did not load).
    health: String,
    /// `in_process` or `process`.
    isolation: Option<String>,
    /// The plugin's manifest, when loaded.
    #[schema(value_type = Object)]
    manifest: Option<serde_json::Value>,
    /// The negotiated protocol.
    protocol: Option<u32>,
    /// The library file.
    library: Option<String>,
    /// Its SHA-256.
    sha256: Option<String>,
    /// Calls running now.
    calls_in_progress: Option<usize>,
    /// Why it failed to load.
    error: Option<String>,
}

/// Providers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct ProviderList {
    /// In id order, then the failed ones.
    providers: Vec<ProviderInfo>,
}

/// The configured providers with their manifests and health.
#[utoipa::path(get, path = "/v1/providers", responses((status = 200, body = ProviderList), ErrorResponses),
    security(("api_key" = ["operator"])))]
async fn list_providers(State(s): State<AppState>) -> Json<ProviderList> {
    let mut providers: Vec<ProviderInfo> = s
        .host
        .providers()
        .iter()
        .map(|p| ProviderInfo {
            id: p.id().to_owned(),
            health: match p.isolation().1 {
                None | Some(crate::worker::WorkerHealth::Up) => "loaded",
                Some(crate::worker::WorkerHealth::Restarting) => "restarting",
                Some(crate::worker::WorkerHealth::Unhealthy) => "unhealthy",
            }
            .into(),
            isolation: Some(p.isolation().0.into()),
            manifest: serde_json::to_value(p.manifest()).ok(),
            protocol: Some(p.protocol()),
            library: Some(p.library().path.display().to_string()),
            sha256: Some(p.library().sha256.clone()),
            calls_in_progress: Some(p.calls_in_progress()),
            error: None,
        })
        .collect();
    providers.extend(s.failed_providers.iter().map(|(id, e)| ProviderInfo {
        id: id.clone(),
        health: "failed".into(),
        isolation: None,
        manifest: None,
        protocol: None,
        library: None,
        sha256: None,
        calls_in_progress: None,
        error: Some(e.clone()),
    }));
    Json(ProviderList { providers })
}

/// A provider's webhook: verified by the provider before any 2xx, stored once per event id,
/// applied through the engine.
#[utoipa::path(post, path = "/hooks/{provider_id}", params(("provider_id" = String, Path)),
    request_body(content = String, description = "The provider's raw event"),
    responses((status = 200, body = WebhookReceipt), ErrorResponses))]
async fn receive_webhook(
    State(s): State<AppState>,
    Path(provider_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<WebhookReceipt>> {
    let m = crate::metrics::global();
    // Only ids of loaded providers become label values.
    let provider = s.host.providers().get(&provider_id).cloned();
    let known = provider.as_ref().map_or("other", |p| p.id());
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
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            "invalid_request_error",
            "invalid_body",
            e.body_text(),
        )
    })?;
    let body = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("body", "the webhook body is not UTF-8"))?;
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let result = s.host.receive_webhook(&provider_id, body, headers).await;
    let label = match &result {
        Ok(r) if r.duplicate => "duplicate",
        Ok(_) => "applied",
        Err(e) => e.code(),
    };
    m.webhooks.with_label_values(&[known, label]).inc();
    match result {
        Err(EngineError::ProviderNotLoaded(id)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "provider_not_loaded",
            format!("no provider `{id}`"),
        )),
        other => Ok(Json(other?)),
    }
}

/// Liveness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct Health {
    /// `ok`.
    status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
struct Readiness {
    /// Whether the host can serve.
    ready: bool,
    /// The store answered.
    store: bool,
    /// Providers loaded.
    providers_loaded: usize,
    /// Providers that failed to load.
    providers_failed: Vec<String>,
    /// The reconciler asked about everything a previous run left open.
    recovered: bool,
    /// This host holds a current lease on the shared store (always true on SQLite).
    lease: bool,
    /// Isolated providers whose worker crash-loops.
    providers_unhealthy: Vec<String>,
}

/// The store is reachable, every enabled provider loaded, and start-up reconciliation is done
/// (`503` otherwise).
#[utoipa::path(get, path = "/ready", responses((status = 200, body = Readiness), (status = 503, body = Readiness)),
    security(("api_key" = ["operator"])))]
async fn ready(State(s): State<AppState>) -> Response {
    let store = s.host.store().key("payhost-readiness-probe").await.is_ok();
    let recovered = s.host.recovered();
    let lease = s.host.lease_ok();
    let unhealthy: Vec<String> = s
        .host
        .providers()
        .iter()
        .filter(|p| !p.healthy())
        .map(|p| p.id().to_owned())
        .collect();
    let r = Readiness {
        ready: store && s.failed_providers.is_empty() && recovered && lease && unhealthy.is_empty(),
        providers_unhealthy: unhealthy,
        store,
        recovered,
        lease,
        providers_loaded: s.host.providers().len(),
        providers_failed: s
            .failed_providers
            .iter()
            .map(|(id, _)| id.clone())
            .collect(),
    };
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)),
    security(("api_key" = ["operator"])))]
async fn metrics(State(s): State<AppState>) -> Response {
    let m = crate::metrics::global();
    if let Ok(hosts) = s.host.store().hosts().await
        && !hosts.is_empty()
    {
        let live = hosts.iter().filter(|h| h.live).count() as i64;
        m.hosts.with_label_values(&["live"]).set(live);
        m.hosts
            .with_label_values(&["expired"])
            .set(hosts.len() as i64 - live);
    }
    for p in s.host.providers().iter() {
        m.provider_healthy
            .with_label_values(&[p.id()])
            .set(i64::from(p.healthy()));
    }
    if let Ok(open) = s.host.open_attempts().await {
        for state in [
            AttemptState::InFlight,
            AttemptState::Unknown,
            AttemptState::NeedsOperator,
        ] {
            let n = open.iter().filter(|a| a.state == state).count();
            m.attempts_open
                .with_label_values(&[state.as_str()])
                .set(n as i64);
        }
    }
    if let Ok(parked) = s.host.parked_deliveries(10_000).await {
        m.deliveries_parked.set(parked.len() as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
        .into_response()
}

/// The OpenAPI document of this API, generated from the code.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "payhost",
        description = "Payment sessions, payments and their providers."
    ),
    paths(
        create_collection,
        get_collection,
        create_session,
        list_sessions,
        get_session,
        update_session,
        delete_session,
        select_session,
        authorize_session,
        sync_session,
        get_payment,
        capture_payment,
        refund_payment,
        cancel_payment,
        list_attempts,
        resolve_attempt,
        list_providers,
        events::list_events,
        events::parked_deliveries,
        events::redeliver,
        receive_webhook,
        health,
        ready,
        metrics
    ),
    components(schemas(ErrorBody, PaymentView)),
    modifiers(&BearerKeys, &EventSchemas)
)]
pub struct ApiDoc;

/// Declares the `api_key` bearer scheme the operations' `security` names.
struct BearerKeys;

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

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scope each operation declares in the OpenAPI document is the one the key check
    /// enforces ([`crate::auth::scope_for`]): a route cannot say one thing and do another.
    #[test]
    fn the_document_declares_the_scope_the_key_check_enforces() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let declared = op["security"]
                    .as_array()
                    .and_then(|s| s.first())
                    .and_then(|req| req["api_key"][0].as_str())
                    .and_then(crate::auth::Scope::parse);
                let method: axum::http::Method = method.to_uppercase().parse().unwrap();
                assert_eq!(
                    declared,
                    crate::auth::scope_for(&method, path),
                    "{method} {path}"
                );
                seen += 1;
            }
        }
        assert!(seen >= 20, "{seen}");
    }

    /// The event types the document lists are the names events carry on the wire.
    #[test]
    fn the_document_lists_event_types_by_their_wire_names() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["EventType"]["enum"]
            .as_array()
            .expect("EventType is an enum")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let wire: Vec<&str> = crate::events::EventType::ALL
            .iter()
            .map(|t| t.as_str())
            .collect();
        assert_eq!(listed, wire);
    }

    /// Every event type has its own schema (its `data` the entity it carries), and `Event` is
    /// one of them.
    #[test]
    fn each_event_type_has_its_schema() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let one_of = schemas["Event"]["oneOf"]
            .as_array()
            .expect("Event is a oneOf");
        assert_eq!(one_of.len(), crate::events::EventType::ALL.len());
        for kind in crate::events::EventType::ALL {
            let schema = &schemas[format!("Event.{kind}")];
            let own = &schema["allOf"][1]["properties"];
            assert_eq!(own["type"]["enum"][0], kind.as_str());
            assert!(!schema["description"].as_str().unwrap().is_empty());
            assert!(own["data"].is_object(), "{kind}");
        }
        assert_eq!(
            schemas["Event.payment_session.authorized"]["allOf"][1]["properties"]["data"]["$ref"],
            "#/components/schemas/PaymentSession"
        );
        assert_eq!(
            schemas["Event.webhook.applied"]["allOf"][1]["properties"]["data"]["properties"]["payment_session_id"]
                ["type"],
            serde_json::json!(["string", "null"])
        );
    }
}
