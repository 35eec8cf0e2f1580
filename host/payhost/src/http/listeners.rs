//! What `payhost serve` listens on and what each listener promises, decided once from the
//! config so that `serve` and `payhost check` say the same thing.
//!
//! Rules (every listener alike): without API keys a listener is bound only to a loopback
//! address, unless `[server] auth = "none"` says otherwise; with keys, the admin listener
//! carries operator keys, so on a non-loopback address it serves TLS (`[server.admin_tls]`, or
//! `[server.tls]`) unless `admin_plaintext = true` says the network is trusted.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::{AuthMode, Config};

/// One listener `serve` opens.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerPlan {
    /// `api` or `admin`.
    pub name: &'static str,
    /// Where it binds.
    pub address: SocketAddr,
    /// Whether the address is reachable from other machines.
    pub network: bool,
    /// Its certificate and key, when it serves HTTPS.
    #[serde(skip)]
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// What it serves.
    pub serves: &'static str,
    /// Who may call it.
    pub auth: &'static str,
}

/// Why `serve` refuses a config's listeners. [`ListenerRefusal::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenerRefusal {
    /// A keyless listener on a network address.
    #[error(
        "refusing to listen on {address} ({name}) without API keys: anyone who reaches it could move money. Add [[api_keys]] (payhost keys new --scope payments,read), or set `auth = \"none\"` in [server] to serve without keys on purpose"
    )]
    KeysRequired {
        /// `api` or `admin`.
        name: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// Operator keys would cross a network in clear text.
    #[error(
        "refusing to serve the admin listener on {address} in plain HTTP: operator keys would cross the network in clear text. Add [server.admin_tls] (or [server.tls]), or set `admin_plaintext = true` in [server] if that network is trusted"
    )]
    PlaintextOperatorKeys {
        /// The address.
        address: SocketAddr,
    },
}

impl ListenerRefusal {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ListenerRefusal::KeysRequired { .. } => "auth.required",
            ListenerRefusal::PlaintextOperatorKeys { .. } => "tls.admin_plaintext",
        }
    }
}

/// The listeners of `config` (`listen` overrides `[server] listen`), or why `serve` refuses them.
pub fn plan(
    config: &Config,
    listen: Option<SocketAddr>,
) -> Result<Vec<ListenerPlan>, ListenerRefusal> {
    let s = &config.server;
    let keys = !config.api_keys.is_empty();
    let keyless_on_purpose = s.auth == AuthMode::None;
    let files = |t: &crate::config::TlsConfig| (t.cert.clone(), t.key.clone());
    let admin_apart = s.admin_listen.is_some();
    let api_address = listen.unwrap_or(s.listen);
    let mut plans = vec![ListenerPlan {
        name: "api",
        address: api_address,
        network: !api_address.ip().is_loopback(),
        tls: s.tls.as_ref().map(files),
        scheme: if s.tls.is_some() { "https" } else { "http" },
        serves: if admin_apart {
            "the API, the webhooks, /health"
        } else {
            "the API, the webhooks, the operator routes, /health, /ready, /metrics"
        },
        auth: auth_label(keys, keyless_on_purpose, false),
    }];
    if let Some(address) = s.admin_listen {
        let tls = match (&s.admin_tls, &s.tls, s.admin_plaintext) {
            (Some(own), _, _) => Some(files(own)),
            (None, Some(shared), false) => Some(files(shared)),
            _ => None,
        };
        plans.push(ListenerPlan {
            name: "admin",
            address,
            network: !address.ip().is_loopback(),
            scheme: if tls.is_some() { "https" } else { "http" },
            tls,
            serves: "the operator routes, /health, /ready, /metrics",
            auth: auth_label(keys, keyless_on_purpose, true),
        });
    }
    for p in &plans {
        if !keys && !keyless_on_purpose && p.network {
            return Err(ListenerRefusal::KeysRequired {
                name: p.name,
                address: p.address,
            });
        }
        if p.name == "admin" && keys && p.network && p.tls.is_none() && !s.admin_plaintext {
            return Err(ListenerRefusal::PlaintextOperatorKeys { address: p.address });
        }
    }
    Ok(plans)
}

fn auth_label(keys: bool, keyless_on_purpose: bool, admin: bool) -> &'static str {
    match (keys, keyless_on_purpose, admin) {
        (true, _, false) => "API keys (webhooks by their signature; /health open)",
        (true, _, true) => "operator key for the operator routes; /health, /ready, /metrics open",
        (false, true, _) => "NONE: auth = \"none\", no key checks at all",
        (false, false, _) => "none: no keys, loopback names only",
    }
}

#[cfg(test)]
mod tests {
    use super::{Config, ListenerRefusal, plan};
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/payhost/payhost.toml"), |_| None).unwrap()
    }

    const KEY: &str = "[[api_keys]]\nid = \"ops\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"operator\"]\n";

    #[test]
    fn a_keyless_admin_listener_on_a_network_is_refused_like_the_api() {
        let c = config("[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"0.0.0.0:9090\"\n");
        assert_eq!(
            plan(&c, None).unwrap_err(),
            ListenerRefusal::KeysRequired {
                name: "admin",
                address: "0.0.0.0:9090".parse().unwrap()
            }
        );
        let c = config("[server]\nlisten = \"0.0.0.0:8080\"\n");
        assert_eq!(plan(&c, None).unwrap_err().code(), "auth.required");
        let c = config(
            "[server]\nauth = \"none\"\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"0.0.0.0:9090\"\n",
        );
        let plans = plan(&c, None).unwrap();
        assert_eq!(plans.len(), 2);
        assert!(plans.iter().all(|p| p.auth.starts_with("NONE")));
    }

    #[test]
    fn operator_keys_cross_a_network_only_over_tls_or_by_choice() {
        let c = config(&format!(
            "[server]\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"0.0.0.0:9090\"\n{KEY}"
        ));
        assert_eq!(plan(&c, None).unwrap_err().code(), "tls.admin_plaintext");
        let c = config(&format!(
            "[server]\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"0.0.0.0:9090\"\n[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n{KEY}"
        ));
        let plans = plan(&c, None).unwrap();
        assert_eq!(
            plans[1].scheme, "https",
            "the admin listener serves TLS too"
        );
        let c = config(&format!(
            "[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_plaintext = true\n[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n{KEY}"
        ));
        assert_eq!(plan(&c, None).unwrap()[1].scheme, "http");
        let c = config(&format!(
            "[server]\nadmin_listen = \"127.0.0.1:9090\"\n{KEY}"
        ));
        assert_eq!(
            plan(&c, None).unwrap()[1].scheme,
            "http",
            "loopback stays local"
        );
    }
}
