//! Who may call a route, decided by the route itself.
//!
//! Every route is registered with its [`Access`] ([`Routes::add`]), and that rule travels with
//! the route as a layer of its own: nesting the router under any prefix changes nothing. The
//! rule's layer is also the only thing that hands a handler the host ([`Admitted`]), so a route
//! registered without a rule cannot reach it: it answers 500 `route_without_access` and runs
//! nothing (auth fails closed).
//!
//! Outside the rules, one router-wide layer ([`refuse_keys_in_urls`]) refuses a URL that carries
//! something that looks like an API key, in its path or its query, before any route runs.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Caller, Scope};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key: `/health`, `/openapi.json`, the webhooks (the provider's signature is their
    /// credential), and the probes of the admin listener.
    Open,
    /// With keys configured, a key holding this scope.
    Scope(Scope),
}

impl Access {
    /// The scope the OpenAPI document declares for it.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Access::Open => None,
            Access::Scope(s) => Some(s),
        }
    }
}

/// One registered route and its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// `GET`, `POST`, `DELETE`.
    pub method: Method,
    /// axum's template, relative to where the router is mounted (`/v1/payments/{id}`).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

/// A router under construction: the only way to add a route is with its rule.
pub(super) struct Routes {
    state: AppState,
    router: axum::Router<AppState>,
    rules: Vec<RouteRule>,
}

impl Routes {
    pub(super) fn new(state: &AppState) -> Routes {
        Routes {
            state: state.clone(),
            router: axum::Router::new(),
            rules: Vec::new(),
        }
    }

    /// Adds `handler` (a one-method router: `get(h)`, `post(h)`) at `path` under `access`.
    pub(super) fn add(
        mut self,
        method: Method,
        path: &'static str,
        access: Access,
        handler: MethodRouter<AppState>,
    ) -> Routes {
        let rule = middleware::from_fn_with_state((self.state.clone(), access), admit);
        self.router = self.router.route(path, handler.route_layer(rule));
        self.rules.push(RouteRule {
            method,
            path,
            access,
        });
        self
    }

    pub(super) fn finish(self) -> (axum::Router<AppState>, Vec<RouteRule>) {
        (self.router, self.rules)
    }
}

/// What a route's rule decided about a request: who the caller is, when keys are configured.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The key that proved itself (`None`: an open route, or no keys configured).
    pub caller: Option<Caller>,
}

/// The handlers' access to the host: given only to a request its route's rule admitted.
pub(super) struct Admitted(pub(super) AppState);

impl FromRequestParts<AppState> for Admitted {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if parts.extensions.get::<Admission>().is_some() {
            Ok(Admitted(state.clone()))
        } else {
            tracing::error!(route = %parts.uri.path(), "a route without an access rule was called; refused");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "route_without_access",
                "this route has no access rule, so it is refused",
            ))
        }
    }
}

/// The client's address, when the server that runs the router says (`payhost serve` does;
/// an embedder's server does with `into_make_service_with_connect_info::<SocketAddr>()`).
pub(crate) fn peer(request_extensions: &axum::http::Extensions) -> String {
    request_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string())
}

