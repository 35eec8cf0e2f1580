//! The PostgreSQL store, for several payhost hosts on one database. Every `write` is one
//! transaction; the same guards as SQLite hold across hosts: row versions (compare-and-set), a
//! partial unique index allowing one open attempt per session or payment, and triggers for the
//! money invariants. Migrations run under an advisory lock, so hosts starting together are safe.

#![forbid(unsafe_code)]

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use payhost_core::domain::*;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage, EventType};
use payhost_core::store::{Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};

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

/// Any number, so that every host takes the same lock for migrations.
const MIGRATION_LOCK: i64 = 0x0070_6179_686f_7374; // "payhost"

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_schema.sql")),
    (2, include_str!("../migrations/0002_webhook_events.sql")),
    (3, include_str!("../migrations/0003_key_attempts.sql")),
    (4, include_str!("../migrations/0004_call_deadlines.sql")),
    (5, include_str!("../migrations/0005_requested_by.sql")),
    (6, include_str!("../migrations/0006_host_leases.sql")),
    (7, include_str!("../migrations/0007_outbox.sql")),
    (8, include_str!("../migrations/0008_payhost_write.sql")),
    (9, include_str!("../migrations/0009_redelivered_by.sql")),
];

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
        primary: row.get(0),
        synchronous_commit: row.get(1),
        synchronous_standby_names: row.get(2),
        synchronous_standbys: row.get(3),
    })
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

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// How a server that is no longer the primary refuses a write (SQLSTATE 25006).
const READ_ONLY: &str = "read-only transaction";

/// A failure to even start a transaction: the connection or the server.
fn connection_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION => {
            StoreError::Unavailable(format!("{READ_ONLY}: {}", db.message()))
        }
        _ => unavailable(e),
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

    /// Numbers the committed events that have no number yet (see migration 7).
    async fn sequence_events(&self) -> Result<(), StoreError> {
        self.query_one("SELECT payhost_sequence_events()", &[])
            .await
            .map(drop)
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

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(unavailable)?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(unavailable)?
            .get(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::Unavailable(format!(
                "the database schema is version {current}, newer than this payhost ({newest}); upgrade payhost"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration {version} failed: {e}")))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[
                    version,
                    &payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock),
                ],
            )
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}

fn json(v: &Value) -> String {
    v.to_string()
}

fn classify(e: tokio_postgres::Error, what: &str) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let message = db.message();
        if let Some(rest) = message.strip_prefix("invariant: ") {
            return StoreError::Invariant(rest.to_owned());
        }
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            return match db.constraint() {
                Some("attempts_one_open") => StoreError::AttemptOpen(what.to_owned()),
                Some("idempotency_keys_pkey") | Some("webhook_events_pkey") => {
                    StoreError::KeyExists(what.to_owned())
                }
                _ => StoreError::Invariant(format!("{what}: {message}")),
            };
        }
        if db.code().code().starts_with("23") {
            return StoreError::Invariant(format!("{what}: {message}"));
        }
        if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION {
            return StoreError::Unavailable(format!(
                "{READ_ONLY}: the server is not the primary ({})",
                db.message()
            ));
        }
        if *db.code() == SqlState::T_R_SERIALIZATION_FAILURE
            || *db.code() == SqlState::T_R_DEADLOCK_DETECTED
        {
            return StoreError::VersionConflict(what.to_owned());
        }
    }
    unavailable(e)
}

/// Writes a JSON object field by field into a buffer (no `Value` tree in between: this runs
/// for every write).
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>, op: &str) -> JsonObject<'a> {
        out.extend_from_slice(b"{\"op\":");
        let mut o = JsonObject { out };
        o.string(op);
        o
    }
    fn string(&mut self, v: &str) {
        // A str always serializes.
        let _ = serde_json::to_writer(&mut *self.out, v);
    }
    fn key(&mut self, k: &str) {
        self.out.push(b',');
        self.string(k);
        self.out.push(b':');
    }
    fn s(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.string(v);
        self
    }
    fn os(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.s(k, v),
            None => {
                self.key(k);
                self.out.extend_from_slice(b"null");
                self
            }
        }
    }
    fn i(&mut self, k: &str, v: i64) -> &mut Self {
        self.key(k);
        self.out.extend_from_slice(v.to_string().as_bytes());
        self
    }
    fn oi(&mut self, k: &str, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.i(k, v),
            None => self.os(k, None),
        }
    }
    fn b(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        self
    }
    /// A JSON value stored as text (the columns hold JSON text).
    fn text(&mut self, k: &str, v: &Value) -> &mut Self {
        self.s(k, &json(v))
    }
    fn otext(&mut self, k: &str, v: Option<&Value>) -> &mut Self {
        self.os(k, v.map(json).as_deref())
    }
    fn strings(&mut self, k: &str, v: &[String]) -> &mut Self {
        self.key(k);
        let _ = serde_json::to_writer(&mut *self.out, v);
        self
    }
    fn end(&mut self) {
        self.out.push(b'}');
    }
}

/// Whether `payhost_write` (migration 8) applies `op`; a write with an op it does not takes
/// the statement-per-op path.
fn has_fast_op(op: &WriteOp) -> bool {
    matches!(
        op,
        WriteOp::InsertCollection(_)
            | WriteOp::InsertSession(_)
            | WriteOp::UpdateSession { .. }
            | WriteOp::InsertAttempt(_)
            | WriteOp::UpdateAttempt(_)
            | WriteOp::InsertPayment(_)
            | WriteOp::UpdatePayment { .. }
            | WriteOp::InsertCapture(..)
            | WriteOp::InsertRefund(..)
            | WriteOp::ClaimKey { .. }
            | WriteOp::CompleteKey { .. }
            | WriteOp::ReleaseKey { .. }
            | WriteOp::ForgetKey { .. }
            | WriteOp::LinkKey { .. }
            | WriteOp::InsertWebhookEvent(_)
            | WriteOp::MarkWebhookApplied { .. }
            | WriteOp::AppendEvent { .. }
    )
}

