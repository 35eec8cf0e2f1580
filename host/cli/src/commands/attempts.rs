//! `payhost attempts [resolve]`: the attempts whose outcome is open, and an operator's
//! settlement of one.

use std::path::Path;
use std::process::ExitCode;

use crate::args::{AttemptsAction, Resolved};
use crate::output::{init_logging, load_config, runtime};

pub(crate) fn attempts(path: &Path, json: bool, action: Option<AttemptsAction>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging("warn", config.log.format);
    let runtime = match runtime(false) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let store = match payhost::engine::open_store(&config).await {
            Ok(s) => s,
            // A running host has the embedded database: it can still be read beside it.
            Err(payhost::engine::OpenError::Store(payhost::store::StoreError::Locked(why)))
                if action.is_none() =>
            {
                match payhost::engine::open_store_read_only(&config) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: {why} ({e})");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Err(payhost::engine::OpenError::Store(payhost::store::StoreError::Locked(why))) => {
                eprintln!(
                    "error[store.locked]: {why}. Resolve through that host instead: POST /v1/attempts/<id>/resolve (it knows which calls are still running)"
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // No providers: listing and resolving never call one.
        let providers = payhost::Providers::default();
        let settings = payhost::engine::reconcile_settings(&config, &providers);
        let host = payhost::Host::new(store, providers).with_reconcile(settings);
        match action {
            None => match host.open_attempts().await {
                Ok(list) if json => {
                    say!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(list) => {
                    print_attempts(&list);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error[{}]: {e}", e.code());
                    ExitCode::FAILURE
                }
            },
            Some(AttemptsAction::Resolve {
                id,
                outcome,
                note,
                by,
            }) => {
                let by = by
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_else(|| "operator".into());
                let as_ = match outcome {
                    Resolved::Succeeded => payhost::engine::ResolveAs::Succeeded,
                    Resolved::Failed => payhost::engine::ResolveAs::Failed,
                };
                match host.resolve_attempt(&id, as_, &by, &note, None).await {
                    Ok(a) if json => {
                        say!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(a) => {
                        say!(
                            "{} {} {} {} resolved as {} by {}",
                            a.id,
                            a.operation,
                            a.amount,
                            a.currency_code,
                            a.state.as_str(),
                            by
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error[{}]: {e}", e.code());
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

fn print_attempts(list: &[payhost::domain::Attempt]) {
    if list.is_empty() {
        say!("no open attempts");
        return;
    }
    for a in list {
        say!(
            "{}  {:<14} {:<9} {} {}  session {}{}  provider {}  checks {}{}",
            a.id,
            a.state.as_str(),
            a.operation.as_str(),
            a.amount,
            a.currency_code,
            a.session_id,
            a.payment_id
                .as_ref()
                .map(|p| format!("  payment {p}"))
                .unwrap_or_default(),
            a.provider_id,
            a.checks,
            a.error
                .as_ref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default(),
        );
    }
    say!("{} open", list.len());
}
