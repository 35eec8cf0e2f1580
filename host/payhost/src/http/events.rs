//! `GET /v1/events` (read scope) and the operator's delivery routes.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::access::Admitted;
use super::error::{ApiError, ErrorResponses};
use crate::events::{Delivery, Event, EventType};

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    /// Events after this sequence number (the last `seq` you handled; 0: from the first).
    /// Inside the pruned prefix: 410. Absent: from the oldest event kept.
    after: Option<i64>,
    /// Comma-separated types (`payment_session.authorized,payment.*`); all when absent.
    types: Option<String>,
    /// At most this many (1 to 1000, default 100).
    limit: Option<usize>,
    /// With no event after the cursor yet, wait up to this long for one (cut to the server's
    /// `[events] max_wait_ms`, 30000 by default). An empty page is always possible.
    wait_ms: Option<u64>,
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct EventList {
    /// In commit order.
    data: Vec<Event>,
    /// The cursor for the next page: the last event's `seq`, or `after` when empty.
    next_after: i64,
    /// Whether more events follow now.
    has_more: bool,
}

/// Events after a cursor, in commit order: every committed change, each with the entity as it
/// stands after it. Resume with `after=<next_after>`. `attempt.*` events only for keys with the
/// operator scope.
#[utoipa::path(get, path = "/v1/events", params(EventQuery),
    responses((status = 200, body = EventList), (status = 410, description = "The cursor is inside the pruned prefix: resynchronise, then read after `pruned_through`", body = super::error::ErrorBody), ErrorResponses),
    security(("api_key" = ["read"])))]
pub(super) async fn list_events(
    Admitted(s): Admitted,
    axum::Extension(admission): axum::Extension<super::Admission>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<EventList>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    if q.after.is_some_and(|a| a < 0) {
        return Err(ApiError::bad_request("after", "`after` must be 0 or more"));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            "`limit` must be between 1 and 1000",
        ));
    }
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(s.host.event_settings().max_wait);
    let types = match q.types.as_deref() {
        None | Some("") => None,
        Some(list) => {
            let mut names = Vec::new();
            for pattern in list.split(',').map(str::trim) {
                let matched: Vec<&str> = EventType::ALL
                    .iter()
                    .filter(|t| t.matches(pattern))
                    .map(|t| t.as_str())
                    .collect();
                if matched.is_empty() {
                    return Err(ApiError::bad_request(
                        "types",
                        format!("`{pattern}` names no event type"),
                    ));
                }
                names.extend(matched.into_iter().map(str::to_owned));
            }
            Some(names)
        }
    };
    // Attempts are the operator's (`/v1/attempts` needs that scope): a key without it does not
    // see their events either.
    let operator = admission
        .caller
        .is_none_or(|c| c.may(crate::auth::Scope::Operator));
    let types = if operator {
        types
    } else {
        let all: Vec<String> = match types {
            Some(t) => t,
            None => EventType::ALL
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
        };
        Some(
            all.into_iter()
                .filter(|t| !t.starts_with("attempt."))
                .collect(),
        )
    };
    // One more than asked, to say whether more follow.
    let after = match q.after {
        Some(a) => a,
        None => s.host.oldest_cursor().await?.seq(),
    };
    let mut data = s
        .host
        .wait_for_events(after, types, limit + 1, wait)
        .await?;
    let has_more = data.len() > limit;
    data.truncate(limit);
    let next_after = data.last().map_or(after, |e| e.seq);
    Ok(Json(EventList {
        data,
        next_after,
        has_more,
    }))
}

/// Parked deliveries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct DeliveryList {
    /// Oldest event first.
    deliveries: Vec<Delivery>,
}

/// Deliveries parked after their retry period (later events of their sessions wait behind them).
#[utoipa::path(get, path = "/v1/event-deliveries/parked",
    responses((status = 200, body = DeliveryList), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn parked_deliveries(Admitted(s): Admitted) -> ApiResult<Json<DeliveryList>> {
    Ok(Json(DeliveryList {
        deliveries: s.host.parked_deliveries(1000).await?,
    }))
}

/// How many deliveries were sent again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(super) struct Redelivered {
    /// Deliveries pending again.
    redelivered: usize,
}