/// Appends `op` as an element of `payhost_write`'s array to `out` (see [`has_fast_op`]).
fn fast_op(op: &WriteOp, out: &mut Vec<u8>) {
    let resolution = |r: &Option<Resolution>| {
        r.as_ref()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
    };
    match op {
        WriteOp::InsertCollection(c) => JsonObject::new(out, "insert_collection")
            .s("id", &c.id.0)
            .i("amount", c.amount)
            .s("currency_code", c.currency_code.code())
            .text("metadata", &c.metadata)
            .i("created_at", c.created_at)
            .i("updated_at", c.updated_at)
            .end(),
        WriteOp::InsertSession(s) => JsonObject::new(out, "insert_session")
            .s("id", &s.id.0)
            .s("payment_collection_id", &s.payment_collection_id.0)
            .os("cart_id", s.cart_id.as_deref())
            .text("cart", &s.cart)
            .text("context", &s.context)
            .s("provider_id", &s.provider_id)
            .b("is_selected", s.is_selected)
            .b("is_initiated", s.is_initiated)
            .s("status", s.status.as_str())
            .text("data", &s.data)
            .s("idempotency_key", &s.idempotency_key)
            .i("amount", s.amount)
            .s("currency_code", s.currency_code.code())
            .oi("payment_authorized_at", s.payment_authorized_at)
            .text("metadata", &s.metadata)
            .i("created_at", s.created_at)
            .i("updated_at", s.updated_at)
            .i("version", s.version)
            .end(),
        WriteOp::UpdateSession {
            session: s,
            expected_version,
        } => JsonObject::new(out, "update_session")
            .s("id", &s.id.0)
            .os("cart_id", s.cart_id.as_deref())
            .text("cart", &s.cart)
            .text("context", &s.context)
            .b("is_selected", s.is_selected)
            .b("is_initiated", s.is_initiated)
            .s("status", s.status.as_str())
            .text("data", &s.data)
            .i("amount", s.amount)
            .oi("payment_authorized_at", s.payment_authorized_at)
            .text("metadata", &s.metadata)
            .i("updated_at", s.updated_at)
            .i("version", s.version)
            .i("expected_version", *expected_version)
            .end(),
        WriteOp::InsertAttempt(a) => JsonObject::new(out, "insert_attempt")
            .s("id", &a.id.0)
            .s("entity_id", &a.entity())
            .s("session_id", &a.session_id.0)
            .os("payment_id", a.payment_id.as_ref().map(|p| p.0.as_str()))
            .s("provider_id", &a.provider_id)
            .s("operation", a.operation.as_str())
            .i("amount", a.amount)
            .s("currency_code", a.currency_code.code())
            .s("idempotency_key", &a.idempotency_key)
            .s("state", a.state.as_str())
            .otext("outcome", a.outcome.as_ref())
            .otext("error", a.error.as_ref())
            .os("reason", a.reason.as_deref())
            .i("checks", a.checks)
            .oi("next_check_at", a.next_check_at)
            .os("resolution", resolution(&a.resolution).as_deref())
            .i("created_at", a.created_at)
            .i("updated_at", a.updated_at)
            .oi("call_ms", a.call_deadline_at.map(|d| d - a.created_at))
            .os("requested_by", a.requested_by.as_deref())
            .end(),
        WriteOp::UpdateAttempt(a) => JsonObject::new(out, "update_attempt")
            .s("id", &a.id.0)
            .s("state", a.state.as_str())
            .otext("outcome", a.outcome.as_ref())
            .otext("error", a.error.as_ref())
            .i("checks", a.checks)
            .oi("next_check_at", a.next_check_at)
            .os("resolution", resolution(&a.resolution).as_deref())
            .i("updated_at", a.updated_at)
            .end(),
        WriteOp::InsertPayment(p) => JsonObject::new(out, "insert_payment")
            .s("id", &p.id.0)
            .s("payment_session_id", &p.payment_session_id.0)
            .s("payment_collection_id", &p.payment_collection_id.0)
            .s("provider_id", &p.provider_id)
            .i("amount", p.amount)
            .s("currency_code", p.currency_code.code())
            .text("data", &p.data)
            .oi("captured_at", p.captured_at)
            .oi("canceled_at", p.canceled_at)
            .i("created_at", p.created_at)
            .i("updated_at", p.updated_at)
            .i("version", p.version)
            .end(),
        WriteOp::UpdatePayment {
            payment: p,
            expected_version,
        } => JsonObject::new(out, "update_payment")
            .s("id", &p.id.0)
            .text("data", &p.data)
            .oi("captured_at", p.captured_at)
            .oi("canceled_at", p.canceled_at)
            .i("updated_at", p.updated_at)
            .i("version", p.version)
            .i("expected_version", *expected_version)
            .end(),
        WriteOp::InsertCapture(payment, c) => JsonObject::new(out, "insert_capture")
            .s("id", &c.id.0)
            .s("payment_id", &payment.0)
            .i("amount", c.amount)
            .s("attempt_id", &c.attempt_id.0)
            .i("created_at", c.created_at)
            .end(),
        WriteOp::InsertRefund(payment, r) => JsonObject::new(out, "insert_refund")
            .s("id", &r.id.0)
            .s("payment_id", &payment.0)
            .i("amount", r.amount)
            .os("reason", r.reason.as_deref())
            .s("attempt_id", &r.attempt_id.0)
            .i("created_at", r.created_at)
            .end(),
        WriteOp::ClaimKey {
            key,
            operation,
            request_hash,
            at,
            claim_id,
        } => JsonObject::new(out, "claim_key")
            .s("key", key)
            .s("operation", operation)
            .s("request_hash", request_hash)
            .i("at", *at)
            .s("claim_id", claim_id)
            .end(),
        WriteOp::CompleteKey { key, response } => JsonObject::new(out, "complete_key")
            .s("key", key)
            .text("response", response)
            .end(),
        WriteOp::ReleaseKey { key, claim_id } => JsonObject::new(out, "release_key")
            .s("key", key)
            .s("claim_id", claim_id)
            .end(),
        WriteOp::ForgetKey { key, attempt_id } => JsonObject::new(out, "forget_key")
            .s("key", key)
            .s("attempt_id", attempt_id)
            .end(),
        WriteOp::LinkKey { key, attempt_id } => JsonObject::new(out, "link_key")
            .s("key", key)
            .s("attempt_id", attempt_id)
            .end(),
        WriteOp::InsertWebhookEvent(e) => JsonObject::new(out, "insert_webhook_event")
            .s("provider_id", &e.provider_id)
            .s("event_id", &e.event_id)
            .s("body", &e.body)
            .os("session_id", e.session_id.as_deref())
            .s("action", &e.action)
            .i("received_at", e.received_at)
            .end(),
        WriteOp::MarkWebhookApplied {
            provider_id,
            event_id,
            at,
        } => JsonObject::new(out, "mark_webhook_applied")
            .s("provider_id", provider_id)
            .s("event_id", event_id)
            .i("at", *at)
            .end(),
        WriteOp::AppendEvent {
            event: e,
            deliver_to,
        } => JsonObject::new(out, "append_event")
            .s("id", &e.id)
            .s("type", e.kind.as_str())
            .os("collection_id", e.payment_collection_id.as_deref())
            .os("session_id", e.payment_session_id.as_deref())
            .os("payment_id", e.payment_id.as_deref())
            .os("attempt_id", e.attempt_id.as_deref())
            .oi("amount", e.amount)
            .os("currency_code", e.currency_code.as_deref())
            .i("created_at", e.created_at)
            .text("data", &e.data)
            .s("order_key", &e.order_key())
            .strings("deliver_to", deliver_to)
            .end(),
        // Not reached: `has_fast_op` is checked first.
        _ => out.extend_from_slice(b"null"),
    }
}

