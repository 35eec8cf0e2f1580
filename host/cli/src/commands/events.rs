//! `payhost events failed|redeliver`: the outbox's parked deliveries.

use std::process::ExitCode;

use crate::args::EventsAction;
use crate::output::{init_logging, load_config, runtime};

pub(crate) fn events(action: EventsAction) -> ExitCode {
    let path = match &action {
        EventsAction::Failed { config, .. } | EventsAction::Redeliver { config, .. } => config,
    };
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
        let store = match payhost::engine::open_store_for_outbox(&config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // No providers: deliveries never call one.
        let host = payhost::Host::new(store, payhost::Providers::default())
            .with_events(config.events.clone());
        let result = match action {
            EventsAction::Failed { json, .. } => {
                host.parked_deliveries(10_000).await.map(|list| {
                    if json {
                        say!(
                            "{}",
                            serde_json::to_string_pretty(&list).unwrap_or_default()
                        );
                    } else {
                        print_deliveries(&list);
                    }
                })
            }
            EventsAction::Redeliver { id, by, .. } => {
                let by = by
                    .or_else(|| std::env::var("USER").ok())
                    .unwrap_or_else(|| "operator".into());
                host.redeliver(id.as_deref(), &by, None).await.map(|n| {
                    say!(
                        "{n} deliver{} pending again; the running host sends {} within [events] poll_ms",
                        if n == 1 { "y is" } else { "ies are" },
                        if n == 1 { "it" } else { "them" }
                    );
                })
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error[{}]: {e}", e.code());
                ExitCode::FAILURE
            }
        }
    })
}

fn print_deliveries(list: &[payhost::events::Delivery]) {
    if list.is_empty() {
        say!("no parked deliveries");
        return;
    }
    for d in list {
        say!(
            "{}  endpoint {}  event {}  tries {}{}",
            d.id,
            d.endpoint_id,
            d.event_seq,
            d.attempts,
            d.last_error
                .as_ref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default(),
        );
    }
    say!(
        "{} parked; `payhost events redeliver <id>` or `--all` sends them again",
        list.len()
    );
}
