//! The embedded SQLite store: WAL, `synchronous = FULL` (a write that returned survives power
//! loss), and group commit — one writer thread takes every write waiting in its queue, applies
//! them in one transaction (each in its own savepoint only if one of them fails), and commits
//! them with one fsync, so concurrent operations share the disk's flush instead of queueing
//! behind one another. Readers use their own connections (WAL lets them read while the writer
//! writes).
//!
//! The modules: [`writer`] (the writer thread and the table of which op goes where),
//! [`checkpoint`] (copying the WAL back off the writer's path), [`lock`] (one host per file,
//! private files), [`migrate`] (the numbered `.sql` migrations), [`sql`] (connections, errors,
//! rows), and one module per entity with its statements: [`sessions`], [`payments`],
//! [`attempts`], [`keys`], [`webhooks`], [`outbox`].

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::oneshot;

use payhost_core::domain::*;
use payhost_core::events::{Delivery, DeliveryState, Event, EventPage};
use payhost_core::store::{Store, StoreError, StoredKey, WebhookEventRecord, WriteOp};

mod attempts;
mod checkpoint;
mod holders;
mod keys;
mod lock;
mod migrate;
mod outbox;
mod payments;
mod sessions;
mod sql;
mod webhooks;
mod writer;

#[cfg(test)]
mod tests;

use sql::{connect, unavailable};
use writer::{Job, start_writer};

