//! What the sandbox "did", as an append-only JSON-lines file: one line per effect, keyed by
//! idempotency key. Several processes may share one file (several hosts on one database): every
//! operation takes an exclusive file lock, reads the lines others appended, acts, appends, unlocks.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use payhost_provider_api::{Outcome, ProviderError, ProviderResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One effect at the simulated processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The idempotency key of the call (or the event id of a settlement).
    pub key: String,
    /// `initiate`, `authorize`, `capture`, `refund`, `cancel`, `update`, `delete`, `settle`, or
    /// an account holder operation (`create_account_holder`, `save_payment_method`, …).
    pub op: String,
    /// The payhost session id (the payhost account holder id for account holder operations).
    pub session_id: String,
    /// For account holder operations after the create: the sandbox's id of the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// For `delete_payment_method`, and a charge of a saved method: the sandbox's id of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Amount in minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency_code: String,
    /// The true answer, replayed for a repeated key.
    pub response: ProviderResponse,
    /// When (host clock, Unix ms).
    pub at_unix_ms: i64,
}

/// Where a payment stands at the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// `initiated`, `requires_more`, `pending`, `authorized`, `declined`, `canceled`, `deleted`.
    pub status: &'static str,
    /// Authorized amount.
    pub authorized: i64,
    /// Captured so far.
    pub captured: i64,
    /// Refunded so far.
    pub refunded: i64,
    /// Currency of the payment.
    pub currency_code: String,
}

/// A customer at the sandbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HolderState {
    /// Deleted (its methods are detached).
    pub deleted: bool,
    /// Attached methods, oldest first: the sandbox's id and what it keeps of the card.
    pub methods: Vec<(String, Value)>,
}

#[derive(Default)]
struct State {
    offset: u64,
    by_key: HashMap<String, Entry>,
    sessions: HashMap<String, SessionState>,
    holders: HashMap<String, HolderState>,
}

impl State {
    fn apply(&mut self, e: &Entry) {
        if e.response.outcome == Outcome::Processed {
            let made = e.response.reference.clone().unwrap_or_default();
            let holder = e.holder.as_deref().unwrap_or_default();
            match e.op.as_str() {
                "create_account_holder" => {
                    self.holders.insert(made, HolderState::default());
                }
                "delete_account_holder" => {
                    if let Some(h) = self.holders.get_mut(holder) {
                        h.deleted = true;
                        h.methods.clear();
                    }
                }
                "save_payment_method" => {
                    if let Some(h) = self.holders.get_mut(holder) {
                        let kept = e.response.data.clone().unwrap_or(Value::Null);
                        h.methods.push((made, kept));
                    }
                }
                "delete_payment_method" => {
                    if let Some(h) = self.holders.get_mut(holder) {
                        h.methods.retain(|(id, _)| Some(id) != e.method.as_ref());
                    }
                }
                _ => {}
            }
        }
        if e.op.ends_with("account_holder") || e.op.ends_with("payment_method") {
            self.by_key.insert(e.key.clone(), e.clone());
            return;
        }
        let s = self.sessions.entry(e.session_id.clone()).or_default();
        if s.currency_code.is_empty() {
            s.currency_code = e.currency_code.clone();
        }
        match (e.op.as_str(), &e.response.outcome) {
            ("initiate", Outcome::Processed) if s.status.is_empty() => s.status = "initiated",
            ("authorize" | "settle", Outcome::Processed) => {
                s.status = "authorized";
                s.authorized = e.amount;
            }
            ("authorize", Outcome::RequiresMore { .. }) => s.status = "requires_more",
            ("authorize", Outcome::Pending) => s.status = "pending",
            ("authorize" | "settle", Outcome::Declined { .. }) => s.status = "declined",
            ("capture", Outcome::Processed) => s.captured += e.amount,
            ("refund", Outcome::Processed) => s.refunded += e.amount,
            ("cancel", Outcome::Processed) => s.status = "canceled",
            ("delete", Outcome::Processed) => s.status = "deleted",
            _ => {}
        }
        self.by_key.insert(e.key.clone(), e.clone());
    }
}