/// The `payhost_write` array of `ops`, if every op has a place in it.
fn fast_write(ops: &[WriteOp]) -> Option<String> {
    if !ops.iter().all(has_fast_op) {
        return None;
    }
    let mut out = Vec::with_capacity(512 * ops.len());
    out.push(b'[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        fast_op(op, &mut out);
    }
    out.push(b']');
    // Only UTF-8 went in.
    String::from_utf8(out).ok()
}

/// A refusal of `payhost_write` as the store error the per-op path gives for it.
fn classify_write(
    e: tokio_postgres::Error,
    ops: &[WriteOp],
    me: Option<&payhost_core::store::HostLease>,
) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let message = db.message().to_owned();
        match db.code().code() {
            "PH001" => return StoreError::VersionConflict(message),
            "PH002" => {
                return StoreError::Fenced(format!(
                    "{message}: host {} epoch {}",
                    me.map_or("?", |l| l.host_id.as_str()),
                    me.map_or(0, |l| l.epoch)
                ));
            }
            "PH003" => return StoreError::KeyExists(message),
            _ => {}
        }
        // What the per-op path would have named: the op the refusing constraint guards.
        let what = match db.constraint() {
            Some("attempts_one_open") => ops.iter().find_map(|op| match op {
                WriteOp::InsertAttempt(a) => Some(a.entity()),
                _ => None,
            }),
            Some("webhook_events_pkey") => ops.iter().find_map(|op| match op {
                WriteOp::InsertWebhookEvent(w) => Some(format!("{}/{}", w.provider_id, w.event_id)),
                _ => None,
            }),
            _ => None,
        };
        let what = what.unwrap_or_else(|| describe(ops));
        return classify(e, &what);
    }
    classify(e, &describe(ops))
}

