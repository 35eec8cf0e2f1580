//! Host leases, on the database's clock: who owns what is decided here, never by a host's
//! clock. A host registers (a new epoch), renews while it lives, and releases on a clean stop;
//! what it owned is another host's to take once its lease lapsed.

use std::time::Duration;

use payhost_core::store::{HostLease, HostRecord, StoreError};

use crate::PostgresStore;
use crate::sql::get;

impl PostgresStore {
    /// Registers this host with a new epoch and a lease of `lease` from now.
    pub(crate) async fn register(&self, lease: Duration) -> Result<HostLease, StoreError> {
        let info = format!(
            "pid {} on {}, payhost {}",
            std::process::id(),
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim(),
            env!("CARGO_PKG_VERSION")
        );
        let row = self.query_one(
                "INSERT INTO hosts (id, epoch, started_at, lease_expires_at, info) VALUES ($1, nextval('host_epochs'), payhost_now_ms(), payhost_now_ms() + $2, $3) ON CONFLICT (id) DO UPDATE SET epoch = nextval('host_epochs'), lease_expires_at = payhost_now_ms() + $2 RETURNING epoch",
                &[&self.host_id, &(lease.as_millis() as i64), &info],
            )
            .await?;
        let registered = HostLease {
            host_id: self.host_id.clone(),
            epoch: get(&row, 0)?,
        };
        *self.lease.write().unwrap_or_else(|e| e.into_inner()) = Some(registered.clone());
        Ok(registered)
    }

    /// Extends this host's lease by `lease` from now, if it has not lapsed.
    pub(crate) async fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        let Some(me) = self.lease.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(false);
        };
        let n = self.execute(
                "UPDATE hosts SET lease_expires_at = payhost_now_ms() + $3 WHERE id = $1 AND epoch = $2 AND lease_expires_at > payhost_now_ms()",
                &[&me.host_id, &me.epoch, &(lease.as_millis() as i64)],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends this host's lease now, so another host may take over its attempts at once.
    pub(crate) async fn release(&self) -> Result<(), StoreError> {
        let Some(me) = self.lease.write().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        self.execute(
            "UPDATE hosts SET lease_expires_at = payhost_now_ms() WHERE id = $1 AND epoch = $2",
            &[&me.host_id, &me.epoch],
        )
        .await?;
        Ok(())
    }

    /// Every host registered, with whether its lease is live and the attempts it holds open.
    pub(crate) async fn read_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let rows = self.query(
                "SELECT h.id, h.epoch, h.started_at, h.lease_expires_at, h.lease_expires_at > payhost_now_ms(), h.info, (SELECT count(*) FROM attempts a WHERE a.owner_host = h.id AND a.state IN ('in_flight','unknown','needs_operator')) FROM hosts h ORDER BY h.started_at, h.id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(HostRecord {
                    host_id: get(r, 0)?,
                    epoch: get(r, 1)?,
                    started_at: get(r, 2)?,
                    lease_expires_at: get(r, 3)?,
                    live: get(r, 4)?,
                    info: get(r, 5)?,
                    open_attempts: get(r, 6)?,
                })
            })
            .collect()
    }

    /// The database's clock.
    pub(crate) async fn read_now(&self) -> Result<payhost_core::domain::Timestamp, StoreError> {
        get(&self.query_one("SELECT payhost_now_ms()", &[]).await?, 0)
    }
}