/// A route's rule: with keys, who the caller is and whether it may; without, the checks that
/// keep a browser's page from using a keyless server (loopback `Host` names, JSON bodies).
async fn admit(
    State((s, access)): State<(AppState, Access)>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let mutating = !matches!(method, Method::GET | Method::HEAD);
    if let Access::Scope(_) = access {
        // A page in a browser can POST without a preflight only as a "simple" request, whose
        // content types never include application/json: requiring it keeps cross-site forms and
        // fetches out, with or without a body.
        if method == Method::POST && !is_json(request.headers().get(header::CONTENT_TYPE)) {
            return super::json::unsupported_media_type().into_response();
        }
        if s.keys.is_none()
            && s.loopback_hosts
            && let Some(host) = request.headers().get(header::HOST)
            && !is_loopback_host(host)
        {
            // DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name.
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_request_error",
                "host_not_allowed",
                "without API keys this server answers only requests addressed to a loopback name (localhost, 127.0.0.1, [::1])",
            )
            .into_response();
        }
    }
    let route = request.uri().path().to_owned();
    let peer = peer(request.extensions());
    // One config generation for the whole request: the keys checked here, the providers and
    // the event settings it uses, whatever a reload swaps meanwhile.
    let (pinned, keys) = s.host.pin(|| s.keys());
    let (Some(keys), Access::Scope(scope)) = (keys, access) else {
        request.extensions_mut().insert(Admission { caller: None });
        let response = crate::Host::with_pinned(pinned, next.run(request)).await;
        if mutating && access != Access::Open {
            tracing::info!(
                peer = %peer,
                key = "none",
                method = %method,
                route = %route,
                status = response.status().as_u16(),
                "request"
            );
        }
        return response;
    };
    let caller = match keys.authenticate(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        Ok(caller) => caller,
        Err(e) => {
            tracing::warn!(peer = %peer, method = %method, route = %route, code = e.code(), "authentication failed: {e}");
            return refusal(&e);
        }
    };
    if !caller.may(scope) {
        let e = AuthError::MissingScope(scope);
        tracing::warn!(peer = %peer, key = %caller.key_id, method = %method, route = %route, code = e.code(), "request refused: {e}");
        return refusal(&e);
    }
    if let Err(e) = keys.admit(&caller) {
        return refusal(&e);
    }
    let key_id = caller.key_id.clone();
    request.extensions_mut().insert(caller.clone());
    request.extensions_mut().insert(Admission {
        caller: Some(caller),
    });
    let response = crate::Host::with_pinned(
        pinned,
        crate::engine::acting_as(key_id.clone(), next.run(request)),
    )
    .await;
    if mutating {
        tracing::info!(
            peer = %peer,
            key = %key_id,
            method = %method,
            route = %route,
            status = response.status().as_u16(),
            "request"
        );
    }
    response
}

/// Whether a `Content-Type` is JSON: exactly `application/json`, parameters aside.
pub(super) fn is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether a `Host` header names this machine: `localhost` (or a name under `.localhost`),
/// `127.0.0.0/8` or `[::1]`, with any port.
fn is_loopback_host(value: &HeaderValue) -> bool {
    let Ok(host) = value.to_str() else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, port)) if port.is_empty() || port.starts_with(':') => inner,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The router-wide layer: a URL that carries something like an API key is refused before any
/// route runs (URLs end up in logs and caches), and the answer never echoes it.
pub(super) async fn refuse_keys_in_urls(request: Request, next: Next) -> Response {
    let uri = request.uri();
    if uri.query().is_some_and(crate::auth::query_holds_a_key)
        || crate::auth::path_holds_a_key(uri.path())
    {
        tracing::warn!(peer = %peer(request.extensions()), "a request with an API key in its URL was refused");
        return refusal(&AuthError::InUrl);
    }
    next.run(request).await
}

/// The answer to a refused key check, with the header RFC 6750 asks for.
fn refusal(e: &AuthError) -> Response {
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
                HeaderValue::from_static("Bearer realm=\"payhost\""),
            );
        }
        AuthError::Malformed(_) | AuthError::Unknown => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"payhost\", error=\"invalid_token\""),
            );
        }
        AuthError::MissingScope(scope) => {
            if let Ok(v) = HeaderValue::from_str(&format!(
                "Bearer realm=\"payhost\", error=\"insufficient_scope\", scope=\"{}\"",
                scope.as_str()
            )) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        AuthError::RateLimited { retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        AuthError::InUrl => {}
    }
    response
}

#[cfg(test)]
mod tests {
    use super::{HeaderValue, is_json, is_loopback_host};

    #[test]
    fn only_loopback_names_are_loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1",
            "[::2]:80",
            "[::1]x",
            "localhost:80:80",
            "",
        ] {
            assert!(!is_loopback_host(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn only_application_json_is_json() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in [
            "text/plain; x=+json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=+json",
            "application/jsonx",
            "application/problem+json",
        ] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
