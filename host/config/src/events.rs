//! `[events]` and `[[events.endpoints]]`: where events are POSTed and how they are retried.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use payhost_core::events::{EventType, valid_pattern};

use payhost_core::keys as auth;

use crate::{Check, ConfigError};

/// Whether an endpoint URL is plain `http://` to a host that is not this machine.
pub fn clear_text_on_a_network(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    url.scheme() == "http"
        && match host.parse::<std::net::IpAddr>() {
            Ok(ip) => !ip.is_loopback(),
            Err(_) => {
                let d = host.trim_end_matches('.').to_ascii_lowercase();
                d != "localhost" && !d.ends_with(".localhost")
            }
        }
}

/// `[[events.endpoints]]`: where events are POSTed.
#[derive(Clone)]
pub struct Endpoint {
    /// Its id (in delivery ids and the CLI).
    pub id: String,
    /// The URL.
    pub url: String,
    /// The signing secret.
    pub secret: String,
    /// Type patterns it receives (`*` for all).
    pub types: Vec<String>,
    /// The providers whose events it receives (`None`: every event). With a list, an event
    /// that belongs to no provider (a collection created) is not sent.
    pub providers: Option<Vec<String>>,
    /// One try's timeout.
    pub timeout: Duration,
    /// Retry for this long after the first try, then park.
    pub retry_for: Duration,
    /// The first retry's delay (doubling, with jitter).
    pub retry_base: Duration,
    /// The longest delay between tries.
    pub retry_max: Duration,
    /// Secrets a reload replaced, each with the end of its overlap: until then deliveries are
    /// signed with it too (one more `v1=`), so a receiver that still verifies with it keeps
    /// accepting while it switches. Empty as read from the file.
    pub previous_secrets: Vec<(String, std::time::SystemTime)>,
}

/// How long a secret a reload replaced still signs deliveries.
pub const SECRET_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// `url` fit for logs and `check`: a password and every query value replaced by `***` (a
/// receiver's URL often carries a token).
pub fn redact_endpoint_url(url: &str) -> String {
    let out = crate::redact_url(url);
    match out.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) => format!("{k}=***"),
                    None => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => out,
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("url", &redact_endpoint_url(&self.url))
            .field("types", &self.types)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The secrets its deliveries are signed with now: its own, then each replaced one whose
    /// overlap has not ended.
    pub fn signing_secrets(&self, now: std::time::SystemTime) -> Vec<&str> {
        std::iter::once(self.secret.as_str())
            .chain(
                self.previous_secrets
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(s, _)| s.as_str()),
            )
            .collect()
    }

    /// This endpoint as a reload gives it, `previous` being the running one: a changed secret
    /// keeps signing until `now + overlap` (with the older ones still in their overlap).
    pub fn succeeding(
        mut self,
        previous: &Endpoint,
        now: std::time::SystemTime,
        overlap: Duration,
    ) -> Endpoint {
        let mut kept: Vec<(String, std::time::SystemTime)> = previous
            .previous_secrets
            .iter()
            .filter(|(s, until)| *until > now && *s != self.secret)
            .cloned()
            .collect();
        if previous.secret != self.secret {
            kept.insert(0, (previous.secret.clone(), now + overlap));
        }
        self.previous_secrets = kept;
        self
    }

    /// Whether it receives an event of `kind` about `provider`'s session or payment (`None`:
    /// an event of no provider).
    pub fn wants(&self, kind: EventType, provider: Option<&str>) -> bool {
        let provider_wanted = match (&self.providers, provider) {
            (None, _) => true,
            (Some(list), Some(p)) => list.iter().any(|l| l == p),
            (Some(_), None) => false,
        };
        provider_wanted && self.types.iter().any(|p| kind.matches(p))
    }

    /// The delay before try `attempts + 1` (after `attempts` failed): doubling from the base up
    /// to the maximum, each drawn between half and all of it (jitter, so receivers that came back
    /// are not hit by every sender at once).
    pub fn backoff(&self, attempts: i64, jitter: f64) -> Duration {
        let base = self.retry_base.as_millis() as u64;
        let exp = base.saturating_mul(1u64 << attempts.clamp(0, 30));
        let full = exp.min(self.retry_max.as_millis() as u64).max(1);
        Duration::from_millis((full as f64 * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64)
    }
}

