//! `[log]`: the filter and the format of the host's log.

use serde::Deserialize;

use crate::{Check, ConfigError};

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `payhost=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validates `[log]`.
pub(crate) fn validate(log: LogConfig, check: &Check<'_>) -> Result<LogConfig, ConfigError> {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log.level) {
        let span = check.span("log.level");
        return Err(check.invalid(
            span,
            "log.level".into(),
            format!("`log.level` is not a valid filter: {e}"),
        ));
    }

    Ok(log)
}
