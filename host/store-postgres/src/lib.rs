//! The PostgreSQL store, for several payhost hosts on one database. Every `write` is one
//! transaction; the same guards as SQLite hold across hosts: row versions (compare-and-set), a
//! partial unique index allowing one open attempt per session or payment, and triggers for the
//! money invariants. Migrations run under an advisory lock, so hosts starting together are safe.
//!
//! The modules: [`write`] (a write as one `payhost_write` statement or a statement per op, and
//! the table of which op goes where), [`lease`] (hosts' leases on the database's clock),
//! [`migrate`] (the numbered `.sql` migrations), [`durability`] (what `check` says of the
//! server), [`sql`] (errors, rows), and one module per entity with each op's statement and its
//! `payhost_write` encoding side by side: [`sessions`], [`payments`], [`attempts`], [`keys`],
//! [`webhooks`], [`outbox`].

#![forbid(unsafe_code)]

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{NoTls, Row};

use payhost_core::domain::*;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage};
use payhost_core::store::{Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};

mod attempts;
mod durability;
mod holders;
mod keys;
mod lease;
mod migrate;
mod outbox;
mod payments;
mod sessions;
mod sql;
mod webhooks;
mod write;

pub use durability::{Durability, durability};

use sql::{READ_ONLY, classify, connection_error, unavailable};

/// Pool and timeouts.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// Connections kept.
    pub pool_size: usize,
    /// Waiting for a connection from the pool.
    pub acquire_timeout: Duration,
    /// Longest statement.
    pub statement_timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            pool_size: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// Statements sent and write transactions committed by this store (reads are one statement
/// each, outside any explicit transaction): what a flow costs the database.
#[derive(Debug, Default)]
struct Counts {
    statements: std::sync::atomic::AtomicU64,
    transactions: std::sync::atomic::AtomicU64,
}

