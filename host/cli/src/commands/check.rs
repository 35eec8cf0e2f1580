//! `payhost check`: what each enabled provider is and where its code comes from, what each
//! listener exposes, and how durable the store is; exits 0 only if everything loads and
//! `serve` would start.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use payhost::{Config, LoadReport, Loader};
use payhost_provider_api::Manifest;

use crate::output::{EXIT_CONFIG, EXIT_PROVIDERS, init_logging, load_config};

pub(crate) fn check(path: &Path, json: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The report is the output; logs carry only what the providers themselves warn about.
    init_logging("warn,payhost::plugins=off", config.log.format);
    let report = Loader::new(&config).load_all(&config);
    let disabled: Vec<&str> = config
        .providers
        .iter()
        .filter(|p| !p.enabled)
        .map(|p| p.id.as_str())
        .collect();
    let durability = postgres_durability(&config);
    if json {
        let mut out = check_json(&config, &report, &disabled);
        out["storage_durability"] = match &durability {
            None => serde_json::Value::Null,
            Some(Ok(d)) => serde_json::json!({"report": d, "warning": d.warning()}),
            Some(Err(e)) => serde_json::json!({"error": config.redact(&e.to_string())}),
        };
        say!("{out}");
    } else {
        print_check(&config, &report, &disabled);
        match &durability {
            None => {}
            Some(Ok(d)) => {
                say!(
                    "storage {} ; synchronous_commit {} ; synchronous standbys {} ({})",
                    if d.primary { "primary" } else { "STANDBY" },
                    d.synchronous_commit,
                    d.synchronous_standbys,
                    if d.synchronous_standby_names.is_empty() {
                        "none named"
                    } else {
                        &d.synchronous_standby_names
                    }
                );
                if let Some(w) = d.warning() {
                    say!("WARN    {w}");
                }
            }
            Some(Err(e)) => say!(
                "WARN    cannot reach the store: {}",
                config.redact(&e.to_string())
            ),
        }
    }
    if payhost::http::listeners::plan(&config, None).is_err() {
        ExitCode::from(EXIT_CONFIG)
    } else if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROVIDERS)
    }
}

/// For a PostgreSQL store: how durable an acknowledged write is on the server the URL reaches.
fn postgres_durability(
    config: &Config,
) -> Option<Result<payhost::store::postgres::Durability, payhost::store::StoreError>> {
    let payhost::config::StorageUrl::Postgres(url) = &config.storage.url else {
        return None;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    Some(runtime.block_on(payhost::store::postgres::durability(
        url,
        Duration::from_millis(config.storage.connect_timeout_ms),
    )))
}

/// The optional abilities a manifest declares, by name (account holders included: a plugin
/// built before provider-api 1.4 shows none).
pub(crate) fn capability_names(m: &Manifest) -> Vec<&'static str> {
    let c = &m.capabilities;
    [
        (c.partial_capture, "partial_capture"),
        (c.multiple_captures, "multiple_captures"),
        (c.partial_refund, "partial_refund"),
        (c.update_amount, "update_amount"),
        (c.async_authorization, "async_authorization"),
        (c.webhooks, "webhooks"),
        (m.account_holders, "account_holders"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

/// What `serve` would run with: listeners, auth, limits and timeouts (never a secret).
fn server_summary(config: &Config) -> serde_json::Value {
    let s = &config.server;
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
    let keys: Vec<_> = config
        .api_keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id,
                "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "rate_per_second": k.rate.map(|r| r.rate),
                "burst": k.rate.map(|r| r.burst),
            })
        })
        .collect();
    let auth = if !config.api_keys.is_empty() {
        "keys"
    } else if s.auth == payhost::config::AuthMode::None {
        "none"
    } else {
        "none: no keys, loopback only"
    };
    let (listeners, refused) = match payhost::http::listeners::plan(config, None) {
        Ok(plans) => (plans, None),
        Err(e) => (
            Vec::new(),
            Some(serde_json::json!({"code": e.code(), "message": e.to_string()})),
        ),
    };
    let warnings: Vec<String> = config
        .events
        .endpoints
        .iter()
        .filter(|p| payhost::events::clear_text_on_a_network(&p.url))
        .map(|p| {
            format!(
                "event endpoint `{}` gets events in clear text ({}): they are signed, but anyone on the way reads them; use https",
                p.id,
                payhost::events::redact_endpoint_url(&p.url)
            )
        })
        .collect();
    serde_json::json!({
        "listen": s.listen.to_string(),
        "admin_listen": s.admin_listen.map(|a| a.to_string()),
        "tls": s.tls.is_some(),
        "warnings": warnings,
        "listeners": listeners,
        "refused": refused,
        "auth": auth,
        "api_keys": keys,
        "header_timeout_ms": s.header_timeout_ms,
        "body_timeout_ms": s.body_timeout_ms,
        "idle_timeout_ms": s.idle_timeout_ms,
        "shutdown_grace_ms": s.shutdown_grace_ms,
        "max_connections": s.connection_limit(nofile),
        "max_connections_from": if s.max_connections.is_some() { "config" } else { "open-file limit" },
        "open_files": nofile,
        "storage": config.redact(&config.storage.url.redacted()),
        "events": events_summary(&config.events),
    })
}

