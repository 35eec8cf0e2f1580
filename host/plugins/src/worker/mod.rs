//! Providers in supervised worker processes (`isolation = "process"`): a vendor's segfault,
//! `abort()`, `exit()`, stack overflow, runaway allocation or hung call costs only its own calls.
//!
//! The host starts `payhost worker --socket <path>` (the same binary), which loads the same
//! library and serves the same `call(op, json)` envelope over a Unix socket in a private folder.
//! Frames are length-prefixed binary records ([`Frame`], see `write_frame`): a tag, a call id
//! and two byte strings. Calls and answers carry the operation name and the provider protocol's
//! own versioned JSON untouched, so a provider cannot tell the difference and no vendor
//! recompiles; only the control frames (init, ready, load failed) are JSON. Host services (log,
//! clock, `http.request`) travel back over the same socket. Calls are multiplexed by id; the
//! worker runs each on a pooled thread that is never shared by two calls at once.
//!
//! Invariants:
//! - A call in flight when its worker dies is *unknown* (the reconciler asks `retrieve` once the
//!   worker is back); a call made while the worker is down is *not attempted*.
//! - A call that overruns its deadline by `kill_after` kills its worker, so a hung call never holds
//!   its slot for ever. Every other call in flight there becomes unknown too.
//! - A worker that died is restarted with a backoff (100 ms doubling to 5 s); one that died five
//!   times within a minute is reported unhealthy (`/ready`, `/v1/providers`, metrics) while the
//!   other providers go on.
//! - The worker runs with a cleared environment (the options it needs were resolved by the host),
//!   `no_new_privs`, an address-space limit of `max_memory_mb` (enforced by the kernel), stdout
//!   discarded and stderr forwarded to the host's log, bounded per line and per second.

mod child;
mod frame;

pub use child::run;

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payhost_provider_api::{Manifest, ProviderError};

use crate::answer::Undecoded;
use crate::host_side::{HostSide, escape_control};
use frame::{CALL_SOCKET, Frame, read_frame, too_large, write_frame};

/// How a worker is run.
#[derive(Clone)]
pub(crate) struct WorkerSettings {
    pub(crate) provider_id: String,
    pub(crate) library: PathBuf,
    pub(crate) sha256: Option<String>,
    pub(crate) options: serde_json::Value,
    pub(crate) config_dir: String,
    pub(crate) max_memory_mb: Option<u64>,
    pub(crate) kill_after: Duration,
    /// The payhost executable to run as the worker (default: this process's).
    pub(crate) exe: Option<PathBuf>,
    /// Host-service calls from the provider's own threads served at once; past it, refused.
    pub(crate) max_host_calls: usize,
    /// The user (and group) the worker runs as, dropped to before it loads the library.
    pub(crate) user: Option<crate::config::WorkerUser>,
}

impl std::fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("provider_id", &self.provider_id)
            .field("library", &self.library)
            .field("sha256", &self.sha256)
            .field("options", &"<redacted>")
            .field("max_memory_mb", &self.max_memory_mb)
            .field("kill_after", &self.kill_after)
            .field("exe", &self.exe)
            .field("max_host_calls", &self.max_host_calls)
            .field("user", &self.user)
            .finish()
    }
}

/// Where a worker stands, for health reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerHealth {
    /// Serving.
    Up,
    /// Restarting after a death.
    Restarting,
    /// Died five times within a minute: still restarted, with the longest backoff.
    Unhealthy,
}

/// One worker process as the host sees it: the control socket, the socket calls connect to,
/// and the calls in flight there (with their deadlines, for the watchdog).
struct Connection {
    /// Host-service calls from provider threads that are not serving a call come back here.
    writer: Mutex<UnixStream>,
    /// The worker's call socket (`calls.sock` in the private folder).
    calls: PathBuf,
    /// Call connections not in use.
    idle: Mutex<Vec<CallStream>>,
    /// Calls in flight, by id: their deadlines.
    pending: Mutex<HashMap<u64, Instant>>,
    /// The private folder, removed when this worker is gone.
    dir: PathBuf,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.calls);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A connection to a worker's call socket: one call at a time, with the host services that