/// What a write is about, for an error: the id of its first op.
fn describe(ops: &[WriteOp]) -> String {
    ops.first()
        .and_then(|op| fast_write(std::slice::from_ref(op)))
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|v| {
            let first = &v[0];
            first
                .get("id")
                .or_else(|| first.get("key"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "the write".into())
}

/// Applies one op as this host (`me`: its lease; `None` before it registered, as in tools).
async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &WriteOp,
    me: Option<&payhost_core::store::HostLease>,
) -> Result<(), StoreError> {
    let (me_id, me_epoch) = (me.map(|l| l.host_id.clone()), me.map(|l| l.epoch));
    let fenced = |what: &str| {
        StoreError::Fenced(format!(
            "{what}: host {} epoch {}",
            me_id.as_deref().unwrap_or("?"),
            me_epoch.unwrap_or(0)
        ))
    };
    match op {
        WriteOp::InsertCollection(c) => {
            tx.execute(
                "INSERT INTO payment_collections (id, amount, currency_code, metadata, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6)",
                &[&c.id.0, &c.amount, &c.currency_code.code(), &json(&c.metadata), &c.created_at, &c.updated_at],
            )
            .await
            .map_err(|e| classify(e, c.id.as_str()))?;
        }
        WriteOp::InsertSession(s) => {
            tx.execute(
                "INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)",
                &[&s.id.0, &s.payment_collection_id.0, &s.cart_id, &json(&s.cart), &json(&s.context), &s.provider_id, &s.is_selected, &s.is_initiated, &s.status.as_str(), &json(&s.data), &s.idempotency_key, &s.amount, &s.currency_code.code(), &s.payment_authorized_at, &json(&s.metadata), &s.created_at, &s.updated_at, &s.version],
            )
            .await
            .map_err(|e| classify(e, s.id.as_str()))?;
        }
        WriteOp::UpdateSession {
            session: s,
            expected_version,
        } => {
            let n = tx
                .execute(
                    "UPDATE payment_sessions SET cart_id=$2, cart=$3, context=$4, is_selected=$5, is_initiated=$6, status=$7, data=$8, amount=$9, payment_authorized_at=$10, metadata=$11, updated_at=$12, version=$13 WHERE id=$1 AND version=$14",
                    &[&s.id.0, &s.cart_id, &json(&s.cart), &json(&s.context), &s.is_selected, &s.is_initiated, &s.status.as_str(), &json(&s.data), &s.amount, &s.payment_authorized_at, &json(&s.metadata), &s.updated_at, &s.version, expected_version],
                )
                .await
                .map_err(|e| classify(e, s.id.as_str()))?;
            if n == 0 {
                return Err(StoreError::VersionConflict(s.id.0.clone()));
            }
        }
        WriteOp::SelectSession(id) => {
            tx.execute(
                "UPDATE payment_sessions SET is_selected = (id = $1), version = version + 1 WHERE id = $1 OR (is_selected AND (payment_collection_id = (SELECT payment_collection_id FROM payment_sessions WHERE id = $1) OR (cart_id IS NOT NULL AND cart_id = (SELECT cart_id FROM payment_sessions WHERE id = $1))))",
                &[&id.0],
            )
            .await
            .map_err(|e| classify(e, id.as_str()))?;
        }
        WriteOp::InsertAttempt(a) => {
            // The deadline on the database's clock; owned by this host, and only while its
            // lease is current (a host that slept through it starts nothing).
            let call_ms = a.call_deadline_at.map(|d| d - a.created_at);
            let n = tx.execute(
                "INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, owner_host, owner_epoch) SELECT $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18, payhost_now_ms() + $19::BIGINT, $20, $21::TEXT, $22::BIGINT WHERE $21::TEXT IS NULL OR payhost_host_live($21, $22)",
                &[&a.id.0, &a.entity(), &a.session_id.0, &a.payment_id.as_ref().map(|p| p.0.clone()), &a.provider_id, &a.operation.as_str(), &a.amount, &a.currency_code.code(), &a.idempotency_key, &a.state.as_str(), &a.outcome.as_ref().map(json), &a.error.as_ref().map(json), &a.reason, &a.checks, &a.next_check_at, &a.resolution.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()), &a.created_at, &a.updated_at, &call_ms, &a.requested_by, &me_id, &me_epoch],
            )
            .await
            .map_err(|e| classify(e, &a.entity()))?;
            if n == 0 {
                return Err(fenced(&format!("starting attempt {}", a.id)));
            }
        }
        WriteOp::UpdateAttempt(a) => {
            // Only its owner writes an attempt: a host whose lease lapsed while another took the
            // attempt over cannot write over what that one settled.
            let n = tx.execute(
                "UPDATE attempts SET state=$2, outcome=$3, error=$4, checks=$5, next_check_at=$6, resolution=$7, updated_at=$8 WHERE id=$1 AND (owner_host IS NULL OR $9::TEXT IS NULL OR (owner_host = $9 AND owner_epoch = $10))",
                &[&a.id.0, &a.state.as_str(), &a.outcome.as_ref().map(json), &a.error.as_ref().map(json), &a.checks, &a.next_check_at, &a.resolution.as_ref().map(|r| serde_json::to_string(r).unwrap_or_default()), &a.updated_at, &me_id, &me_epoch],
            )
            .await
            .map_err(|e| classify(e, a.id.as_str()))?;
            if n == 0 {
                return Err(fenced(&format!("writing attempt {}", a.id)));
            }
        }
        WriteOp::ExtendDeadline { id, call_ms, .. } => {
            let n = tx
                .execute(
                    "UPDATE attempts SET call_deadline_at = payhost_now_ms() + $2, resends = resends + 1 WHERE id = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
                    &[&id.0, call_ms, &me_id, &me_epoch],
                )
                .await
                .map_err(|e| classify(e, id.as_str()))?;
            if n == 0 {
                return Err(fenced(&format!("sending attempt {id} again")));
            }
        }
        WriteOp::InsertPayment(p) => {
            tx.execute(
                "INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, captured_at, canceled_at, created_at, updated_at, version) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
                &[&p.id.0, &p.payment_session_id.0, &p.payment_collection_id.0, &p.provider_id, &p.amount, &p.currency_code.code(), &json(&p.data), &p.captured_at, &p.canceled_at, &p.created_at, &p.updated_at, &p.version],
            )
            .await
            .map_err(|e| classify(e, p.id.as_str()))?;
        }
        WriteOp::UpdatePayment {
            payment: p,
            expected_version,
        } => {
            let n = tx
                .execute(
                    "UPDATE payments SET data=$2, captured_at=$3, canceled_at=$4, updated_at=$5, version=$6 WHERE id=$1 AND version=$7",
                    &[&p.id.0, &json(&p.data), &p.captured_at, &p.canceled_at, &p.updated_at, &p.version, expected_version],
                )
                .await
                .map_err(|e| classify(e, p.id.as_str()))?;
            if n == 0 {
                return Err(StoreError::VersionConflict(p.id.0.clone()));
            }
        }
        WriteOp::InsertCapture(payment, c) => {
            tx.execute(
                "INSERT INTO captures (id, payment_id, amount, attempt_id, created_at) VALUES ($1,$2,$3,$4,$5)",
                &[&c.id.0, &payment.0, &c.amount, &c.attempt_id.0, &c.created_at],
            )
            .await
            .map_err(|e| classify(e, payment.as_str()))?;
        }
        WriteOp::InsertRefund(payment, r) => {
            tx.execute(
                "INSERT INTO refunds (id, payment_id, amount, reason, attempt_id, created_at) VALUES ($1,$2,$3,$4,$5,$6)",
                &[&r.id.0, &payment.0, &r.amount, &r.reason, &r.attempt_id.0, &r.created_at],
            )
            .await
            .map_err(|e| classify(e, payment.as_str()))?;
        }
        WriteOp::ClaimKey {
            key,
            operation,
            request_hash,
            at,
            claim_id,
        } => {
            // A key claimed by a host whose lease lapsed, and linked to nothing (it moved no
            // money), is taken over at once.
            let n = tx
                .execute(
                    "INSERT INTO idempotency_keys AS k (key, operation, request_hash, response, created_at, owner_host, owner_epoch, claim_id) VALUES ($1,$2,$3,NULL,$4,$5,$6,$7) ON CONFLICT (key) DO UPDATE SET operation = EXCLUDED.operation, request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at, owner_host = EXCLUDED.owner_host, owner_epoch = EXCLUDED.owner_epoch, claim_id = EXCLUDED.claim_id WHERE k.response IS NULL AND k.attempt_id IS NULL AND NOT payhost_host_live(k.owner_host, k.owner_epoch)",
                    &[key, operation, request_hash, at, &me_id, &me_epoch, claim_id],
                )
                .await
                .map_err(|e| classify(e, key))?;
            if n == 0 {
                return Err(StoreError::KeyExists(key.clone()));
            }
        }
        WriteOp::CompleteKey { key, response } => {
            tx.execute(
                "UPDATE idempotency_keys SET response = $2 WHERE key = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
                &[key, &json(response), &me_id, &me_epoch],
            )
            .await
            .map_err(|e| classify(e, key))?;
        }
        WriteOp::ReleaseKey { key, claim_id } => {
            tx.execute(
                "DELETE FROM idempotency_keys WHERE key = $1 AND response IS NULL AND attempt_id IS NULL AND claim_id IS NOT DISTINCT FROM $2",
                &[key, claim_id],
            )
            .await
            .map_err(|e| classify(e, key))?;
        }
        WriteOp::ForgetKey { key, attempt_id } => {
            let n = tx
                .execute(
                    "DELETE FROM idempotency_keys WHERE key = $1 AND attempt_id = $2",
                    &[key, attempt_id],
                )
                .await
                .map_err(|e| classify(e, key))?;
            if n == 0 {
                return Err(StoreError::KeyExists(key.clone()));
            }
        }
        WriteOp::LinkKey { key, attempt_id } => {
            let n = tx
                .execute(
                    "UPDATE idempotency_keys SET attempt_id = $2 WHERE key = $1 AND (owner_host IS NULL OR $3::TEXT IS NULL OR (owner_host = $3 AND owner_epoch = $4))",
                    &[key, attempt_id, &me_id, &me_epoch],
                )
                .await
                .map_err(|e| classify(e, key))?;
            if n == 0 {
                return Err(fenced(&format!("linking key {key}")));
            }
        }
        WriteOp::ReleasePendingKeys { older_than } => {
            // Keys of hosts whose lease lapsed (nothing moved under them); on a store without
            // leases yet, the old horizon.
            let released = match me_id {
                Some(_) => {
                    tx.execute(
                        "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND NOT payhost_host_live(owner_host, owner_epoch)",
                        &[],
                    )
                    .await
                }
                None => {
                    tx.execute(
                        "DELETE FROM idempotency_keys WHERE response IS NULL AND attempt_id IS NULL AND created_at < $1",
                        &[older_than],
                    )
                    .await
                }
            };
            released.map_err(|e| classify(e, "idempotency keys"))?;
        }
        WriteOp::InsertWebhookEvent(e) => {
            tx.execute(
                "INSERT INTO webhook_events (provider_id, event_id, body, session_id, action, received_at, applied_at) VALUES ($1,$2,$3,$4,$5,$6,NULL)",
                &[&e.provider_id, &e.event_id, &e.body, &e.session_id, &e.action, &e.received_at],
            )
            .await
            .map_err(|err| classify(err, &format!("{}/{}", e.provider_id, e.event_id)))?;
        }
        WriteOp::AppendEvent {
            event: e,
            deliver_to,
        } => {
            // One statement, unnumbered (the sequencer numbers it once committed); skipped if
            // the event is stored already (a redone write).
            tx.execute(
                "WITH ev AS (INSERT INTO events (id, type, collection_id, session_id, payment_id, attempt_id, amount, currency_code, created_at, data) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING RETURNING pos) \
                 INSERT INTO event_deliveries (id, endpoint_id, event_pos, order_key, state, next_at, created_at) \
                 SELECT $1 || ':' || ep, ep, ev.pos, $11, 'pending', payhost_now_ms(), payhost_now_ms() FROM ev, unnest($12::TEXT[]) AS ep",
                &[&e.id, &e.kind.as_str(), &e.payment_collection_id, &e.payment_session_id, &e.payment_id, &e.attempt_id, &e.amount, &e.currency_code, &e.created_at, &json(&e.data), &e.order_key(), deliver_to],
            )
            .await
            .map_err(|err| classify(err, &e.id))?;
        }
        WriteOp::DeliveryOutcomes {
            claimer,
            delivered,
            failed,
            released,
        } => {
            if !delivered.is_empty() {
                tx.execute(
                    "UPDATE event_deliveries SET state = 'delivered', delivered_at = payhost_now_ms(), attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, payhost_now_ms()), last_error = NULL, claimed_until = NULL WHERE id = ANY($1) AND state = 'pending' AND claimed_by = $2",
                    &[delivered, claimer],
                )
                .await
                .map_err(|e| classify(e, "event deliveries"))?;
            }
            for (id, retry_in_ms, error) in failed {
                tx.execute(
                    "UPDATE event_deliveries SET attempts = attempts + 1, first_tried_at = COALESCE(first_tried_at, payhost_now_ms()), next_at = payhost_now_ms() + COALESCE($3::BIGINT, 0), state = CASE WHEN $3::BIGINT IS NULL THEN 'parked' ELSE 'pending' END, last_error = $4, claimed_until = NULL WHERE id = $1 AND state = 'pending' AND claimed_by = $2",
                    &[id, claimer, retry_in_ms, error],
                )
                .await
                .map_err(|e| classify(e, id))?;
            }
            if !released.is_empty() {
                tx.execute(
                    "UPDATE event_deliveries SET claimed_until = NULL WHERE id = ANY($1) AND state = 'pending' AND claimed_by = $2",
                    &[released, claimer],
                )
                .await
                .map_err(|e| classify(e, "event deliveries"))?;
            }
        }
        WriteOp::Redeliver { id, endpoints, by } => {
            tx.execute(
                "UPDATE event_deliveries SET state = 'pending', attempts = 0, first_tried_at = NULL, next_at = payhost_now_ms(), claimed_by = NULL, claimed_until = NULL, redelivered_by = $3, redelivered_at = payhost_now_ms() WHERE state = 'parked' AND ($1::TEXT IS NULL OR id = $1) AND endpoint_id = ANY($2)",
                &[id, endpoints, by],
            )
            .await
            .map_err(|e| classify(e, id.as_deref().unwrap_or("deliveries")))?;
        }
        WriteOp::ParkUnconfigured { configured } => {
            tx.execute(
                "UPDATE event_deliveries SET state = 'parked', last_error = 'the endpoint `' || endpoint_id || '` is no longer configured', claimed_until = NULL WHERE state = 'pending' AND NOT (endpoint_id = ANY($1))",
                &[configured],
            )
            .await
            .map_err(|e| classify(e, "event deliveries"))?;
        }
        WriteOp::PruneEvents { before } => {
            // The delivered, numbered prefix older than `before`, as this statement's snapshot
            // sees it (numbers are given in order, so a later one is higher; unnumbered events
            // are never pruned, so number what committed first).
            tx.execute("SELECT payhost_sequence_events()", &[])
                .await
                .map_err(|e| classify(e, "events"))?;
            tx.execute(
                "WITH cut AS (SELECT COALESCE((SELECT MIN(seq) FROM events e WHERE e.seq IS NOT NULL AND (e.created_at >= $1 OR EXISTS (SELECT 1 FROM event_deliveries d WHERE d.event_pos = e.pos AND d.state <> 'delivered'))) - 1, (SELECT MAX(seq) FROM events), 0) AS through), \
                 gone AS (SELECT pos FROM events WHERE seq <= (SELECT through FROM cut)), \
                 gone_d AS (DELETE FROM event_deliveries WHERE event_pos IN (SELECT pos FROM gone)), \
                 gone_e AS (DELETE FROM events WHERE pos IN (SELECT pos FROM gone)) \
                 UPDATE event_meta SET v = GREATEST(v, (SELECT through FROM cut)) WHERE k = 'pruned_through'",
                &[before],
            )
            .await
            .map_err(|e| classify(e, "events"))?;
        }
        WriteOp::MarkWebhookApplied {
            provider_id,
            event_id,
            at,
        } => {
            tx.execute(
                "UPDATE webhook_events SET applied_at = $3 WHERE provider_id = $1 AND event_id = $2",
                &[provider_id, event_id, at],
            )
            .await
            .map_err(|e| classify(e, event_id))?;
        }
        WriteOp::ClaimAttempt {
            id,
            until,
            now,
            stale_before,
        } => {
            let n = match me {
                // With leases: an open attempt of mine that is due, or one whose owner's lease
                // lapsed and whose call's deadline passed (database clock): then no request of
                // the dead owner can still be on its way. It becomes mine.
                Some(_) => {
                    let row = tx
                        .query_opt(
                            "WITH old AS (SELECT owner_host, owner_epoch FROM attempts WHERE id = $1 FOR UPDATE) \
                             UPDATE attempts a SET next_check_at = $2, state = 'unknown', owner_host = $4, owner_epoch = $5 FROM old \
                             WHERE a.id = $1 AND a.state IN ('in_flight', 'unknown') AND ( \
                               (a.owner_host = $4 AND a.owner_epoch = $5 AND a.state = 'unknown' AND COALESCE(a.next_check_at, 0) <= $3) \
                               OR (NOT payhost_host_live(a.owner_host, a.owner_epoch) AND COALESCE(a.call_deadline_at, a.created_at + 600000) < payhost_now_ms())) \
                             RETURNING (old.owner_host IS DISTINCT FROM $4 OR old.owner_epoch IS DISTINCT FROM $5)",
                            &[&id.0, until, now, &me_id, &me_epoch],
                        )
                        .await
                        .map_err(|e| classify(e, id.as_str()))?;
                    if row.as_ref().is_some_and(|r| r.get::<_, bool>(0)) {
                        payhost_core::metrics::global().attempt_takeovers.inc();
                        tracing::info!(attempt = %id, "took over an attempt whose host's lease lapsed");
                    }
                    u64::from(row.is_some())
                }
                None => tx
                    .execute(
                        "UPDATE attempts SET next_check_at = $2, state = 'unknown' WHERE id = $1 AND ((state = 'unknown' AND COALESCE(next_check_at, 0) <= $3) OR (state = 'in_flight' AND updated_at < $4))",
                        &[&id.0, until, now, stale_before],
                    )
                    .await
                    .map_err(|e| classify(e, id.as_str()))?,
            };
            if n == 0 {
                return Err(StoreError::VersionConflict(id.0.clone()));
            }
        }
    }
    Ok(())
}

