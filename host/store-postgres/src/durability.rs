//! What `payhost check` learns of the server a URL reaches: whether an acknowledged write
//! survives losing it (a primary, with a synchronous standby).

use std::time::Duration;

use payhost_core::store::StoreError;
use tokio_postgres::NoTls;

use crate::sql::{get, unavailable};

/// What `payhost check` says about the server a URL reaches: whether an acknowledged write
/// survives losing it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Durability {
    /// The server reached is the primary (not in recovery).
    pub primary: bool,
    /// Its `synchronous_commit`.
    pub synchronous_commit: String,
    /// Its `synchronous_standby_names`.
    pub synchronous_standby_names: String,
    /// Standbys replicating synchronously now.
    pub synchronous_standbys: i64,
}

impl Durability {
    /// What an operator must hear, if anything.
    pub fn warning(&self) -> Option<String> {
        if !self.primary {
            return Some("the server reached is a standby, not the primary: writes will fail (add target_session_attrs=read-write and every node to the URL)".into());
        }
        if self.synchronous_standbys == 0 || self.synchronous_standby_names.trim().is_empty() {
            return Some("no synchronous standby: an acknowledged payment is lost if this server's disk is lost (see README, Running highly available)".into());
        }
        if matches!(self.synchronous_commit.as_str(), "off" | "local") {
            return Some(format!(
                "synchronous_commit = {}: an acknowledged payment may not have reached the standby",
                self.synchronous_commit
            ));
        }
        None
    }
}

/// Connects to `url` (no migrations, nothing written) and reads how durable a write there is.
pub async fn durability(url: &str, timeout: Duration) -> Result<Durability, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        StoreError::Unavailable(format!("storage.url is not a PostgreSQL URL: {e}"))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| StoreError::Unavailable("PostgreSQL: connecting timed out".into()))?
        .map_err(unavailable)?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT NOT pg_is_in_recovery(), current_setting('synchronous_commit'), current_setting('synchronous_standby_names'), (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))",
            &[],
        )
        .await
        .map_err(unavailable)?;
    Ok(Durability {
        primary: get(&row, 0)?,
        synchronous_commit: get(&row, 1)?,
        synchronous_standby_names: get(&row, 2)?,
        synchronous_standbys: get(&row, 3)?,
    })
}