/// call uses coming back on it.
struct CallStream {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl CallStream {
    fn connect(path: &Path) -> std::io::Result<CallStream> {
        let stream = UnixStream::connect(path)?;
        Ok(CallStream {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }
}

/// A started worker's reader, handed from `spawn_once` to the supervisor.
type Reader = (BufReader<UnixStream>, Arc<Connection>, Arc<HostSide>);

/// One provider's worker process and its supervisor.
pub(crate) struct Worker {
    settings: WorkerSettings,
    /// Serves the host services a provider asks for.
    host: Arc<HostSide>,
    connection: Mutex<Option<Arc<Connection>>>,
    reader: Mutex<Option<Reader>>,
    child: Mutex<Option<Child>>,
    next_id: AtomicU64,
    health: Mutex<WorkerHealth>,
    stopping: AtomicBool,
    restarts: AtomicU64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("provider", &self.settings.provider_id)
            .finish_non_exhaustive()
    }
}

/// What a freshly started worker said: the plugin's description, or why it did not load.
pub(crate) enum Started {
    Ready {
        manifest: Manifest,
        protocol: u32,
        sha256: String,
    },
    Failed {
        code: String,
        message: String,
        refused: Option<ProviderError>,
    },
}

impl Worker {
    /// Starts the worker and its supervisor; returns once the first worker answered.
    pub(crate) fn start(
        settings: WorkerSettings,
        host: Arc<HostSide>,
    ) -> Result<(Arc<Worker>, Started), String> {
        let worker = Arc::new(Worker {
            settings,
            host: host.clone(),
            connection: Mutex::new(None),
            reader: Mutex::new(None),
            child: Mutex::new(None),
            next_id: AtomicU64::new(1),
            health: Mutex::new(WorkerHealth::Restarting),
            stopping: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
        });
        let started = worker.spawn_once(&host)?;
        if let Started::Failed { .. } = started {
            worker.kill();
            return Ok((worker, started));
        }
        let (w, h) = (worker.clone(), host);
        std::thread::Builder::new()
            .name(format!("payhost-worker-{}", w.settings.provider_id))
            .spawn(move || w.supervise(h))
            .map_err(|e| e.to_string())?;
        let w = worker.clone();
        std::thread::Builder::new()
            .name(format!("payhost-watchdog-{}", w.settings.provider_id))
            .spawn(move || w.watchdog())
            .map_err(|e| e.to_string())?;
        Ok((worker, started))
    }

    /// Its health now.
    pub(crate) fn health(&self) -> WorkerHealth {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many times it was restarted.
    pub(crate) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// Makes one call and waits for its answer (bounded: the watchdog kills a worker whose call
    /// overruns its deadline by `kill_after`).
    pub(crate) fn call(&self, op: &str, payload: &str, deadline: Instant) -> Undecoded {
        let Some(conn) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Undecoded::NotSent(format!(
                "the worker of provider `{}` is down (restarting)",
                self.settings.provider_id
            ));
        };
        let idle = conn.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut stream = match idle {
            Some(stream) => stream,
            None => match CallStream::connect(&conn.calls) {
                Ok(stream) => stream,
                Err(e) => {
                    return Undecoded::NotSent(format!("the worker did not take the call: {e}"));
                }
            },
        };
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, deadline);
        let raw = Self::exchange(&mut stream, id, op, payload, deadline, &self.host);
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if matches!(raw, Undecoded::Ok(_) | Undecoded::Err(_)) {
            conn.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(stream);
        }
        raw
    }