const EVENT_COLUMNS: &str = "e.seq, e.id, e.type, e.collection_id, e.session_id, e.payment_id, e.attempt_id, e.amount, e.currency_code, e.created_at, e.data";
const DELIVERY_COLUMNS: &str = "d.id, d.endpoint_id, e.seq, d.state, d.attempts, d.next_at, d.first_tried_at, d.last_error, d.delivered_at, d.redelivered_by, d.redelivered_at";

fn event_row(r: &Row, i: usize) -> Result<Event, StoreError> {
    let kind: String = r.get(i + 2);
    Ok(Event {
        seq: r.get(i),
        id: r.get(i + 1),
        kind: EventType::parse(&kind).ok_or_else(|| {
            StoreError::Unavailable(format!("unknown event type `{kind}` in the database"))
        })?,
        payment_collection_id: r.get(i + 3),
        payment_session_id: r.get(i + 4),
        payment_id: r.get(i + 5),
        attempt_id: r.get(i + 6),
        amount: r.get(i + 7),
        currency_code: r.get(i + 8),
        created_at: r.get(i + 9),
        data: parse_json(r.get(i + 10)),
    })
}

fn delivery_row(r: &Row) -> Result<Delivery, StoreError> {
    let state: String = r.get(3);
    Ok(Delivery {
        id: r.get(0),
        endpoint_id: r.get(1),
        event_seq: r.get(2),
        state: DeliveryState::parse(&state).ok_or_else(|| {
            StoreError::Unavailable(format!("unknown delivery state `{state}` in the database"))
        })?,
        attempts: r.get(4),
        next_at: r.get(5),
        first_tried_at: r.get(6),
        last_error: r.get(7),
        delivered_at: r.get(8),
        redelivered_by: r.get(9),
        redelivered_at: r.get(10),
    })
}

