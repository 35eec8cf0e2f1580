//! `payhost reload`: a running server reads its config file again (`POST /v1/admin/reload` on
//! its admin listener, else its API listener), after the file was validated here.

use std::path::Path;
use std::process::ExitCode;

use crate::output::{load_config, runtime};

pub(crate) fn reload(path: &Path, url: Option<String>, key_env: &str, json: bool) -> ExitCode {
    // Validated here first: an invalid file is reported with its line and nothing is sent.
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => {
            eprintln!("nothing was sent: the running server keeps its config");
            return code;
        }
    };
    let plans = match payhost::http::listeners::plan(&config, None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error[{}]: {e}", e.code());
            return ExitCode::FAILURE;
        }
    };
    // The admin listener when there is one (operator routes live there), else the API's.
    let Some(target) = plans.last() else {
        eprintln!("error: the config names no listener");
        return ExitCode::FAILURE;
    };
    let mut client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    if let Some((cert, _)) = &target.tls
        && let Ok(pem) = std::fs::read(cert)
        && let Ok(cert) = reqwest::Certificate::from_pem(&pem)
    {
        client = client.add_root_certificate(cert);
    }
    let base = url.unwrap_or_else(|| {
        let mut address = target.address;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let host = if target.scheme == "https" && address.ip().is_loopback() {
            // A certificate names the host, not the loopback address.
            format!("localhost:{}", address.port())
        } else {
            address.to_string()
        };
        format!("{}://{host}", target.scheme)
    });
    let endpoint = format!("{}/v1/admin/reload", base.trim_end_matches('/'));
    let key = std::env::var(key_env).ok().filter(|k| !k.is_empty());
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let answer = runtime.block_on(async {
        let client = client.build().map_err(|e| e.to_string())?;
        let mut request = client
            .post(&endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body("{}")
            .timeout(std::time::Duration::from_secs(30));
        if let Some(key) = &key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        let body = response.text().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body))
    });
    let (status, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: cannot reach the server at {base}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let value: serde_json::Value =
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    if status.is_success() {
        if !json {
            let changed = value["changed"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "nothing that runs".into());
            say!(
                "reloaded: generation {}, digest {}, changed: {changed}",
                value["generation"],
                value["digest"].as_str().unwrap_or("?")
            );
        }
        return ExitCode::SUCCESS;
    }
    if !json {
        let code = value["error"]["code"].as_str().unwrap_or("?");
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        let hint = match status.as_u16() {
            401 | 403 => format!(" (send an operator key in ${key_env})"),
            _ => String::new(),
        };
        eprintln!("error[{code}]: {message}{hint}");
    }
    ExitCode::FAILURE
}