impl Counts {
    fn statement(&self) {
        self.statements(1);
    }
    fn statements(&self, n: u64) {
        self.statements
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn transaction(&self) {
        self.transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    counts: Counts,
    pool: Pool,
    /// This process's host id (fixed) and its current epoch (from the last registration).
    host_id: String,
    lease: std::sync::RwLock<Option<payhost_core::store::HostLease>>,
    /// Longest wait for one statement's answer, on the client's side.
    op_timeout: Duration,
    appended: std::sync::Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`) and applies pending migrations.
    pub async fn open(url: &str, settings: &PostgresSettings) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Unavailable(format!("storage.url is not a PostgreSQL URL: {e}"))
        })?;
        // The server bounds its side too: a transaction whose client vanished behind a
        // partition (its socket still open, no RST) would otherwise sit idle in transaction
        // holding its row locks for ever, and every later write to those rows would time out.
        // payhost never idles inside a transaction (no provider call runs in one).
        config.options(format!(
            "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
            ms = settings.statement_timeout.as_millis()
        ));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(settings.acquire_timeout);
        }
        // A silent partition (no RST) must end a connection in seconds, not hang requests:
        // keepalives probe an idle one, the user timeout bounds unacknowledged writes.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(settings.acquire_timeout.max(Duration::from_secs(2)));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(settings.acquire_timeout))
            .create_timeout(Some(settings.acquire_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let store = PostgresStore {
            counts: Counts::default(),
            pool,
            host_id: format!("host_{}", uuid::Uuid::new_v4().simple()),
            lease: std::sync::RwLock::new(None),
            op_timeout: settings.statement_timeout + Duration::from_secs(1),
            appended: std::sync::Arc::new(tokio::sync::Notify::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// What one statement on `client` gave within `op_timeout`: a server that takes the bytes
    /// and never answers (a hung or blackholed connection) ends in seconds, and its connection
    /// is thrown away rather than handed to the next caller.
    fn answered<T>(
        &self,
        client: deadpool_postgres::Object,
        answered: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        let m = payhost_core::metrics::global();
        match answered {
            Ok(Ok(v)) => {
                m.store_ok();
                Ok(v)
            }
            Ok(Err(e)) => {
                if client.is_closed() {
                    drop(deadpool_postgres::Object::take(client));
                    m.store_failed("store.unavailable");
                }
                Err(unavailable(e))
            }
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                m.store_failed("store.unavailable");
                Err(StoreError::Unavailable(format!(
                    "PostgreSQL did not answer within {} ms",
                    self.op_timeout.as_millis()
                )))
            }
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        self.counts.statement();
        let answered = tokio::time::timeout(self.op_timeout, client.query(sql, params)).await;
        self.answered(client, answered)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let client = self.client().await?;
        self.counts.statement();
        let answered = tokio::time::timeout(self.op_timeout, client.query_opt(sql, params)).await;
        self.answered(client, answered)
    }

    async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        let client = self.client().await?;
        self.counts.statement();
        let answered = tokio::time::timeout(self.op_timeout, client.query_one(sql, params)).await;
        self.answered(client, answered)
    }

    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        self.counts.statement();
        let answered = tokio::time::timeout(self.op_timeout, client.execute(sql, params)).await;
        self.answered(client, answered)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(e) => {
                let e = StoreError::Unavailable(format!("PostgreSQL: {e}"));
                payhost_core::metrics::global().store_failed(e.code());
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let me = self.lease.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut client = self.client().await?;
        // One statement when every op has a place in `payhost_write`: its own transaction, one
        // round trip.
        let fast = write::encode_write(&ops);
        let timed = tokio::time::timeout(self.op_timeout, async {
            if let Some(body) = fast {
                self.counts.statement();
                self.counts.transaction();
                let (me_host, me_epoch) = (
                    me.as_ref().map(|l| l.host_id.clone()),
                    me.as_ref().map(|l| l.epoch),
                );
                return client
                    .execute(
                        "SELECT payhost_write($1::TEXT::JSONB, $2, $3)",
                        &[&body, &me_host, &me_epoch],
                    )
                    .await
                    .map(drop)
                    .map_err(|e| match e.as_db_error() {
                        Some(_) => write::classify_write(e, &ops, me.as_ref()),
                        None => connection_error(e),
                    });
            }
            self.counts.transaction();
            self.counts.statements(2 + ops.len() as u64);
            let tx = client.transaction().await.map_err(connection_error)?;
            if ops.iter().all(WriteOp::is_bookkeeping) {
                // Delivery bookkeeping: a crash that loses it re-sends events, nothing more.
                tx.batch_execute("SET LOCAL synchronous_commit = off")
                    .await
                    .map_err(connection_error)?;
            }
            let owner = write::Owner::of(me.as_ref());
            for op in &ops {
                write::apply(&tx, op, &owner).await?;
            }
            tx.commit().await.map_err(|e| classify(e, "commit"))
        })
        .await;
        let result = match timed {
            Ok(r) => r,
            Err(_) => {
                // Whether it committed is unknown: the callers' compensations and the
                // database's guards make a retry safe either way.
                payhost_core::metrics::global().store_failed("store.unavailable");
                drop(deadpool_postgres::Object::take(client));
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL did not answer the write within {} ms",
                    self.op_timeout.as_millis()
                )));
            }
        };
        let m = payhost_core::metrics::global();
        if result.is_ok()
            && ops
                .iter()
                .any(|op| matches!(op, WriteOp::AppendEvent { .. }))
        {
            self.appended.notify_waiters();
        }
        match &result {
            Ok(()) => m.store_ok(),
            Err(StoreError::Unavailable(why)) => {
                m.store_failed("store.unavailable");
                // A server that is no longer writable (a demoted primary) or a broken
                // connection: throw the connection away, so the pool reconnects through the
                // URL's host list to the new primary.
                if why.contains(READ_ONLY) || client.is_closed() {
                    tracing::warn!("dropping a PostgreSQL connection: {why}");
                    drop(deadpool_postgres::Object::take(client));
                }
            }
            Err(_) => m.store_ok(),
        }
        result
    }

    fn shared(&self) -> bool {
        true
    }

    async fn register_host(
        &self,
        lease: Duration,
    ) -> Result<Option<payhost_core::store::HostLease>, StoreError> {
        self.register(lease).await.map(Some)
    }

    fn host_lease(&self) -> Option<payhost_core::store::HostLease> {
        self.lease.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn renew_host(&self, lease: Duration) -> Result<bool, StoreError> {
        self.renew(lease).await
    }

    async fn release_host(&self) -> Result<(), StoreError> {
        self.release().await
    }

    async fn hosts(&self) -> Result<Vec<payhost_core::store::HostRecord>, StoreError> {
        self.read_hosts().await
    }

    async fn now_ms(&self) -> Result<Timestamp, StoreError> {
        self.read_now().await
    }

    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError> {
        self.read_collection(&id.0).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError> {
        Ok(self.sessions_where("id", &id.0).await?.pop())
    }

    async fn account_holder(
        &self,
        id: &AccountHolderId,
    ) -> Result<Option<AccountHolder>, StoreError> {
        Ok(self.holders_where("id", &id.0).await?.pop())
    }

    async fn account_holders_of_customer(
        &self,
        customer_id: &str,
    ) -> Result<Vec<AccountHolder>, StoreError> {
        self.holders_where("customer_id", customer_id).await
    }

    async fn payment_method(
        &self,
        id: &PaymentMethodId,
    ) -> Result<Option<PaymentMethod>, StoreError> {
        Ok(self.methods_where("id", &id.0).await?.pop())
    }

    async fn payment_methods_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<PaymentMethod>, StoreError> {
        self.methods_where("account_holder_id", &id.0).await
    }

    async fn holder_attempt(&self, id: &str) -> Result<Option<HolderAttempt>, StoreError> {
        Ok(self.holder_attempts_where("t.id = $1", &[&id]).await?.pop())
    }

    async fn holder_attempts_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<HolderAttempt>, StoreError> {
        self.holder_attempts_where("t.account_holder_id = $1", &[&id.0])
            .await
    }

    async fn open_holder_attempts(&self) -> Result<Vec<HolderAttempt>, StoreError> {
        self.holder_attempts_where("t.state IN ('in_flight','unknown','needs_operator')", &[])
            .await
    }

    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError> {
        self.sessions_where("cart_id", cart_id).await
    }

    async fn sessions_by_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.sessions_where("reference", reference).await
    }

    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.sessions_where("payment_collection_id", &id.0).await
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError> {
        Ok(self.payments_where("id", &id.0).await?.pop())
    }

    async fn payment_and_session(
        &self,
        id: &PaymentId,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        self.read_payment_and_session(&id.0).await
    }

    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError> {
        Ok(self
            .payments_where("payment_session_id", &id.0)
            .await?
            .pop())
    }

    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError> {
        self.payments_where("payment_collection_id", &id.0).await
    }

    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError> {
        Ok(self.attempts_where("a.id = $1", Some(id)).await?.pop())
    }

    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError> {
        self.attempts_where("a.entity_id = $1", Some(entity)).await
    }

    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError> {
        self.attempts_where("a.state IN ('in_flight','unknown','needs_operator')", None)
            .await
    }

    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        self.read_webhook_event(provider_id, event_id).await
    }

    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.read_events_after(after, types, limit).await
    }

    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        claimer: &str,
        claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        self.claim_due(endpoint_id, claimer, claim_ms, limit).await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.read_deliveries(state, limit).await
    }

    fn appended(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    fn statement_counts(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        Some((
            self.counts.statements.load(Relaxed),
            self.counts.transactions.load(Relaxed),
        ))
    }

    async fn key(&self, key: &str) -> Result<Option<StoredKey>, StoreError> {
        self.read_key(key).await
    }
}