/// Who sends parked deliveries again.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Redeliver {
    /// Who asks. Only without API keys (then recorded as `unauthenticated:<by>`): with keys,
    /// the key that asks is recorded.
    #[serde(default)]
    by: Option<String>,
}

/// Send a parked delivery again (`all`: every parked one), with a fresh retry period; who asked
/// is recorded on each.
#[utoipa::path(post, path = "/v1/event-deliveries/{id}/redeliver", params(("id" = String, Path, description = "A delivery id, or `all`"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first result")), request_body = Redeliver,
    responses((status = 200, body = Redelivered), ErrorResponses),
    security(("api_key" = ["operator"])))]
pub(super) async fn redeliver(
    Admitted(s): Admitted,
    Path(id): Path<String>,
    axum::Extension(admission): axum::Extension<super::Admission>,
    super::json::IdempotencyKey(key): super::json::IdempotencyKey,
    super::json::ApiJson(input): super::json::ApiJson<Redeliver>,
) -> ApiResult<Json<Redelivered>> {
    let by = super::operations::actor(
        admission.caller.as_ref(),
        input.by,
        "sends the deliveries again",
    )?;
    let which = (id != "all").then_some(id.as_str());
    Ok(Json(Redelivered {
        redelivered: s.host.redeliver(which, &by, key.as_deref()).await?,
    }))
}

/// Gives each event type its own schema in the document: the envelope (`EventEnvelope`) with
/// that `type` and its `data` as the entity it carries; `Event` is one of them, told apart by
/// `type`.
pub(super) struct EventSchemas;

impl utoipa::Modify for EventSchemas {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use crate::events::Subject;
        use serde_json::json;
        let components = openapi.components.get_or_insert_with(Default::default);
        let Some(envelope) = components.schemas.remove("Event") else {
            return;
        };
        components.schemas.insert("EventEnvelope".into(), envelope);
        let reference = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
        let mut one_of = Vec::new();
        let mut mapping = serde_json::Map::new();
        for kind in EventType::ALL {
            let data = match kind.subject() {
                Subject::Collection => reference("PaymentCollection"),
                Subject::Session => reference("PaymentSession"),
                Subject::Payment => reference("Payment"),
                Subject::AccountHolder => reference("AccountHolder"),
                Subject::PaymentMethod => reference("PaymentMethod"),
                Subject::Attempt => json!({"allOf": [reference("Attempt"), {
                    "type": "object",
                    "properties": {"resolved_by": {
                        "type": "string",
                        "description": "Who settled it: `reconciler`, `late answer`, or the operator (`key:<id>`, a name)"
                    }}
                }]}),
                Subject::Webhook => json!({
                    "type": "object",
                    "required": ["provider_id", "event_id", "action"],
                    "properties": {
                        "provider_id": {"type": "string"},
                        "event_id": {"type": "string", "description": "The provider's event id"},
                        "action": {"type": "string", "description": "What the provider reported: authorized, failed, canceled, requires_more, pending, …"},
                        "payment_session_id": {"type": ["string", "null"]}
                    }
                }),
            };
            let name = format!("Event.{}", kind.as_str());
            let schema = json!({
                "description": kind.description(),
                "allOf": [reference("EventEnvelope"), {
                    "type": "object",
                    "required": ["type", "data"],
                    "properties": {
                        "type": {"type": "string", "enum": [kind.as_str()]},
                        "data": data,
                    }
                }]
            });
            match serde_json::from_value(schema) {
                Ok(schema) => {
                    components.schemas.insert(name.clone(), schema);
                }
                Err(e) => {
                    tracing::error!("the schema of event type {kind} does not build: {e}");
                    continue;
                }
            }
            one_of.push(reference(&name));
            mapping.insert(
                kind.as_str().into(),
                json!(format!("#/components/schemas/{name}")),
            );
        }
        let event = json!({
            "description": "One committed change; `type` says which, and `data` is its entity as it stands after it.",
            "oneOf": one_of,
            "discriminator": {"propertyName": "type", "mapping": mapping},
        });
        if let Ok(event) = serde_json::from_value(event) {
            components.schemas.insert("Event".into(), event);
        }
    }
}