    /// Sends one call on its own connection and reads until its answer, serving the host
    /// services the provider asks for meanwhile. Unbounded by itself: a worker whose call
    /// overruns its deadline by `kill_after` is killed by the watchdog, which ends the read.
    fn exchange(
        stream: &mut CallStream,
        id: u64,
        op: &str,
        payload: &str,
        deadline: Instant,
        host: &HostSide,
    ) -> Undecoded {
        let frame = Frame::Call {
            id,
            op: op.to_owned(),
            payload: payload.to_owned(),
        };
        if let Err(e) = write_frame(&mut stream.writer, &frame) {
            // `write_all` failed, so the frame is incomplete, and an incomplete frame is never
            // executed.
            return Undecoded::NotSent(format!("the worker did not take the call: {e}"));
        }
        loop {
            match read_frame(&mut stream.reader) {
                Ok(Frame::Answer { id: got, ok, err }) if got == id => {
                    return match (ok, err) {
                        (Some(ok), _) => Undecoded::Ok(ok),
                        (None, Some(err)) => Undecoded::Err(err),
                        (None, None) => Undecoded::Lost("an empty answer".into()),
                    };
                }
                Ok(Frame::HostCall {
                    id: host_id,
                    op,
                    payload,
                }) => {
                    // Within the call's own deadline: a worker killed meanwhile leaves no host
                    // thread waiting on its request for longer than its call could run.
                    let (ok, err) = match host.serve(&op, &payload, Some(deadline)) {
                        Ok(ok) => (Some(ok), None),
                        Err(err) => (None, Some(err)),
                    };
                    let answer = Frame::HostAnswer {
                        id: host_id,
                        ok,
                        err,
                    };
                    if let Err(e) = write_frame(&mut stream.writer, &answer) {
                        return Undecoded::Lost(format!("the worker's connection broke: {e}"));
                    }
                }
                Ok(other) => {
                    return Undecoded::Lost(format!("the worker answered out of turn: {other:?}"));
                }
                Err(e) => {
                    if let Some(bytes) = too_large(&e) {
                        return Undecoded::TooLarge(bytes);
                    }
                    return Undecoded::Lost(format!("the worker died before answering ({e})"));
                }
            }
        }
    }