/// The ledger file and what was read of it.
pub struct Ledger {
    path: PathBuf,
    fsync: bool,
    inner: Mutex<(File, State)>,
}

/// A locked view of the ledger: read everything, then maybe append.
pub struct Locked<'a> {
    file: &'a mut File,
    state: &'a mut State,
    fsync: bool,
}

impl Ledger {
    /// Opens (creating) `<dir>/<name>.ledger.jsonl`.
    pub fn open(dir: &Path, name: &str, fsync: bool) -> Result<Ledger, ProviderError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            ProviderError::invalid_options(format!(
                "cannot create state_dir {}: {e}",
                dir.display()
            ))
            .param("state_dir")
        })?;
        let path = dir.join(format!("{name}.ledger.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                ProviderError::invalid_options(format!("cannot open {}: {e}", path.display()))
                    .param("state_dir")
            })?;
        let ledger = Ledger {
            path,
            fsync,
            inner: Mutex::new((file, State::default())),
        };
        ledger.with(|_| Ok(()))?;
        Ok(ledger)
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` holding the process lock and the file lock, after catching up with the file.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&mut Locked<'_>) -> Result<R, ProviderError>,
    ) -> Result<R, ProviderError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (file, state) = &mut *guard;
        file.lock().map_err(io_error)?;
        let result = catch_up(file, state).and_then(|()| {
            f(&mut Locked {
                file,
                state,
                fsync: self.fsync,
            })
        });
        let _ = file.unlock();
        result
    }
}

fn io_error(e: std::io::Error) -> ProviderError {
    ProviderError::internal(format!("sandbox ledger I/O failed: {e}")).retryable(true)
}

fn catch_up(file: &mut File, state: &mut State) -> Result<(), ProviderError> {
    let len = file.metadata().map_err(io_error)?.len();
    if len == state.offset {
        return Ok(());
    }
    file.seek(SeekFrom::Start(state.offset)).map_err(io_error)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_error)?;
    // Only whole lines count. A line cut short by a crash mid-write was never acknowledged to
    // anyone: cut it off, so the next line starts clean.
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        file.set_len(state.offset + complete as u64)
            .map_err(io_error)?;
    }
    for line in text[..complete].lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Entry>(line) {
            Ok(entry) => state.apply(&entry),
            Err(e) => {
                return Err(ProviderError::internal(format!(
                    "sandbox ledger has an unreadable line: {e}"
                )));
            }
        }
    }
    state.offset += complete as u64;
    Ok(())
}

impl Locked<'_> {
    /// The entry recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.state.by_key.get(key)
    }

    /// The sandbox's view of a session.
    pub fn session(&self, session_id: &str) -> SessionState {
        self.state
            .sessions
            .get(session_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Records an effect; once this returns, the sandbox "did" it.
    pub fn record(&mut self, entry: Entry) -> Result<(), ProviderError> {
        let mut line =
            serde_json::to_string(&entry).map_err(|e| ProviderError::internal(e.to_string()))?;
        line.push('\n');
        // One write of a whole line, in append mode: concurrent writers never interleave.
        self.file.write_all(line.as_bytes()).map_err(io_error)?;
        if self.fsync {
            self.file.sync_data().map_err(io_error)?;
        }
        self.state.offset += line.len() as u64;
        self.state.apply(&entry);
        Ok(())
    }

    /// The sandbox's view of a customer (`None`: it never existed).
    pub fn holder(&self, holder: &str) -> Option<HolderState> {
        self.state.holders.get(holder).cloned()
    }

    /// Every entry of a session, in no particular order.
    pub fn entries_of(&self, session_id: &str) -> Vec<Entry> {
        self.state
            .by_key
            .values()
            .filter(|e| e.session_id == session_id)
            .cloned()
            .collect()
    }
}
