//! `/health`, `/ready` and `/metrics`.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::Admitted;
use crate::domain::*;

/// Liveness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct Health {
    /// `ok`.
    status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub(super) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct Readiness {
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
    /// The SHA-256 of the config file running (when the server was started from one).
    config_digest: Option<String>,
    /// Reloads applied since start (0: the file it started with).
    config_generation: Option<u64>,
}

/// The store is reachable, every enabled provider loaded, and start-up reconciliation is done
/// (`503` otherwise).
#[utoipa::path(get, path = "/ready", responses((status = 200, body = Readiness), (status = 503, body = Readiness)),
    security(("api_key" = ["operator"])))]
pub(super) async fn ready(Admitted(s): Admitted) -> Response {
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
    let running = s.reloader.as_ref().map(|r| r.current());
    let failed = s.failed_providers();
    let r = Readiness {
        config_digest: running.as_ref().map(|(d, _)| d.clone()),
        config_generation: running.map(|(_, g)| g),
        ready: store && failed.is_empty() && recovered && lease && unhealthy.is_empty(),
        providers_unhealthy: unhealthy,
        store,
        recovered,
        lease,
        providers_loaded: s.host.providers().len(),
        providers_failed: failed.iter().map(|(id, _)| id.clone()).collect(),
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
pub(super) async fn metrics(Admitted(s): Admitted) -> Response {
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