    fn kill(&self) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = child.kill();
        }
    }

    /// Stops for good (the host is shutting down).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kill();
    }

    /// Starts a worker process, hands it the library, and waits for its first word.
    fn spawn_once(&self, host: &Arc<HostSide>) -> Result<Started, String> {
        let s = &self.settings;
        let dir =
            private_dir().map_err(|e| format!("cannot make the worker's socket folder: {e}"))?;
        let socket = dir.join(format!("{}.sock", s.provider_id));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        if let Some(user) = &s.user {
            // The worker, as its own user, must reach its socket and make its call socket in
            // the folder; nothing else of the host's becomes reachable.
            if !nix::unistd::geteuid().is_root() && nix::unistd::geteuid().as_raw() != user.uid {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!(
                    "worker_user `{}` needs payhost to run as root (it starts each worker as that user); run payhost as root, or drop worker_user",
                    user.name
                ));
            }
            for path in [&dir, &socket] {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
                    format!(
                        "cannot hand {} to worker_user `{}`: {e}",
                        path.display(),
                        user.name
                    )
                })?;
            }
        }
        let exe = s
            .exe
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .ok_or("cannot find the payhost executable")?;
        let mut command = Command::new(&exe);
        command
            .arg("worker")
            .arg("--socket")
            .arg(&socket)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(mb) = s.max_memory_mb {
            command.arg("--max-memory-mb").arg(mb.to_string());
        }
        if let Some(user) = &s.user {
            // Set before the executable runs (std also drops the supplementary groups when
            // starting from root): no code of the worker, nor of the vendor, runs as the host.
            use std::os::unix::process::CommandExt;
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {} worker: {e}", exe.display()))?;
        if let Some(stderr) = child.stderr.take() {
            let id = s.provider_id.clone();
            let _ = std::thread::Builder::new()
                .name(format!("payhost-worker-log-{id}"))
                .spawn(move || forward_stderr(&id, stderr));
        }
        // Wait for it to connect, at most 10 s.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("the worker exited before connecting ({status})"));
                    }
                    if started.elapsed() > Duration::from_secs(10) {
                        let _ = child.kill();
                        return Err("the worker did not connect within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        // The folder stays until this worker is gone: its call socket is made there.
        let _ = std::fs::remove_file(&socket);
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        write_frame(
            &mut writer,
            &Frame::Init {
                library: s.library.clone(),
                sha256: s.sha256.clone(),
                instance_id: s.provider_id.clone(),
                options: s.options.clone(),
                config_dir: s.config_dir.clone(),
                log_level: tracing::level_filters::LevelFilter::current()
                    .to_string()
                    .to_ascii_lowercase(),
            },
        )
        .map_err(|e| format!("cannot talk to the worker: {e}"))?;
        // The first answer may take a while (loading, hashing), but not for ever.
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)));
        // A provider may use host services while it starts (it logs, reads the clock).
        let first = loop {
            match read_frame(&mut reader) {
                Ok(Frame::HostCall { id, op, payload }) => {
                    let (ok, err) = match host.serve(&op, &payload, None) {
                        Ok(ok) => (Some(ok), None),
                        Err(err) => (None, Some(err)),
                    };
                    if let Err(e) = write_frame(&mut writer, &Frame::HostAnswer { id, ok, err }) {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        let _ = reader.get_ref().set_read_timeout(None);
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        match first {
            Ok(Frame::Ready {
                manifest,
                protocol,
                sha256,
                ..
            }) => {
                let conn = Arc::new(Connection {
                    writer: Mutex::new(writer),
                    calls: dir.join(CALL_SOCKET),
                    idle: Mutex::new(Vec::new()),
                    pending: Mutex::new(HashMap::new()),
                    dir,
                });
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                *self.reader.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((reader, conn, host.clone()));
                Ok(Started::Ready {
                    manifest: *manifest,
                    protocol,
                    sha256,
                })
            }
            Ok(Frame::LoadFailed {
                code,
                message,
                refused,
            }) => {
                let _ = std::fs::remove_dir_all(&dir);
                Ok(Started::Failed {
                    code,
                    message,
                    refused,
                })
            }
            Ok(other) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(format!("the worker said {other:?} before it was ready"))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(format!("the worker died while loading the library: {e}"))
            }
        }
    }

    /// Serves the connection until the worker dies, then restarts it with a backoff.
    fn supervise(self: Arc<Self>, host: Arc<HostSide>) {
        let mut backoff = Duration::from_millis(100);
        let mut deaths: Vec<Instant> = Vec::new();
        loop {
            let taken = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((reader, conn, host_side)) = taken {
                *self.health.lock().unwrap_or_else(|e| e.into_inner()) = if deaths
                    .iter()
                    .filter(|t| t.elapsed() < Duration::from_secs(60))
                    .count()
                    >= 5
                {
                    WorkerHealth::Unhealthy
                } else {
                    WorkerHealth::Up
                };
                let served_since = Instant::now();
                self.serve_connection(reader, &conn, &host_side);
                // It died: what was in flight is unknown, what comes now is not attempted.
                // (Each call in flight sees its own connection close and reports itself lost.)
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
                drop(conn);
                let status = self
                    .child
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                    .and_then(|c| c.wait().ok())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "gone".into());
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if served_since.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                deaths.push(Instant::now());
                deaths.retain(|t| t.elapsed() < Duration::from_secs(60));
                let unhealthy = deaths.len() >= 5;
                *self.health.lock().unwrap_or_else(|e| e.into_inner()) = if unhealthy {
                    WorkerHealth::Unhealthy
                } else {
                    WorkerHealth::Restarting
                };
                crate::metrics::global()
                    .worker_restarts
                    .with_label_values(&[&self.settings.provider_id])
                    .inc();
                tracing::error!(
                    provider = %self.settings.provider_id,
                    status = %status,
                    restart_in_ms = backoff.as_millis() as u64,
                    unhealthy,
                    "the provider's worker died; calls in flight are unknown and will be reconciled; restarting it"
                );
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match self.spawn_once(&host) {
                Ok(Started::Ready { .. }) => {
                    self.restarts.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(provider = %self.settings.provider_id, "the provider's worker is back");
                }
                Ok(Started::Failed { code, message, .. }) => {
                    tracing::error!(provider = %self.settings.provider_id, code, "the restarted worker could not load its library: {message}");
                    self.kill();
                }
                Err(e) => {
                    tracing::error!(provider = %self.settings.provider_id, "restarting the worker failed: {e}")
                }
            }
        }
    }

    fn serve_connection(
        &self,
        mut reader: BufReader<UnixStream>,
        conn: &Arc<Connection>,
        host: &Arc<HostSide>,
    ) {
        // HTTP requests from the provider's own threads each take a host thread while they
        // run (up to the provider's call timeout): at most `max_host_calls` at once.
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while let Ok(frame) = read_frame(&mut reader) {
            match frame {
                Frame::HostCall { id, op, payload } => {
                    let is_http = op == payhost_provider_api::host_ops::HTTP;
                    if is_http
                        && in_flight.fetch_add(1, Ordering::SeqCst) >= self.settings.max_host_calls
                    {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        crate::metrics::global()
                            .plugin_limits
                            .with_label_values(&[&self.settings.provider_id, "host_calls"])
                            .inc();
                        let refused = payhost_provider_api::HttpFailure::NotSent {
                            message: format!(
                                "the host is already sending {} requests for this provider's own threads",
                                self.settings.max_host_calls
                            ),
                        };
                        let answer = Frame::HostAnswer {
                            id,
                            ok: None,
                            err: Some(serde_json::to_string(&refused).unwrap_or_default()),
                        };
                        let mut w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = write_frame(&mut *w, &answer);
                        continue;
                    }
                    let (conn, host) = (conn.clone(), host.clone());
                    // Counted until the answer is written, or the thread never starts.
                    let counted = is_http.then(|| InFlight(in_flight.clone()));
                    let serve = move || {
                        let _counted = counted;
                        let answer = match host.serve(&op, &payload, None) {
                            Ok(ok) => Frame::HostAnswer {
                                id,
                                ok: Some(ok),
                                err: None,
                            },
                            Err(err) => Frame::HostAnswer {
                                id,
                                ok: None,
                                err: Some(err),
                            },
                        };
                        let mut w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = write_frame(&mut *w, &answer);
                    };
                    // Logs and the clock answer at once; an HTTP request may take its deadline.
                    if is_http {
                        let _ = std::thread::Builder::new()
                            .name("payhost-worker-http".into())
                            .spawn(serve);
                    } else {
                        serve();
                    }
                }
                other => {
                    tracing::warn!(provider = %self.settings.provider_id, "unexpected frame from the worker: {other:?}");
                }
            }
        }
    }

    /// Kills the worker when a call overruns its deadline by `kill_after`.
    fn watchdog(self: Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            let conn = self
                .connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let Some(conn) = conn else { continue };
            let overdue = conn
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|deadline| Instant::now() > *deadline + self.settings.kill_after);
            if overdue {
                tracing::error!(
                    provider = %self.settings.provider_id,
                    kill_after_ms = self.settings.kill_after.as_millis() as u64,
                    "a call overran its deadline by the kill margin: killing the provider's worker"
                );
                crate::metrics::global()
                    .worker_kills
                    .with_label_values(&[&self.settings.provider_id])
                    .inc();
                self.kill();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// One host-service call counted while it runs.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A folder only this user can enter, for the worker's socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "payhost-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// The bytes of one stderr line forwarded; the rest of the line is dropped.
const STDERR_LINE: usize = 2048;
/// The bytes of stderr forwarded per second; past them, lines are dropped until the next second.
const STDERR_PER_SECOND: usize = 16 * 1024;

/// Forwards a worker's stderr to the log, bounded in bytes per line and per second, and never
/// stops reading: a worker that writes without newlines, or bytes that are not UTF-8, costs the
/// host at most one line's buffer, and the worker never blocks on a full pipe. What is dropped
/// is counted (`payhost_worker_stderr_dropped_bytes_total`).
fn forward_stderr(provider: &str, mut stderr: impl Read) {
    let dropped = crate::metrics::global()
        .worker_stderr_dropped
        .with_label_values(&[provider]);
    let mut forward = StderrLines::new(|line: &str, dropped_bytes: u64| {
        if !line.is_empty() {
            tracing::warn!(provider, "worker stderr: {line}");
        }
        if dropped_bytes > 0 {
            dropped.inc_by(dropped_bytes);
        }
    });
    let mut buf = [0u8; 8192];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => forward.feed(&buf[..n], Instant::now()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    forward.finish(Instant::now());
}

/// Splits bytes into bounded lines under a per-second budget.
struct StderrLines<F: FnMut(&str, u64)> {
    line: Vec<u8>,
    /// Bytes of the current line past [`STDERR_LINE`].
    cut: u64,
    window: Option<Instant>,
    spent: usize,
    emit: F,
}

impl<F: FnMut(&str, u64)> StderrLines<F> {
    fn new(emit: F) -> Self {
        StderrLines {
            line: Vec::with_capacity(256),
            cut: 0,
            window: None,
            spent: 0,
            emit,
        }
    }

    fn feed(&mut self, bytes: &[u8], now: Instant) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line(now);
            } else if self.line.len() < STDERR_LINE {
                self.line.push(b);
            } else {
                self.cut += 1;
            }
        }
    }

    fn finish(&mut self, now: Instant) {
        if !self.line.is_empty() || self.cut > 0 {
            self.end_line(now);
        }
    }

    fn end_line(&mut self, now: Instant) {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.spent = 0;
        }
        let cut = std::mem::take(&mut self.cut);
        if self.spent + self.line.len() > STDERR_PER_SECOND {
            let dropped = self.line.len() as u64 + cut;
            self.line.clear();
            (self.emit)("", dropped);
            return;
        }
        self.spent += self.line.len();
        let text = escape_control(&String::from_utf8_lossy(&self.line));
        let text = if cut > 0 {
            format!("{text} … ({cut} more bytes dropped)")
        } else {
            text
        };
        self.line.clear();
        (self.emit)(&text, cut);
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Duration, Frame, Instant, STDERR_LINE, STDERR_PER_SECOND, StderrLines, WorkerSettings,
    };

    fn run(input: &[&[u8]], step: Duration) -> (Vec<String>, u64) {
        let mut lines = Vec::new();
        let mut dropped = 0;
        let start = Instant::now();
        {
            let mut f = StderrLines::new(|l: &str, d: u64| {
                if !l.is_empty() {
                    lines.push(l.to_owned());
                }
                dropped += d;
            });
            for (i, chunk) in input.iter().enumerate() {
                f.feed(chunk, start + step * i as u32);
            }
            f.finish(start + step * input.len() as u32);
        }
        (lines, dropped)
    }

    #[test]
    fn debug_of_frames_and_settings_shows_no_option_or_payload() {
        let init = Frame::Init {
            library: "/lib/x.so".into(),
            sha256: None,
            instance_id: "card".into(),
            options: serde_json::json!({"api_key": "sk_live_frame_secret"}),
            config_dir: String::new(),
            log_level: "info".into(),
        };
        let call = Frame::Call {
            id: 7,
            op: "authorize".into(),
            payload: r#"{"input":{"card_number":"4242424242424242"}}"#.into(),
        };
        let settings = WorkerSettings {
            provider_id: "card".into(),
            library: "/lib/x.so".into(),
            sha256: None,
            options: serde_json::json!({"api_key": "sk_live_frame_secret"}),
            config_dir: String::new(),
            max_memory_mb: None,
            kill_after: Duration::from_secs(1),
            exe: None,
            max_host_calls: 4,
            user: None,
        };
        let shown = format!("{init:?} {call:?} {settings:?}");
        assert!(!shown.contains("sk_live_frame_secret"), "{shown}");
        assert!(!shown.contains("4242424242424242"), "{shown}");
        assert!(
            shown.contains("authorize") && shown.contains("card"),
            "{shown}"
        );
    }

    #[test]
    fn a_line_without_end_costs_one_line_and_is_counted() {
        let big = vec![b'x'; 10 * STDERR_LINE];
        let (lines, dropped) = run(&[&big, b"\nnext\n"], Duration::ZERO);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].len() < STDERR_LINE + 64, "{}", lines[0].len());
        assert!(lines[0].ends_with("more bytes dropped)"));
        assert_eq!(dropped, 9 * STDERR_LINE as u64);
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn bytes_that_are_not_utf8_or_are_control_characters_are_forwarded_escaped() {
        let (lines, _) = run(
            &[
                b"bad \xff\xfe bytes\n",
                b"forged\r2026-01-01 INFO payhost: ok\x1b[31m\n",
            ],
            Duration::ZERO,
        );
        assert_eq!(lines[0], "bad \u{fffd}\u{fffd} bytes");
        assert_eq!(lines[1], "forged\\r2026-01-01 INFO payhost: ok\\u{1b}[31m");
    }

    #[test]
    fn past_the_budget_of_a_second_lines_are_dropped_until_the_next() {
        let line = [vec![b'y'; 1000], vec![b'\n']].concat();
        let burst: Vec<u8> = line.repeat(100);
        let (lines, dropped) = run(&[&burst, &line], Duration::from_millis(1100));
        // 16 lines of the burst fit the second's budget, the rest are dropped; a second later
        // lines are forwarded again.
        assert_eq!(lines.len(), STDERR_PER_SECOND / 1000 + 1, "{}", lines.len());
        assert_eq!(dropped, (100 - STDERR_PER_SECOND as u64 / 1000) * 1000);
    }
}
