//! The operator's routes: open attempts and their resolution, the providers as the host sees
//! them, the config's reload; and who an operator action is recorded as.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::access::{Admission, Admitted};
use super::error::{ApiError, ErrorResponses};
use super::json::{ApiJson, IdempotencyKey};
use super::{ApiResult, Empty};
use crate::domain::*;
use crate::engine::*;

/// Attempts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct AttemptList {
    /// Oldest first.
    attempts: Vec<Attempt>,
}

/// Attempts whose outcome is open (in flight, unknown, waiting for an operator).
#[utoipa::path(get, path = "/v1/attempts", responses((status = 200, body = AttemptList), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn list_attempts(Admitted(s): Admitted) -> ApiResult<Json<AttemptList>> {
    Ok(Json(AttemptList {
        attempts: s.host.open_attempts().await?,
    }))
}

/// How an operator settles an attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Resolve {
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
pub(super) enum ResolveOutcome {
    Succeeded,
    Failed,
}

/// Settle an open attempt by hand, recorded with who (the API key), when and why. Refused while
/// its call may still reach the processor.
#[utoipa::path(post, path = "/v1/attempts/{id}/resolve", request_body = Resolve,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")), responses((status = 200, body = Attempt), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn resolve_attempt(
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
pub(super) fn actor(
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
pub(super) struct ProviderInfo {
    /// The operator's id.
    id: String,
    /// `loaded`, `restarting` (its worker died), `unhealthy` (its worker crash-loops),
    /// `disabled` (a reload disabled or removed it: it finishes what it has open and takes
    /// nothing new) or `failed` (it did not load).
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
pub(super) struct ProviderList {
    /// In id order, then the failed ones.
    providers: Vec<ProviderInfo>,
}

/// The configured providers with their manifests and health.
#[utoipa::path(get, path = "/v1/providers", responses((status = 200, body = ProviderList), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn list_providers(Admitted(s): Admitted) -> Json<ProviderList> {
    let loaded = s.host.providers();
    let mut providers: Vec<ProviderInfo> = loaded
        .iter()
        .map(|p| ProviderInfo {
            id: p.id().to_owned(),
            health: match p.isolation().1 {
                // Disabled by a reload: it finishes what it has open, takes nothing new.
                _ if !loaded.is_open(p.id()) => "disabled",
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
    providers.extend(s.failed_providers().iter().map(|(id, e)| ProviderInfo {
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

/// Read the config file this server was started with again and apply it: API keys and event
/// endpoints change at once; a file that does not validate, or that changes a setting only a
/// restart applies, changes nothing (`422 config.invalid` naming `file:line:column`, `409
/// config.restart_needed` naming the settings).
#[utoipa::path(post, path = "/v1/admin/reload", request_body = Empty,
    responses((status = 200, body = crate::reload::ReloadReport), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn reload_config(
    Admitted(s): Admitted,
    ApiJson(Empty {}): ApiJson<Empty>,
) -> ApiResult<Json<crate::reload::ReloadReport>> {
    let Some(reloader) = s.reloader.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request",
            "config.not_reloadable",
            "this server was not started from a config file (an embedder's router): nothing to reload",
        ));
    };
    match reloader.reload().await {
        Ok(report) => Ok(Json(report)),
        Err(e @ crate::reload::ReloadError::Invalid(_)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            e.code(),
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request",
            e.code(),
            e.to_string(),
        )),
    }
}