fn events_summary(e: &payhost::events::EventSettings) -> serde_json::Value {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    serde_json::json!({
        "retention_ms": ms(e.retention),
        "poll_ms": ms(e.poll),
        "claim_ms": ms(e.claim),
        "max_wait_ms": ms(e.max_wait),
        "endpoints": e.endpoints.iter().map(|p| serde_json::json!({
            "id": p.id,
            "url": payhost::events::redact_endpoint_url(&p.url),
            "types": p.types,
            "providers": p.providers,
            "timeout_ms": ms(p.timeout),
            "retry_base_ms": ms(p.retry_base),
            "retry_max_ms": ms(p.retry_max),
            "retry_for_ms": ms(p.retry_for),
        })).collect::<Vec<_>>(),
    })
}

fn print_check(config: &Config, report: &LoadReport, disabled: &[&str]) {
    say!(
        "config {} (sha256 {})",
        config.path.display(),
        config.digest()
    );
    let s = server_summary(config);
    say!(
        "server  listen {}{}{}",
        s["listen"].as_str().unwrap_or(""),
        s["admin_listen"]
            .as_str()
            .map(|a| format!(", admin {a}"))
            .unwrap_or_default(),
        if s["tls"] == true { ", TLS" } else { "" }
    );
    say!("        auth {}", s["auth"].as_str().unwrap_or(""));
    for l in s["listeners"].as_array().into_iter().flatten() {
        say!(
            "        {} listener {}://{} ({}): {}; who: {}",
            l["name"].as_str().unwrap_or(""),
            l["scheme"].as_str().unwrap_or(""),
            l["address"].as_str().unwrap_or(""),
            if l["network"] == true {
                "reachable from the network"
            } else {
                "loopback only"
            },
            l["serves"].as_str().unwrap_or(""),
            l["auth"].as_str().unwrap_or("")
        );
    }
    if let Some(message) = s["refused"]["message"].as_str() {
        say!(
            "ERROR   serve refuses these listeners [{}]: {message}",
            s["refused"]["code"].as_str().unwrap_or("")
        );
    }
    for k in s["api_keys"].as_array().into_iter().flatten() {
        say!(
            "        key {} scopes {}{}",
            k["id"].as_str().unwrap_or(""),
            k["scopes"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            k["rate_per_second"]
                .as_f64()
                .map(|r| format!(", {r}/s burst {}", k["burst"]))
                .unwrap_or_default()
        );
    }
    say!(
        "        timeouts header {} ms, body {} ms, idle {} ms, shutdown grace {} ms",
        s["header_timeout_ms"],
        s["body_timeout_ms"],
        s["idle_timeout_ms"],
        s["shutdown_grace_ms"]
    );
    say!(
        "        max {} connections (from the {}; open-file limit {})",
        s["max_connections"],
        s["max_connections_from"].as_str().unwrap_or(""),
        s["open_files"]
    );
    say!("storage {}", s["storage"].as_str().unwrap_or(""));
    let e = &s["events"];
    say!(
        "events  kept {} ms after delivery, long-poll up to {} ms",
        e["retention_ms"],
        e["max_wait_ms"]
    );
    for w in s["warnings"].as_array().into_iter().flatten() {
        say!("WARN    {}", w.as_str().unwrap_or(""));
    }
    for p in e["endpoints"].as_array().into_iter().flatten() {
        say!(
            "        endpoint {} {} types {}{}, timeout {} ms, retried {}..{} ms apart for {} ms, then parked",
            p["id"].as_str().unwrap_or(""),
            p["url"].as_str().unwrap_or(""),
            list(&p["types"]),
            match p["providers"].as_array() {
                Some(_) => format!(" of providers {}", list(&p["providers"])),
                None => String::new(),
            },
            p["timeout_ms"],
            p["retry_base_ms"],
            p["retry_max_ms"],
            p["retry_for_ms"]
        );
    }
    for p in report.providers.iter() {
        let m = p.manifest();
        say!("ok    {}", p.id());
        say!("      provider      {} ({}) {}", m.name, m.id, m.version);
        say!(
            "      api           provider-api {}, protocol {}",
            m.api_version,
            p.protocol()
        );
        say!("      capabilities  {}", capability_names(m).join(", "));
        say!(
            "      limits        timeout {} ms, max {} concurrent calls",
            p.timeout().as_millis(),
            p.max_concurrency()
        );
        say!("      isolation     {}", p.isolation().0);
        say!("      library       {}", p.library().path.display());
        say!("      sha256        {}", p.library().sha256);
    }
    for f in &report.failures {
        say!("FAIL  {}", f.id);
        for line in f.error.to_string().lines() {
            say!("      {line}");
        }
        say!("      code          {}", f.error.code());
    }
    for id in disabled {
        say!("off   {id} (enabled = false)");
    }
    say!(
        "{} loaded, {} failed, {} disabled",
        report.providers.len(),
        report.failures.len(),
        disabled.len()
    );
}

fn check_json(config: &Config, report: &LoadReport, disabled: &[&str]) -> serde_json::Value {
    let loaded: Vec<_> = report
        .providers
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id(),
                "manifest": p.manifest(),
                "protocol": p.protocol(),
                "library": p.library().path,
                "sha256": p.library().sha256,
                "timeout_ms": p.timeout().as_millis() as u64,
                "max_concurrency": p.max_concurrency(),
                "isolation": p.isolation().0,
            })
        })
        .collect();
    let failed: Vec<_> = report
        .failures
        .iter()
        .map(|f| serde_json::json!({"id": f.id, "code": f.error.code(), "message": f.error.to_string()}))
        .collect();
    serde_json::json!({
        "config": config.path,
        "config_sha256": config.digest(),
        "server": server_summary(config),
        "loaded": loaded,
        "failed": failed,
        "disabled": disabled,
    })
}

/// A JSON array of strings as `a,b,c`.
fn list(v: &serde_json::Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}