fn parse_json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn currency(code: String) -> Result<Currency, StoreError> {
    Currency::parse(&code).ok_or_else(|| {
        StoreError::Unavailable(format!("unknown currency `{code}` in the database"))
    })
}

fn session_row(r: &Row) -> Result<PaymentSession, StoreError> {
    let status: String = r.get(8);
    Ok(PaymentSession {
        id: SessionId(r.get(0)),
        payment_collection_id: CollectionId(r.get(1)),
        cart_id: r.get(2),
        cart: parse_json(r.get(3)),
        context: parse_json(r.get(4)),
        provider_id: r.get(5),
        is_selected: r.get(6),
        is_initiated: r.get(7),
        status: SessionStatus::parse(&status)
            .ok_or_else(|| StoreError::Unavailable(format!("unknown session status `{status}`")))?,
        data: parse_json(r.get(9)),
        idempotency_key: r.get(10),
        amount: r.get(11),
        currency_code: currency(r.get(12))?,
        payment_authorized_at: r.get(13),
        metadata: parse_json(r.get(14)),
        created_at: r.get(15),
        updated_at: r.get(16),
        version: r.get(17),
    })
}

/// A payment read with [`PAYMENT_COLUMNS_P`] and [`MOVEMENTS`] from column `i` on.
fn payment_with_movements(r: &Row, i: usize) -> Result<Payment, StoreError> {
    let mut p = payment_row_at(r, i)?;
    let bad =
        |what: &str| StoreError::Unavailable(format!("unreadable {what} of payment {}", p.id));
    let captures: Vec<(String, i64, String, i64)> =
        serde_json::from_str(&r.get::<_, String>(i + 12)).map_err(|_| bad("captures"))?;
    let refunds: Vec<(String, i64, Option<String>, String, i64)> =
        serde_json::from_str(&r.get::<_, String>(i + 13)).map_err(|_| bad("refunds"))?;
    p.captures = captures
        .into_iter()
        .map(|(id, amount, attempt_id, created_at)| Capture {
            id: CaptureId(id),
            amount,
            attempt_id: AttemptId(attempt_id),
            created_at,
        })
        .collect();
    p.refunds = refunds
        .into_iter()
        .map(|(id, amount, reason, attempt_id, created_at)| Refund {
            id: RefundId(id),
            amount,
            reason,
            attempt_id: AttemptId(attempt_id),
            created_at,
        })
        .collect();
    Ok(p)
}

fn payment_row_at(r: &Row, i: usize) -> Result<Payment, StoreError> {
    Ok(Payment {
        id: PaymentId(r.get(i)),
        payment_session_id: SessionId(r.get(i + 1)),
        payment_collection_id: CollectionId(r.get(i + 2)),
        provider_id: r.get(i + 3),
        amount: r.get(i + 4),
        currency_code: currency(r.get(i + 5))?,
        data: parse_json(r.get(i + 6)),
        captures: Vec::new(),
        refunds: Vec::new(),
        captured_at: r.get(i + 7),
        canceled_at: r.get(i + 8),
        created_at: r.get(i + 9),
        updated_at: r.get(i + 10),
        version: r.get(i + 11),
    })
}

fn attempt_row(r: &Row) -> Result<Attempt, StoreError> {
    let operation: String = r.get(4);
    let state: String = r.get(8);
    let resolution: Option<String> = r.get(14);
    Ok(Attempt {
        id: AttemptId(r.get(0)),
        session_id: SessionId(r.get(1)),
        payment_id: r.get::<_, Option<String>>(2).map(PaymentId),
        provider_id: r.get(3),
        operation: Operation::from_wire(&operation)
            .ok_or_else(|| StoreError::Unavailable(format!("unknown operation `{operation}`")))?,
        amount: r.get(5),
        currency_code: currency(r.get(6))?,
        idempotency_key: r.get(7),
        state: AttemptState::parse(&state)
            .ok_or_else(|| StoreError::Unavailable(format!("unknown attempt state `{state}`")))?,
        outcome: r.get::<_, Option<String>>(9).map(parse_json),
        error: r.get::<_, Option<String>>(10).map(parse_json),
        reason: r.get(11),
        checks: r.get(12),
        next_check_at: r.get(13),
        resolution: resolution.and_then(|t| serde_json::from_str(&t).ok()),
        created_at: r.get(15),
        updated_at: r.get(16),
        call_deadline_at: r.get(17),
        requested_by: r.get(18),
        owner_host: r.get(19),
        owner_epoch: r.get(20),
        resends: r.get(21),
    })
}