/// Reader connections kept open.
const READERS: usize = 4;

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    /// `None` when opened read-only beside the host that owns the file.
    writer: Option<std::sync::mpsc::Sender<Job>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Held while the store is open: one host per file.
    _lock: Option<std::fs::File>,
    /// Opened beside the host that has the file: only outbox administration is written.
    beside: bool,
    appended: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating) the database at `path`, takes it for this process (else
    /// [`StoreError::Locked`], naming the process that has it) and applies pending migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_owned();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            // Folders it makes are this user's alone; an existing one is the operator's choice.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
        }
        lock::private_files(&path)?;
        let lock = lock::take_lock(&path)?;
        let mut conn = connect(&path)?;
        migrate::migrate(&mut conn)?;
        let writer = start_writer(conn, &path)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(connect(&path)?);
        }
        Ok(SqliteStore {
            path,
            writer: Some(writer),
            readers: Arc::new(Mutex::new(readers)),
            _lock: Some(lock),
            beside: false,
            appended: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Opens an existing database to read it beside the host that has it (`payhost attempts`
    /// while `payhost serve` runs). Every write is refused.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_owned();
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let readers = vec![connect(&path)?];
        Ok(SqliteStore {
            path,
            writer: None,
            readers: Arc::new(Mutex::new(readers)),
            _lock: None,
            beside: false,
            appended: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Opens an existing database beside the host that has it, for the operator's changes to the
    /// outbox only ([`WriteOp::is_outbox_admin`]: `payhost events redeliver` while `payhost
    /// serve` runs). They touch no money and no attempt, and SQLite's own locking orders them
    /// with the host's writes; every other write is refused.
    pub fn open_beside(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let mut store = SqliteStore::open_read_only(path)?;
        let conn = connect(&store.path)?;
        store.writer = Some(start_writer(conn, &store.path)?);
        store.beside = true;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => connect(&path)?,
            };
            let result = f(&conn).map_err(unavailable);
            let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let writer = match &self.writer {
            Some(w) if !self.beside || ops.iter().all(WriteOp::is_outbox_admin) => w,
            _ => {
                return Err(StoreError::Locked(format!(
                    "{} is open beside the payhost process that has it; make changes through that host",
                    self.path.display()
                )));
            }
        };
        let appends = ops
            .iter()
            .any(|op| matches!(op, WriteOp::AppendEvent { .. }));
        let (tx, rx) = oneshot::channel();
        writer
            .send((ops, tx))
            .map_err(|_| StoreError::Unavailable("the SQLite writer thread stopped".into()))?;
        let result = rx
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite writer thread stopped".into()))?;
        if appends && result.is_ok() {
            self.appended.notify_waiters();
        }
        result
    }

    async fn collection(&self, id: &CollectionId) -> Result<Option<PaymentCollection>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| sessions::collection(c, &id)).await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<PaymentSession>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| sessions::session(c, &id)).await
    }

    async fn sessions_by_cart(&self, cart_id: &str) -> Result<Vec<PaymentSession>, StoreError> {
        let cart_id = cart_id.to_owned();
        self.read(move |c| sessions::of_cart(c, &cart_id)).await
    }

    async fn sessions_by_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        let reference = reference.to_owned();
        self.read(move |c| sessions::of_reference(c, &reference))
            .await
    }

    async fn sessions_by_collection(
        &self,
        id: &CollectionId,
    ) -> Result<Vec<PaymentSession>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| sessions::of_collection(c, &id)).await
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| payments::payment(c, &id)).await
    }

    async fn payment_and_session(
        &self,
        id: &PaymentId,
    ) -> Result<Option<(Payment, PaymentSession)>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| {
            let Some(p) = payments::payment(c, &id)? else {
                return Ok(None);
            };
            let s = sessions::session(c, &p.payment_session_id.0)?
                .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            Ok(Some((p, s)))
        })
        .await
    }

    async fn payment_of_session(&self, id: &SessionId) -> Result<Option<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| payments::of_session(c, &id)).await
    }

    async fn payments_by_collection(&self, id: &CollectionId) -> Result<Vec<Payment>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| payments::of_collection(c, &id)).await
    }

    async fn attempt(&self, id: &str) -> Result<Option<Attempt>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| attempts::attempt(c, &id)).await
    }

    async fn attempts_of(&self, entity: &str) -> Result<Vec<Attempt>, StoreError> {
        let entity = entity.to_owned();
        self.read(move |c| attempts::of_entity(c, &entity)).await
    }

    async fn open_attempts(&self) -> Result<Vec<Attempt>, StoreError> {
        self.read(attempts::open).await
    }

    async fn account_holder(
        &self,
        id: &AccountHolderId,
    ) -> Result<Option<AccountHolder>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| holders::holder(c, &id)).await
    }

    async fn account_holders_of_customer(
        &self,
        customer_id: &str,
    ) -> Result<Vec<AccountHolder>, StoreError> {
        let customer_id = customer_id.to_owned();
        self.read(move |c| holders::of_customer(c, &customer_id))
            .await
    }

    async fn payment_method(
        &self,
        id: &PaymentMethodId,
    ) -> Result<Option<PaymentMethod>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| holders::method(c, &id)).await
    }

    async fn payment_methods_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<PaymentMethod>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| holders::methods_of(c, &id)).await
    }

    async fn holder_attempt(&self, id: &str) -> Result<Option<HolderAttempt>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| holders::attempt(c, &id)).await
    }

    async fn holder_attempts_of(
        &self,
        id: &AccountHolderId,
    ) -> Result<Vec<HolderAttempt>, StoreError> {
        let id = id.0.clone();
        self.read(move |c| holders::attempts_of(c, &id)).await
    }

    async fn open_holder_attempts(&self) -> Result<Vec<HolderAttempt>, StoreError> {
        self.read(holders::open_attempts).await
    }

    async fn webhook_event(
        &self,
        provider_id: &str,
        event_id: &str,
    ) -> Result<Option<WebhookEventRecord>, StoreError> {
        let (provider_id, event_id) = (provider_id.to_owned(), event_id.to_owned());
        self.read(move |c| webhooks::event(c, &provider_id, &event_id))
            .await
    }

    async fn events_after(
        &self,
        after: i64,
        types: Option<Vec<String>>,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let types = types.map(|t| serde_json::to_string(&t).unwrap_or_default());
        self.read(move |c| outbox::events_after(c, after, types.as_deref(), limit))
            .await
    }

    async fn claim_deliveries(
        &self,
        endpoint_id: &str,
        _claimer: &str,
        _claim_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Event)>, StoreError> {
        let endpoint_id = endpoint_id.to_owned();
        self.read(move |c| outbox::due(c, &endpoint_id, limit))
            .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.read(move |c| outbox::in_state(c, state, limit)).await
    }

    fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    async fn key(&self, key: &str) -> Result<Option<StoredKey>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| keys::key(c, &key)).await
    }
}
