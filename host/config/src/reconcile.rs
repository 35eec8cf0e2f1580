//! `[reconcile]`: how open outcomes are settled.

use serde::Deserialize;

use crate::{Check, ConfigError};

/// `[reconcile]`: how open outcomes are settled.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Delay before the first check of an unknown outcome.
    #[serde(default = "default_first_check")]
    pub first_check_ms: u64,
    /// Inconclusive checks (backing off exponentially from 1 s) before an operator must decide.
    #[serde(default = "default_max_checks")]
    pub max_checks: u32,
    /// How long after a call's deadline it may still reach the processor. Until then a
    /// processor's "no such call" proves nothing, and the attempt stays unknown.
    #[serde(default = "default_landing_margin")]
    pub landing_margin_ms: u64,
    /// How often the background reconciler looks for due attempts.
    #[serde(default = "default_reconcile_interval")]
    pub interval_ms: u64,
}

fn default_reconcile_interval() -> u64 {
    1_000
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            first_check_ms: default_first_check(),
            max_checks: default_max_checks(),
            landing_margin_ms: default_landing_margin(),
            interval_ms: default_reconcile_interval(),
        }
    }
}

fn default_first_check() -> u64 {
    500
}

fn default_max_checks() -> u32 {
    12
}

fn default_landing_margin() -> u64 {
    10_000
}

/// Validates `[reconcile]`.
pub(crate) fn validate(
    reconcile: ReconcileConfig,
    check: &Check<'_>,
) -> Result<ReconcileConfig, ConfigError> {
    for (key, value, max) in [
        (
            "reconcile.first_check_ms",
            reconcile.first_check_ms,
            3_600_000,
        ),
        ("reconcile.max_checks", u64::from(reconcile.max_checks), 100),
        (
            "reconcile.landing_margin_ms",
            reconcile.landing_margin_ms,
            3_600_000,
        ),
        (
            "reconcile.interval_ms",
            reconcile.interval_ms.max(1),
            600_000,
        ),
    ] {
        if value > max || (key == "reconcile.max_checks" && value == 0) {
            return Err(check.invalid(
                check.span(key),
                key.into(),
                format!(
                    "`{key}` must be between {} and {max}",
                    u64::from(key == "reconcile.max_checks")
                ),
            ));
        }
    }
    Ok(reconcile)
}