const SESSION_COLUMNS: &str = "id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version";
const PAYMENT_COLUMNS_P: &str = "p.id, p.payment_session_id, p.payment_collection_id, p.provider_id, p.amount, p.currency_code, p.data, p.captured_at, p.canceled_at, p.created_at, p.updated_at, p.version";
/// A payment's captures and refunds as two JSON arrays (after [`PAYMENT_COLUMNS_P`]).
const MOVEMENTS: &str = "(SELECT COALESCE(json_agg(json_build_array(c.id, c.amount, c.attempt_id, c.created_at) ORDER BY c.created_at, c.id), '[]')::TEXT FROM captures c WHERE c.payment_id = p.id), \
     (SELECT COALESCE(json_agg(json_build_array(r.id, r.amount, r.reason, r.attempt_id, r.created_at) ORDER BY r.created_at, r.id), '[]')::TEXT FROM refunds r WHERE r.payment_id = p.id)";
const ATTEMPT_COLUMNS: &str = "id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, error, reason, checks, next_check_at, resolution, created_at, updated_at, call_deadline_at, requested_by, owner_host, owner_epoch, resends";

impl PostgresStore {
    /// Payments matching `clause` with their captures and refunds, in one statement.
    async fn payments_where(&self, clause: &str, arg: &str) -> Result<Vec<Payment>, StoreError> {
        let rows = self
            .query(
                &format!("SELECT {PAYMENT_COLUMNS_P}, {MOVEMENTS} FROM payments p WHERE {clause} ORDER BY p.created_at, p.id"),
                &[&arg],
            )
            .await?;
        rows.iter().map(|r| payment_with_movements(r, 0)).collect()
    }

    async fn sessions_where(
        &self,
        clause: &str,
        arg: &str,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.query(
                &format!("SELECT {SESSION_COLUMNS} FROM payment_sessions WHERE {clause} ORDER BY created_at, id"),
                &[&arg],
            )
            .await?
            .iter()
            .map(session_row)
            .collect()
    }

