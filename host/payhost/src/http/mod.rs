//! The HTTP API: REST JSON over the whole lifecycle, `POST /hooks/{provider_id}`, and the
//! operations endpoints. Handlers only translate between HTTP and the engine; they change no
//! status themselves. [`router`] is an axum `Router` an embedder can nest in its own server.

pub mod access;
mod collections;
pub mod edge;
pub mod error;
mod events;
mod guard;
mod holders;
pub mod json;
pub mod listeners;
mod openapi;
mod operations;
mod payments;
mod probes;
mod sessions;
mod webhooks;

pub use openapi::ApiDoc;
pub use payments::PaymentView;
pub use webhooks::WEBHOOK_FAILURE_RATE;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Scope;
use crate::engine::Host;
use access::{Access, Routes};
pub use access::{Admission, RouteRule};
use error::ApiError;

/// Largest API request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest webhook body.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    host: Arc<Host>,
    /// Providers that failed to load (id, why); a reload that loads one takes it off.
    failed_providers: Arc<std::sync::RwLock<Vec<(String, String)>>>,
    body_timeout: Duration,
    /// The API keys now, when keys are configured: a reload swaps them whole, and each request
    /// reads them once.
    keys: Option<Arc<std::sync::RwLock<Arc<crate::auth::Keys>>>>,
    /// What reloads this server's config, when it was started from a file.
    reloader: Option<Arc<crate::reload::Reloader>>,
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
            failed_providers: Arc::new(std::sync::RwLock::new(failed_providers)),
            body_timeout: DEFAULT_BODY_TIMEOUT,
            keys: None,
            reloader: None,
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
        self.keys = Some(Arc::new(std::sync::RwLock::new(Arc::new(keys))));
        self
    }

    /// The keys every request is checked against now, if keys are configured.
    pub fn keys(&self) -> Option<Arc<crate::auth::Keys>> {
        self.keys
            .as_ref()
            .map(|k| k.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Replaces the keys (a reload): the next request is checked against `specs`. Refused
    /// (`false`) when the state has no keys: turning key checks on or off changes which
    /// listeners are safe, which needs a restart.
    pub fn swap_keys(&self, specs: Vec<crate::auth::KeySpec>) -> bool {
        let Some(keys) = &self.keys else {
            return false;
        };
        let mut keys = keys.write().unwrap_or_else(|e| e.into_inner());
        *keys = Arc::new(keys.reloaded(specs));
        true
    }

    /// Reloads `config`'s file on `POST /v1/admin/reload` (and reports its digest in `/ready`):
    /// the keys of this state (set them first) and the host's event settings follow it.
    pub fn reloading(mut self, config: crate::config::Config) -> AppState {
        self.reloader = Some(Arc::new(crate::reload::Reloader::new(
            config,
            self.host.clone(),
            self.keys.clone(),
            self.failed_providers.clone(),
        )));
        self
    }

    /// The providers that failed to load (id, why).
    pub fn failed_providers(&self) -> Vec<(String, String)> {
        self.failed_providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What reloads this server's config, when it has a file.
    pub fn reloader(&self) -> Option<Arc<crate::reload::Reloader>> {
        self.reloader.clone()
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
        .add(
            Method::GET,
            "/v1/attempts",
            operator,
            get(operations::list_attempts),
        )
        .add(
            Method::POST,
            "/v1/attempts/{id}/resolve",
            operator,
            post(operations::resolve_attempt),
        )
        .add(
            Method::GET,
            "/v1/providers",
            operator,
            get(operations::list_providers),
        )
        .add(
            Method::POST,
            "/v1/admin/reload",
            operator,
            post(operations::reload_config),
        )
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
            post(collections::create_collection),
        )
        .add(
            Method::GET,
            "/v1/payment-collections/{id}",
            read,
            get(collections::get_collection),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions",
            pay,
            post(sessions::create_session),
        )
        .add(
            Method::GET,
            "/v1/payment-sessions",
            read,
            get(sessions::list_sessions),
        )
        .add(
            Method::GET,
            "/v1/payment-sessions/{id}",
            read,
            get(sessions::get_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}",
            pay,
            post(sessions::update_session),
        )
        .add(
            Method::DELETE,
            "/v1/payment-sessions/{id}",
            pay,
            delete(sessions::delete_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/select",
            pay,
            post(sessions::select_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/authorize",
            pay,
            post(sessions::authorize_session),
        )
        .add(
            Method::POST,
            "/v1/payment-sessions/{id}/sync",
            pay,
            post(sessions::sync_session),
        )
        .add(
            Method::GET,
            "/v1/payments/{id}",
            read,
            get(payments::get_payment),
        )
        .add(
            Method::POST,
            "/v1/payments/{id}/capture",
            pay,
            post(payments::capture_payment),
        )
        .add(
            Method::POST,
            "/v1/payments/{id}/refund",
            pay,
            post(payments::refund_payment),
        )
        .add(
            Method::POST,
            "/v1/payments/{id}/cancel",
            pay,
            post(payments::cancel_payment),
        )
        .add(
            Method::POST,
            "/v1/account-holders",
            pay,
            post(holders::create_account_holder),
        )
        .add(
            Method::GET,
            "/v1/account-holders",
            read,
            get(holders::list_account_holders),
        )
        .add(
            Method::GET,
            "/v1/account-holders/{id}",
            read,
            get(holders::get_account_holder),
        )
        .add(
            Method::POST,
            "/v1/account-holders/{id}",
            pay,
            post(holders::update_account_holder),
        )
        .add(
            Method::DELETE,
            "/v1/account-holders/{id}",
            pay,
            delete(holders::delete_account_holder),
        )
        .add(
            Method::GET,
            "/v1/account-holders/{id}/payment-methods",
            read,
            get(holders::list_payment_methods),
        )
        .add(
            Method::POST,
            "/v1/account-holders/{id}/payment-methods",
            pay,
            post(holders::save_payment_method),
        )
        .add(
            Method::DELETE,
            "/v1/account-holders/{id}/payment-methods/{method_id}",
            pay,
            delete(holders::delete_payment_method),
        )
        .add(Method::GET, "/v1/events", read, get(events::list_events))
        .add(Method::GET, "/health", Access::Open, get(probes::health))
        .add(
            Method::GET,
            "/openapi.json",
            Access::Open,
            get(openapi::openapi_json),
        );
    if !state.admin_apart {
        let operator = Access::Scope(Scope::Operator);
        api = operator_routes(api)
            .add(Method::GET, "/ready", operator, get(probes::ready))
            .add(Method::GET, "/metrics", operator, get(probes::metrics));
    }
    let (api, mut rules) = api.finish();
    let (hooks, hook_rules) = Routes::new(state)
        .add(
            Method::POST,
            "/hooks/{provider_id}",
            Access::Open,
            post(webhooks::receive_webhook),
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
        .add(Method::GET, "/health", Access::Open, get(probes::health))
        .add(Method::GET, "/ready", Access::Open, get(probes::ready))
        .add(Method::GET, "/metrics", Access::Open, get(probes::metrics))
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

#[cfg(test)]
mod tests {
    use super::{Access, ApiDoc, AppState, Arc, Method, Scope, admin_rules, rules};
    use utoipa::OpenApi;

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
