//! The HTTP API: REST JSON over the whole lifecycle, `POST /hooks/{provider_id}`, and the
//! operations endpoints. Handlers only translate between HTTP and the engine; they change no
//! status themselves. [`router`] is an axum `Router` an embedder can nest in its own server.

pub mod access;
pub mod edge;
pub mod error;
mod events;
use events::EventSchemas;
mod guard;
pub mod json;
pub mod listeners;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::Scope;
use crate::domain::*;
use crate::engine::*;
use access::{Access, Admitted, Routes};
pub use access::{Admission, RouteRule};
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
    loopback_hosts: bool,
    webhook_limiter: Arc<crate::auth::Limiter>,
    webhook_failures: Arc<crate::auth::Limiter>,
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
            loopback_hosts: false,
            webhook_limiter: Arc::default(),
            webhook_failures: Arc::default(),
        }
    }

    /// How long a request body may take to arrive (default 30 s); `408` after.
    pub fn with_body_timeout(mut self, timeout: Duration) -> AppState {
        self.body_timeout = timeout;
        self
    }

    /// Every route but `/health`, `/openapi.json` and the webhooks needs one of `keys`, with
    /// the scope its rule names ([`rules`]).
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

    /// Without keys, API requests must be addressed to a loopback name (`localhost`,
    /// `127.0.0.1`, `[::1]`), or they get `421`: a web page that rebinds its own name to this
    /// machine cannot reach the API. `payhost serve` sets it whenever it runs without keys.
    pub fn with_loopback_hosts_only(mut self) -> AppState {
        self.loopback_hosts = true;
        self
    }
}

/// The default of [`AppState::with_body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

type ApiResult<T> = Result<T, ApiError>;

/// The body of a POST that takes no input: `{}` (or nothing), sent as `application/json` like
/// every POST, so that a web page cannot send it without a preflight.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The operator's routes, on whichever listener serves them.
fn operator_routes(routes: Routes) -> Routes {
    let operator = Access::Scope(Scope::Operator);
    routes
        .add(Method::GET, "/v1/attempts", operator, get(list_attempts))
        .add(
            Method::POST,
            "/v1/attempts/{id}/resolve",
            operator,
            post(resolve_attempt),
        )
        .add(Method::GET, "/v1/providers", operator, get(list_providers))
        .add(
            Method::GET,
            "/v1/event-deliveries/parked",
            operator,
            get(events::parked_deliveries),
        )
        .add(
            Method::POST,
            "/v1/event-deliveries/{id}/redeliver",
            operator,
            post(events::redeliver),
        )
}