    async fn attempts_where(
        &self,
        clause: &str,
        arg: Option<&str>,
    ) -> Result<Vec<Attempt>, StoreError> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE {clause} ORDER BY created_at, id"
        );
        let rows = match arg {
            Some(a) => self.query(&sql, &[&a]).await?,
            None => self.query(&sql, &[]).await?,
        };
        rows.iter().map(attempt_row).collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let me = self.lease.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut client = self.client().await?;
        // One statement when every op has a place in `payhost_write`: its own transaction, one
        // round trip.
        let fast = fast_write(&ops);
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
                        Some(_) => classify_write(e, &ops, me.as_ref()),
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
            for op in &ops {
                apply(&tx, op, me.as_ref()).await?;
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
        let registered = payhost_core::store::HostLease {
            host_id: self.host_id.clone(),
            epoch: row.get(0),
        };
        *self.lease.write().unwrap_or_else(|e| e.into_inner()) = Some(registered.clone());
        Ok(Some(registered))
    }

    fn host_lease(&self) -> Option<payhost_core::store::HostLease> {
        self.lease.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn renew_host(&self, lease: Duration) -> Result<bool, StoreError> {
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

    async fn release_host(&self) -> Result<(), StoreError> {
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

    async fn hosts(&self) -> Result<Vec<payhost_core::store::HostRecord>, StoreError> {
        let rows = self.query(
                "SELECT h.id, h.epoch, h.started_at, h.lease_expires_at, h.lease_expires_at > payhost_now_ms(), h.info, (SELECT count(*) FROM attempts a WHERE a.owner_host = h.id AND a.state IN ('in_flight','unknown','needs_operator')) FROM hosts h ORDER BY h.started_at, h.id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| payhost_core::store::HostRecord {
                host_id: r.get(0),
                epoch: r.get(1),
                started_at: r.get(2),
                lease_expires_at: r.get(3),
                live: r.get(4),
                info: r.get(5),
                open_attempts: r.get(6),
            })
            .collect())
    }

    async fn now_ms(&self) -> Result<Timestamp, StoreError> {
        Ok(self.query_one("SELECT payhost_now_ms()", &[]).await?.get(0))
    }

    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError> {
        let row = self.query_opt(
                "SELECT id, amount, currency_code, metadata, created_at, updated_at FROM payment_collections WHERE id = $1",
                &[&id.0],
            )
            .await?;
        row.map(|r| {
            Ok(PaymentCollection {
                id: CollectionId(r.get(0)),
                amount: r.get(1),
                currency_code: currency(r.get(2))?,
                metadata: parse_json(r.get(3)),
                created_at: r.get(4),
                updated_at: r.get(5),
            })
        })
        .transpose()
    }

    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError> {
        Ok(self.sessions_where("id = $1", &id.0).await?.pop())
    }

    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError> {
        self.sessions_where("cart_id = $1", cart_id).await
    }

    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        self.sessions_where("payment_collection_id = $1", &id.0)
            .await
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError> {
        Ok(self.payments_where("id = $1", &id.0).await?.pop())
    }

    async fn payment_and_session(
        &self,
        id: &PaymentId,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        let columns: String = SESSION_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let row = self
            .query_opt(
                &format!("SELECT {columns}, {PAYMENT_COLUMNS_P}, {MOVEMENTS} FROM payments p JOIN payment_sessions s ON s.id = p.payment_session_id WHERE p.id = $1"),
                &[&id.0],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((payment_with_movements(&r, 18)?, session_row(&r)?))),
        }
    }

    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError> {
        Ok(self
            .payments_where("payment_session_id = $1", &id.0)
            .await?
            .pop())
    }

    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError> {
        self.payments_where("payment_collection_id = $1", &id.0)
            .await
    }

    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError> {
        Ok(self.attempts_where("id = $1", Some(id)).await?.pop())
    }

    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError> {
        self.attempts_where("entity_id = $1", Some(entity)).await
    }

    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError> {
        self.attempts_where("state IN ('in_flight','unknown','needs_operator')", None)
            .await
    }

    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        let row = self.query_opt(
                "SELECT provider_id, event_id, body, session_id, action, received_at, applied_at FROM webhook_events WHERE provider_id = $1 AND event_id = $2",
                &[&provider_id, &event_id],
            )
            .await?;
        Ok(row.map(|r| WebhookEventRecord {
            provider_id: r.get(0),
            event_id: r.get(1),
            body: r.get(2),
            session_id: r.get(3),
            action: r.get(4),
            received_at: r.get(5),
            applied_at: r.get(6),
        }))
    }

    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        // Whatever committed is numbered first, so the page holds every committed event (a
        // number is never given below one already read: the sequencer numbers after the last).
        self.sequence_events().await?;
        let rows = self
            .query(
                &format!("SELECT {EVENT_COLUMNS}, (SELECT v FROM event_meta WHERE k = 'pruned_through') FROM events e WHERE seq > $1 AND ($2::TEXT[] IS NULL OR type = ANY($2)) ORDER BY seq LIMIT $3"),
                &[&after, &types, &(limit as i64)],
            )
            .await?;
        let pruned_through = match rows.first() {
            Some(r) => r.get(11),
            None => self
                .query_one("SELECT v FROM event_meta WHERE k = 'pruned_through'", &[])
                .await?
                .get(0),
        };
        Ok(EventPage {
            events: rows
                .iter()
                .map(|r| event_row(r, 0))
                .collect::<Result<_, _>>()?,
            pruned_through,
        })
    }

    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        claimer: &str,
        claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        // Number what committed, then claim, in one transaction (one commit).
        //
        // `open`: the endpoint's undelivered deliveries, `k` their place in their session's
        // queue. `ready`: those that could go now; a session's run is its ready ones from the
        // first of its queue on (`r = k`: none before them is parked, waiting, unnumbered or
        // held by another host). `locked`: those rows, skipping any another host is claiming
        // this instant; a skipped row would leave a hole, so only the run up to the first hole
        // is kept.
        let sql = format!(
            "WITH now AS (SELECT payhost_now_ms() AS t), \
             open AS ( \
               SELECT d.id, d.order_key, d.event_pos, d.state, d.next_at, d.claimed_until, e.seq, \
                      row_number() OVER (PARTITION BY d.order_key ORDER BY d.event_pos) AS k \
               FROM event_deliveries d JOIN events e ON e.pos = d.event_pos \
               WHERE d.endpoint_id = $4 AND d.state <> 'delivered'), \
             ready AS ( \
               SELECT o.id, o.event_pos, o.k, row_number() OVER (PARTITION BY o.order_key ORDER BY o.event_pos) AS r \
               FROM open o, now \
               WHERE o.state = 'pending' AND o.seq IS NOT NULL AND o.next_at <= now.t \
                 AND (o.claimed_until IS NULL OR o.claimed_until < now.t)), \
             wanted AS (SELECT id FROM ready WHERE r = k ORDER BY event_pos LIMIT $3), \
             locked AS (SELECT d.id FROM event_deliveries d WHERE d.id IN (SELECT id FROM wanted) FOR UPDATE SKIP LOCKED), \
             kept AS ( \
               SELECT id FROM (SELECT o.id, o.k, row_number() OVER (PARTITION BY o.order_key ORDER BY o.event_pos) AS r \
                               FROM open o JOIN locked l ON l.id = o.id) x \
               WHERE x.r = x.k), \
             claimed AS (UPDATE event_deliveries d SET claimed_by = $1, claimed_until = (SELECT t FROM now) + $2 FROM kept WHERE d.id = kept.id RETURNING d.*) \
             SELECT {DELIVERY_COLUMNS}, {EVENT_COLUMNS} FROM claimed d JOIN events e ON e.pos = d.event_pos ORDER BY d.event_pos"
        );
        let mut client = self.client().await?;
        self.counts.transaction();
        self.counts.statements(4);
        let timed = tokio::time::timeout(self.op_timeout, async {
            let tx = client.transaction().await.map_err(connection_error)?;
            tx.execute("SELECT payhost_sequence_events()", &[])
                .await
                .map_err(|e| classify(e, "events"))?;
            let rows = tx
                .query(&sql, &[&claimer, &claim_ms, &(limit as i64), &endpoint_id])
                .await
                .map_err(|e| classify(e, "event deliveries"))?;
            tx.commit().await.map_err(|e| classify(e, "commit"))?;
            Ok::<_, StoreError>(rows)
        })
        .await;
        let rows = match timed {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                if client.is_closed() {
                    drop(deadpool_postgres::Object::take(client));
                }
                return Err(e);
            }
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL did not answer within {} ms",
                    self.op_timeout.as_millis()
                )));
            }
        };
        rows.iter()
            .map(|r| Ok((delivery_row(r)?, event_row(r, 11)?)))
            .collect()
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.sequence_events().await?;
        let rows = self
            .query(
                &format!("SELECT {DELIVERY_COLUMNS} FROM event_deliveries d JOIN events e ON e.pos = d.event_pos WHERE d.state = $1 AND e.seq IS NOT NULL ORDER BY d.event_pos LIMIT $2"),
                &[&state.as_str(), &(limit as i64)],
            )
            .await?;
        rows.iter().map(delivery_row).collect()
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
        let row = self.query_opt(
                "SELECT operation, request_hash, response, attempt_id FROM idempotency_keys WHERE key = $1",
                &[&key],
            )
            .await?;
        Ok(row.map(|r| StoredKey {
            operation: r.get(0),
            request_hash: r.get(1),
            response: r.get::<_, Option<String>>(2).map(parse_json),
            attempt_id: r.get(3),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The array `payhost_write` reads is JSON, with text columns as strings of JSON text, and
    /// a write with an op it does not apply takes the other path.
    #[test]
    fn writes_are_encoded_for_payhost_write() {
        let c = PaymentCollection {
            id: CollectionId("paycol_1".into()),
            amount: 1500,
            currency_code: Currency::parse("eur").unwrap(),
            metadata: serde_json::json!({"note": "a \"quoted\" ünïcode line\n"}),
            created_at: 1,
            updated_at: 2,
        };
        let text = fast_write(&[
            WriteOp::InsertCollection(c),
            WriteOp::ReleaseKey {
                key: "k".into(),
                claim_id: "c".into(),
            },
        ])
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[0]["op"], "insert_collection");
        assert_eq!(v[0]["amount"], 1500);
        assert_eq!(v[0]["currency_code"], "eur");
        let metadata: Value = serde_json::from_str(v[0]["metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["note"], "a \"quoted\" ünïcode line\n");
        assert_eq!(v[1]["op"], "release_key");
        assert_eq!(
            describe(&[WriteOp::ReleaseKey {
                key: "k".into(),
                claim_id: "c".into()
            }]),
            "k"
        );
        assert!(fast_write(&[WriteOp::PruneEvents { before: 0 }]).is_none());
    }
}
