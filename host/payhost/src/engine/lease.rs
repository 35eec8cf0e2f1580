//! Host leases on a shared store: this host registers (a new epoch each time), renews on a
//! short period on the database's clock, gives the lease up on a graceful shutdown, and — when
//! it finds the lease lapsed (it was paused, partitioned, starved) — says so and registers again.
//! The store fences every write of a lapsed epoch; this module only keeps the lease and tells
//! `/ready`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Host;
use crate::store::StoreError;

/// How long a lease lasts and how often it is renewed.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// A lease lasts this long unless renewed.
    pub lease: Duration,
    /// Renewed this often.
    pub renew: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            lease: Duration::from_secs(5),
            renew: Duration::from_secs(1),
        }
    }
}

impl Host {
    /// Registers this host on a shared store and keeps its lease renewed for as long as the
    /// host lives (nothing to do on a store of one host).
    pub async fn register(&self) -> Result<(), StoreError> {
        register(&*self.store, &self.lease_ok, self.lease).await?;
        if self.store.shared() {
            let keeper = tokio::spawn(keep(self.store.clone(), self.lease_ok.clone(), self.lease));
            if let Some(old) = self
                .lease_keeper
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(keeper)
            {
                old.abort();
            }
        }
        Ok(())
    }

    /// Whether this host holds a current lease (always, on a store of one host).
    pub fn lease_ok(&self) -> bool {
        self.lease_ok.load(Ordering::SeqCst)
    }

    /// Gives the lease up (graceful shutdown): other hosts take over at once what is left.
    pub async fn release_lease(&self) {
        if let Some(keeper) = self
            .lease_keeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            keeper.abort();
        }
        if let Err(e) = self.store.release_host().await {
            tracing::warn!(code = e.code(), "giving the lease up failed: {e}");
        }
        self.lease_ok.store(false, Ordering::SeqCst);
    }
}

async fn register(
    store: &dyn crate::store::Store,
    ok: &AtomicBool,
    settings: LeaseSettings,
) -> Result<(), StoreError> {
    if let Some(lease) = store.register_host(settings.lease).await? {
        tracing::info!(
            host = %lease.host_id,
            epoch = lease.epoch,
            lease_ms = settings.lease.as_millis() as u64,
            "registered on the shared store"
        );
    }
    ok.store(true, Ordering::SeqCst);
    Ok(())
}

/// Renews the lease every `renew`; a lapsed lease is logged, counted and registered anew.
async fn keep(store: Arc<dyn crate::store::Store>, ok: Arc<AtomicBool>, settings: LeaseSettings) {
    let mut tick = tokio::time::interval(settings.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_renewed = std::time::Instant::now();
    loop {
        tick.tick().await;
        match store.renew_host(settings.lease).await {
            Ok(true) => {
                last_renewed = std::time::Instant::now();
                ok.store(true, Ordering::SeqCst);
            }
            Ok(false) => {
                ok.store(false, Ordering::SeqCst);
                crate::metrics::global().lease_lost.inc();
                tracing::error!(
                    "this host's lease lapsed (it did not renew it in time): other hosts may have taken over its open attempts and keys, and the database refuses its writes to them; registering again"
                );
                match register(&*store, &ok, settings).await {
                    Ok(()) => last_renewed = std::time::Instant::now(),
                    Err(e) => tracing::warn!(code = e.code(), "registering again failed: {e}"),
                }
            }
            Err(e) => {
                // The store is unreachable: past the lease, the host must assume it lapsed.
                if last_renewed.elapsed() >= settings.lease {
                    ok.store(false, Ordering::SeqCst);
                }
                tracing::warn!(code = e.code(), "renewing the lease failed: {e}");
            }
        }
    }
}