/// Layers every router has: body guards, metrics, the refusal of keys in URLs, and the error
/// envelope on every answer (the router's own included).
fn finish(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(access::refuse_keys_in_urls))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::guard_body,
        ))
        .layer(middleware::from_fn(error::envelope_every_error))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Every route of the API and its rule, as [`router`] registers them (the admin listener's are
/// [`admin_rules`]).
pub fn rules(state: &AppState) -> Vec<RouteRule> {
    api_routes(state).1
}

/// Every route of the admin listener and its rule.
pub fn admin_rules(state: &AppState) -> Vec<RouteRule> {
    admin_routes(state).1
}

fn api_routes(state: &AppState) -> (Router<AppState>, Vec<RouteRule>) {
    let (read, pay) = (Access::Scope(Scope::Read), Access::Scope(Scope::Payments));
    let mut api = Routes::new(state)
        .add(
            Method::POST,
            "/v1/payment-collections",
            pay,
            post(create_collection),
        )
        .add(
            Method::GET,
            "/v1/payment-collections/{id}",
            read,
            get(get_collection),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions",
            pay,
            post(create_session),
        )
        .add(
            Method::GET,
            "/v1/payment-sessions",
            read,
            get(list_sessions),
        )
        .add(
            Method::GET,
            "/v1/payment-sessions/{id}",
            read,
            get(get_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}",
            pay,
            post(update_session),
        )
        .add(
            Method::DELETE,
            "/v1/payment-sessions/{id}",
            pay,
            delete(delete_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/select",
            pay,
            post(select_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/authorize",
            pay,
            post(authorize_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/sync",
            pay,
            post(sync_session),
        )
        .add(Method::GET, "/v1/payments/{id}", read, get(get_payment))
        .add(
            Method::POST,
            "/v1/payments/{id}/capture",
            pay,
            post(capture_payment),
        )
        .add(
            Method::POST,
            "/v1/payments/{id}/refund",
            pay,
            post(refund_payment),
        )
        .add(
            Method::POST,
            "/v1/payments/{id}/cancel",
            pay,
            post(cancel_payment),
        )
        .add(Method::GET, "/v1/events", read, get(events::list_events))
        .add(Method::GET, "/health", Access::Open, get(health))
        .add(
            Method::GET,
            "/openapi.json",
            Access::Open,
            get(openapi_json),
        );
    if !state.admin_apart {
        let operator = Access::Scope(Scope::Operator);
        api = operator_routes(api)
            .add(Method::GET, "/ready", operator, get(ready))
            .add(Method::GET, "/metrics", operator, get(metrics));
    }
    let (api, mut rules) = api.finish();
    let (hooks, hook_rules) = Routes::new(state)
        .add(
            Method::POST,
            "/hooks/{provider_id}",
            Access::Open,
            post(receive_webhook),
        )
        .finish();
    rules.extend(hook_rules);
    let router = api
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .merge(hooks.layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)));
    (router, rules)
}

fn admin_routes(state: &AppState) -> (Router<AppState>, Vec<RouteRule>) {
    // The admin listener is private: probes and scrapes need no key there.
    let (router, rules) = operator_routes(Routes::new(state))
        .add(Method::GET, "/health", Access::Open, get(health))
        .add(Method::GET, "/ready", Access::Open, get(ready))
        .add(Method::GET, "/metrics", Access::Open, get(metrics))
        .finish();
    (router.layer(DefaultBodyLimit::max(MAX_BODY)), rules)
}

/// The whole API as one router: mount it at the root, or nest it under a prefix of your own
/// (each route carries its own access rule, so a prefix changes nothing). With
/// [`AppState::with_admin_apart`] it leaves readiness, metrics and the operator routes to
/// [`admin_router`].
pub fn router(state: AppState) -> Router {
    let (routes, _) = api_routes(&state);
    finish(routes, state)
}

/// The admin listener's router: `/health`, `/ready` and `/metrics` open (it must listen on a
/// private address), the operator routes behind the `operator` scope when keys exist.
pub fn admin_router(state: AppState) -> Router {
    let (routes, _) = admin_routes(&state);
    finish(routes, state)
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

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
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
async fn get_collection(
    Admitted(s): Admitted,
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
    Admitted(s): Admitted,
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
async fn update_session(
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
async fn delete_session(
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
async fn select_session(
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
async fn authorize_session(
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
async fn sync_session(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(Empty {}): ApiJson<Empty>,
) -> ApiResult<Json<PaymentSession>> {
    Ok(Json(s.host.sync_session(&id, key.as_deref()).await?))
}

/// A payment with its captures and refunds.
#[utoipa::path(get, path = "/v1/payments/{id}", params(("id" = String, Path)),
    responses((status = 200, body = PaymentView), ErrorResponses),
    security(("api_key" = ["read"])))]
async fn get_payment(
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
async fn capture_payment(
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
async fn refund_payment(
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
async fn cancel_payment(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(Empty {}): ApiJson<Empty>,
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
async fn list_attempts(Admitted(s): Admitted) -> ApiResult<Json<AttemptList>> {
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
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")), responses((status = 200, body = Attempt), ErrorResponses),
    security(("api_key" = ["operator"])))]
async fn resolve_attempt(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    axum::Extension(admission): axum::Extension<Admission>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<Resolve>,
) -> ApiResult<Json<Attempt>> {
    let as_ = match input.outcome {
        ResolveOutcome::Succeeded => ResolveAs::Succeeded,
        ResolveOutcome::Failed => ResolveAs::Failed,
    };
    let by = actor(admission.caller.as_ref(), input.by, "resolves the attempt")?;
    Ok(Json(
        s.host
            .resolve_attempt(&id, as_, &by, &input.note, key.as_deref())
            .await?,
    ))
}

/// Who an operator action is recorded as: the key that asked (`key:<id>`), or without keys the
/// name given, marked as not proven (`unauthenticated:<name>`).
fn actor(
    caller: Option<&crate::auth::Caller>,
    given: Option<String>,
    what: &str,
) -> ApiResult<String> {
    match (caller, given) {
        (Some(caller), None) => Ok(format!("key:{}", caller.key_id)),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "by",
            "the operator is the API key that asks; leave `by` out",
        )),
        (None, Some(by)) if !by.trim().is_empty() => Ok(format!("unauthenticated:{by}")),
        (None, _) => Err(ApiError::bad_request("by", format!("say who {what}"))),
    }
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
async fn list_providers(Admitted(s): Admitted) -> Json<ProviderList> {
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
async fn receive_webhook(
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
async fn ready(Admitted(s): Admitted) -> Response {
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
async fn metrics(Admitted(s): Admitted) -> Response {
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
        metrics,
        openapi_json
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

/// This document.
#[utoipa::path(get, path = "/openapi.json",
    responses((status = 200, content_type = "application/json", body = Object, description = "The OpenAPI 3.1 document of this API")))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::{Access, ApiDoc, AppState, Arc, Method, OpenApi, Scope, admin_rules, rules};

    use crate::engine::*;

    /// The scope each operation declares in the OpenAPI document is the one its route's rule
    /// enforces, and every route is in the document: a route cannot say one thing and do
    /// another, nor exist unseen.
    #[test]
    fn the_document_declares_the_scope_each_route_enforces() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let rules = rules(&test_state());
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let declared = op["security"]
                    .as_array()
                    .and_then(|s| s.first())
                    .and_then(|req| req["api_key"][0].as_str())
                    .and_then(crate::auth::Scope::parse);
                let method: Method = method.to_uppercase().parse().unwrap();
                let rule = rules
                    .iter()
                    .find(|r| r.method == method && r.path == path)
                    .unwrap_or_else(|| panic!("{method} {path} is documented but not routed"));
                assert_eq!(declared, rule.access.scope(), "{method} {path}");
                seen += 1;
            }
        }
        assert_eq!(seen, rules.len(), "every route is documented: {rules:?}");
        assert!(seen >= 20, "{seen}");
    }

    /// The admin listener serves the operator routes under the same rules, and its probes open.
    #[test]
    fn the_admin_listener_keeps_the_operator_rules() {
        let state = test_state();
        let api = rules(&state);
        let admin = admin_rules(&state);
        for rule in &admin {
            match rule.path {
                "/health" | "/ready" | "/metrics" => assert_eq!(rule.access, Access::Open),
                _ => assert!(api.contains(rule), "{rule:?}"),
            }
        }
        // Every operator route is there, plus the three probes.
        let operator = api
            .iter()
            .filter(|r| r.access == Access::Scope(Scope::Operator) && r.path.starts_with("/v1/"))
            .count();
        assert!(operator >= 5, "{api:?}");
        assert_eq!(admin.len(), operator + 3, "{admin:?}");
    }

    fn test_state() -> AppState {
        let dir = tempfile::tempdir().unwrap().keep();
        let store = crate::store::sqlite::SqliteStore::open(dir.join("payhost.db")).unwrap();
        AppState::new(
            Arc::new(Host::new(Arc::new(store), crate::Providers::default())),
            vec![],
        )
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