/// `[events]`, validated.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Where events are POSTed.
    pub endpoints: Vec<Endpoint>,
    /// Delivered events older than this are pruned.
    pub retention: Duration,
    /// How often streams and the deliverer look for events committed by other hosts.
    pub poll: Duration,
    /// How long a host holds a claimed delivery.
    pub claim: Duration,
    /// The longest long-poll of `GET /v1/events` (a longer `wait_ms` is cut to it).
    pub max_wait: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            endpoints: Vec::new(),
            retention: Duration::from_secs(7 * 24 * 3600),
            poll: Duration::from_millis(250),
            claim: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    retention_ms: Option<u64>,
    poll_ms: Option<u64>,
    claim_ms: Option<u64>,
    max_wait_ms: Option<u64>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    id: String,
    url: String,
    secret: String,
    types: Option<Vec<String>>,
    providers: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    retry_for_ms: Option<u64>,
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
}

/// Validates `[events]`: each endpoint's id, URL, secret, types, providers (among
/// `provider_ids`, the configured ones) and timings.
pub(crate) fn validate(
    raw: RawEvents,
    provider_ids: &[&str],
    check: &Check<'_>,
) -> Result<EventSettings, ConfigError> {
    use std::time::Duration;
    let defaults = EventSettings::default();
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    let mut settings = EventSettings {
        endpoints: Vec::new(),
        retention: ms(raw.retention_ms, defaults.retention),
        poll: ms(raw.poll_ms, defaults.poll),
        claim: ms(raw.claim_ms, defaults.claim),
        max_wait: ms(raw.max_wait_ms, defaults.max_wait),
    };
    if settings.max_wait > Duration::from_secs(300) {
        return Err(check.invalid(
            check.span("events.max_wait_ms"),
            "events.max_wait_ms".into(),
            "`events.max_wait_ms` must be at most 300000".into(),
        ));
    }
    if !(10..=60_000).contains(&(settings.poll.as_millis() as u64)) {
        return Err(check.invalid(
            check.span("events.poll_ms"),
            "events.poll_ms".into(),
            "`events.poll_ms` must be between 10 and 60000".into(),
        ));
    }
    for (i, spanned) in raw.endpoints.into_iter().enumerate() {
        let table = spanned.span();
        let e = spanned.into_inner();
        let at = |field: &str| format!("events.endpoints[{i}].{field}");
        let bad =
            |field: &str, message: String| check.invalid(Some(table.clone()), at(field), message);
        if !auth::valid_key_id(&e.id) {
            return Err(bad(
                "id",
                format!(
                    "endpoint id `{}` must be 1 to 64 of a-z, 0-9, `-` and `_`",
                    e.id
                ),
            ));
        }
        if settings.endpoints.iter().any(|o| o.id == e.id) {
            return Err(bad("id", format!("two endpoints have the id `{}`", e.id)));
        }
        match url::Url::parse(&e.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(bad(
                    "url",
                    format!("`{}` is not an http(s) URL", redact_endpoint_url(&e.url)),
                ));
            }
        }
        if e.secret.len() < 16 {
            return Err(bad(
                "secret",
                "the signing secret must be at least 16 characters (take it from the environment: \"${PAYHOST_EVENTS_SECRET}\")".into(),
            ));
        }
        let types = e.types.unwrap_or_else(|| vec!["*".into()]);
        if let Some(t) = types.iter().find(|t| !valid_pattern(t)) {
            return Err(bad(
                "types",
                format!(
                    "`{t}` names no event type; the types are {}, and `prefix.*` or `*`",
                    EventType::ALL
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if let Some(list) = &e.providers {
            if list.is_empty() {
                return Err(bad(
                    "providers",
                    "`providers = []` would send nothing: list provider ids, or leave it out to send every provider's events".into(),
                ));
            }
            if let Some(p) = list.iter().find(|p| !provider_ids.contains(&p.as_str())) {
                return Err(bad(
                    "providers",
                    format!(
                        "`{p}` is not a configured provider (the providers are: {})",
                        provider_ids.join(", ")
                    ),
                ));
            }
        }
        let timeout = ms(e.timeout_ms, Duration::from_secs(10));
        let retry_for = ms(e.retry_for_ms, Duration::from_secs(3 * 24 * 3600));
        let retry_base = ms(e.retry_base_ms, Duration::from_secs(5));
        let retry_max = ms(e.retry_max_ms, Duration::from_secs(3600));
        if timeout.is_zero() || timeout > Duration::from_secs(60) {
            return Err(bad(
                "timeout_ms",
                "`timeout_ms` must be between 1 and 60000".into(),
            ));
        }
        if retry_base.is_zero() || retry_max < retry_base {
            return Err(bad(
                "retry_base_ms",
                "`retry_base_ms` must be positive and at most `retry_max_ms`".into(),
            ));
        }
        if settings.claim <= timeout + Duration::from_secs(1) {
            return Err(check.invalid(
                check.span("events.claim_ms").or(Some(table.clone())),
                "events.claim_ms".into(),
                format!(
                    "`events.claim_ms` ({} ms) must be longer than endpoint `{}`'s timeout plus a second, or another host could send an event while this one still is",
                    settings.claim.as_millis(),
                    e.id
                ),
            ));
        }
        settings.endpoints.push(Endpoint {
            id: e.id,
            url: e.url,
            secret: e.secret,
            types,
            providers: e.providers,
            timeout,
            retry_for,
            retry_base,
            retry_max,
            previous_secrets: Vec::new(),
        });
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::{Duration, Endpoint, redact_endpoint_url};

    #[test]
    fn endpoint_urls_are_shown_without_their_secrets() {
        assert_eq!(
            redact_endpoint_url("https://u:pw@shop.example/hooks?token=abc&x"),
            "https://u:***@shop.example/hooks?token=***&x"
        );
        assert_eq!(
            redact_endpoint_url("http://127.0.0.1:9/h"),
            "http://127.0.0.1:9/h"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_maximum() {
        let e = Endpoint {
            id: "a".into(),
            url: "http://x".into(),
            secret: "s".into(),
            types: vec!["*".into()],
            providers: None,
            timeout: Duration::from_secs(1),
            retry_for: Duration::from_secs(60),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            previous_secrets: Vec::new(),
        };
        assert_eq!(e.backoff(0, 1.0), Duration::from_millis(100));
        assert_eq!(e.backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(e.backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(e.backoff(10, 1.0), Duration::from_millis(1000));
        assert_eq!(e.backoff(99, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn an_endpoint_with_providers_gets_only_their_events() {
        let e = Endpoint {
            id: "medusa".into(),
            url: "http://x".into(),
            secret: "s".into(),
            types: vec!["payment_session.*".into(), "payment.*".into()],
            providers: Some(vec!["sandbox".into()]),
            timeout: Duration::from_secs(1),
            retry_for: Duration::from_secs(60),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            previous_secrets: Vec::new(),
        };
        use payhost_core::events::EventType as T;
        assert!(e.wants(T::SessionAuthorized, Some("sandbox")));
        assert!(!e.wants(T::SessionAuthorized, Some("system")));
        assert!(!e.wants(T::CollectionCreated, None));
        assert!(
            !e.wants(T::AttemptUnknown, Some("sandbox")),
            "a type it did not ask for"
        );
        let all = Endpoint {
            providers: None,
            types: vec!["*".into()],
            ..e
        };
        assert!(all.wants(T::CollectionCreated, None));
        assert!(all.wants(T::SessionAuthorized, Some("system")));
    }

    #[test]
    fn a_rotated_secret_signs_beside_the_new_one_until_its_overlap_ends() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let running = Endpoint {
            id: "medusa".into(),
            url: "https://m.example/hooks".into(),
            secret: "old".into(),
            types: vec!["*".into()],
            providers: None,
            timeout: Duration::from_millis(100),
            retry_for: Duration::from_millis(100),
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(1000),
            previous_secrets: Vec::new(),
        };
        let hour = Duration::from_secs(3600);
        let rotated = Endpoint {
            secret: "new".into(),
            ..running.clone()
        }
        .succeeding(&running, now, hour);
        assert_eq!(rotated.signing_secrets(now), vec!["new", "old"]);
        assert_eq!(rotated.signing_secrets(now + hour), vec!["new"]);
        // Unchanged on a later reload: the overlap keeps its end; rotated back: no duplicate.
        let again = rotated.clone().succeeding(&rotated, now + hour / 2, hour);
        assert_eq!(again.previous_secrets, rotated.previous_secrets);
        let back = Endpoint {
            secret: "old".into(),
            ..rotated.clone()
        }
        .succeeding(&rotated, now, hour);
        assert_eq!(back.signing_secrets(now), vec!["old", "new"]);
    }
}
