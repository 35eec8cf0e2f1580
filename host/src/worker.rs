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

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payhost_provider_api::envelope::{
    HostObject, HostObject_TO, ProviderBox, RResult, RStr, RString, TD_Opaque,
};
use payhost_provider_api::{Manifest, ProviderError};
use serde::{Deserialize, Serialize};

use crate::provider::HostSide;

/// One message on the socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Frame {
    /// Host → worker, first: what to load.
    Init {
        library: PathBuf,
        sha256: Option<String>,
        instance_id: String,
        options: serde_json::Value,
        config_dir: String,
        log_level: String,
    },
    /// Worker → host: loaded.
    Ready {
        manifest: Box<Manifest>,
        protocol: u32,
        sha256: String,
        path: PathBuf,
    },
    /// Worker → host: could not load (`refused`: the provider refused its options).
    LoadFailed {
        code: String,
        message: String,
        refused: Option<ProviderError>,
    },
    /// Host → worker: a provider call.
    Call {
        id: u64,
        op: String,
        payload: String,
    },
    /// Worker → host: its answer (`ok` the answer's JSON, or `err` the error's).
    Answer {
        id: u64,
        ok: Option<String>,
        err: Option<String>,
    },
    /// Worker → host: a host service call from the provider.
    HostCall {
        id: u64,
        op: String,
        payload: String,
    },
    /// Host → worker: its answer.
    HostAnswer {
        id: u64,
        ok: Option<String>,
        err: Option<String>,
    },
}

/// What a frame is, never what it carries: options hold secrets, and payloads card data.
impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Init {
                library,
                instance_id,
                ..
            } => write!(
                f,
                "Init {{ library: {}, instance_id: {instance_id}, options: <redacted> }}",
                library.display()
            ),
            Frame::Ready { protocol, .. } => write!(f, "Ready {{ protocol: {protocol} }}"),
            Frame::LoadFailed { code, .. } => write!(f, "LoadFailed {{ code: {code} }}"),
            Frame::Call { id, op, payload } => {
                write!(f, "Call {{ id: {id}, op: {op}, {} bytes }}", payload.len())
            }
            Frame::Answer { id, ok, err } => write!(
                f,
                "Answer {{ id: {id}, {} bytes }}",
                ok.as_ref().or(err.as_ref()).map_or(0, String::len)
            ),
            Frame::HostCall { id, op, payload } => {
                write!(
                    f,
                    "HostCall {{ id: {id}, op: {op}, {} bytes }}",
                    payload.len()
                )
            }
            Frame::HostAnswer { id, ok, err } => write!(
                f,
                "HostAnswer {{ id: {id}, {} bytes }}",
                ok.as_ref().or(err.as_ref()).map_or(0, String::len)
            ),
        }
    }
}

/// The worker's call socket, in the private folder beside the control socket.
const CALL_SOCKET: &str = "calls.sock";

/// The largest frame either side reads: a provider's answer beyond
/// [`crate::provider::MAX_ANSWER_BYTES`] is refused anyway, and a frame is read as it arrives,
/// never allocated whole from its announced length.
const MAX_FRAME: usize = 4 * 1024 * 1024;

/// A frame announced larger than [`MAX_FRAME`]: its bytes are not read.
#[derive(Debug)]
struct FrameTooLarge(usize);

impl std::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a frame of {} bytes, over the {MAX_FRAME} read", self.0)
    }
}

impl std::error::Error for FrameTooLarge {}

/// The size of a frame refused as too large, if that is what `e` is.
fn too_large(e: &std::io::Error) -> Option<usize> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FrameTooLarge>())
        .map(|t| t.0)
}

// The wire: `[u32 BE length of the rest][u8 tag][u64 id][u32 len][a][u32 len][b]`. Calls,
// answers and host calls carry their operation and JSON payload as raw bytes (no re-encoding
// on the hot path); the control frames (`Init`, `Ready`, `LoadFailed`) are JSON in `a`.
const CONTROL: u8 = 1;
const CALL: u8 = 2;
const ANSWER_OK: u8 = 3;
const ANSWER_ERR: u8 = 4;
const HOST_CALL: u8 = 5;
const HOST_OK: u8 = 6;
const HOST_ERR: u8 = 7;

fn write_frame(stream: &mut impl Write, frame: &Frame) -> std::io::Result<()> {
    let control;
    let (tag, id, a, b): (u8, u64, &[u8], &[u8]) = match frame {
        Frame::Call { id, op, payload } => (CALL, *id, op.as_bytes(), payload.as_bytes()),
        Frame::HostCall { id, op, payload } => (HOST_CALL, *id, op.as_bytes(), payload.as_bytes()),
        Frame::Answer {
            id, ok: Some(ok), ..
        } => (ANSWER_OK, *id, ok.as_bytes(), b""),
        Frame::Answer { id, err, .. } => (
            ANSWER_ERR,
            *id,
            err.as_deref().unwrap_or("").as_bytes(),
            b"",
        ),
        Frame::HostAnswer {
            id, ok: Some(ok), ..
        } => (HOST_OK, *id, ok.as_bytes(), b""),
        Frame::HostAnswer { id, err, .. } => {
            (HOST_ERR, *id, err.as_deref().unwrap_or("").as_bytes(), b"")
        }
        other => {
            control = serde_json::to_vec(other).map_err(std::io::Error::other)?;
            (CONTROL, 0, &control[..], b"")
        }
    };
    let len = 1 + 8 + 4 + a.len() + 4 + b.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(tag);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(a.len() as u32).to_be_bytes());
    out.extend_from_slice(a);
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
    stream.write_all(&out)?;
    stream.flush()
}

fn read_frame(stream: &mut impl Read) -> std::io::Result<Frame> {
    let bad = |what: &str| std::io::Error::other(format!("a malformed frame: {what}"));
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(FrameTooLarge(len)));
    }
    if len < 17 {
        return Err(bad(&format!("{len} bytes")));
    }
    // Read as it arrives: a length the peer announced is not memory it gets to make us take.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    stream.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    let tag = body[0];
    let id = u64::from_be_bytes(body[1..9].try_into().map_err(|_| bad("id"))?);
    let a_len = u32::from_be_bytes(body[9..13].try_into().map_err(|_| bad("length"))?) as usize;
    let a_end = 13 + a_len;
    if a_end + 4 > len {
        return Err(bad("first part"));
    }
    let b_len = u32::from_be_bytes(
        body[a_end..a_end + 4]
            .try_into()
            .map_err(|_| bad("length"))?,
    ) as usize;
    if a_end + 4 + b_len != len {
        return Err(bad("second part"));
    }
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| bad("not UTF-8"));
    let a = &body[13..a_end];
    let b = &body[a_end + 4..];
    Ok(match tag {
        CONTROL => serde_json::from_slice(a).map_err(std::io::Error::other)?,
        CALL => Frame::Call {
            id,
            op: text(a)?,
            payload: text(b)?,
        },
        HOST_CALL => Frame::HostCall {
            id,
            op: text(a)?,
            payload: text(b)?,
        },
        ANSWER_OK => Frame::Answer {
            id,
            ok: Some(text(a)?),
            err: None,
        },
        ANSWER_ERR => Frame::Answer {
            id,
            ok: None,
            err: Some(text(a)?),
        },
        HOST_OK => Frame::HostAnswer {
            id,
            ok: Some(text(a)?),
            err: None,
        },
        HOST_ERR => Frame::HostAnswer {
            id,
            ok: None,
            err: Some(text(a)?),
        },
        other => return Err(bad(&format!("tag {other}"))),
    })
}

/// What a call through a worker gave.
#[derive(Debug, Clone)]
pub(crate) enum Raw {
    /// The answer's JSON.
    Ok(String),
    /// The provider's error JSON.
    Err(String),
    /// Nothing was sent: the worker is down.
    NotSent(String),
    /// Sent, and the worker died before answering.
    Lost(String),
    /// Sent, and the answer is larger than the host reads (its size).
    TooLarge(usize),
}

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
    pub(crate) fn call(&self, op: &str, payload: &str, deadline: Instant) -> Raw {
        let Some(conn) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Raw::NotSent(format!(
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
                    return Raw::NotSent(format!("the worker did not take the call: {e}"));
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
        if matches!(raw, Raw::Ok(_) | Raw::Err(_)) {
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
    ) -> Raw {
        let frame = Frame::Call {
            id,
            op: op.to_owned(),
            payload: payload.to_owned(),
        };
        if let Err(e) = write_frame(&mut stream.writer, &frame) {
            // `write_all` failed, so the frame is incomplete, and an incomplete frame is never
            // executed.
            return Raw::NotSent(format!("the worker did not take the call: {e}"));
        }
        loop {
            match read_frame(&mut stream.reader) {
                Ok(Frame::Answer { id: got, ok, err }) if got == id => {
                    return match (ok, err) {
                        (Some(ok), _) => Raw::Ok(ok),
                        (None, Some(err)) => Raw::Err(err),
                        (None, None) => Raw::Lost("an empty answer".into()),
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
                        return Raw::Lost(format!("the worker's connection broke: {e}"));
                    }
                }
                Ok(other) => {
                    return Raw::Lost(format!("the worker answered out of turn: {other:?}"));
                }
                Err(e) => {
                    if let Some(bytes) = too_large(&e) {
                        return Raw::TooLarge(bytes);
                    }
                    return Raw::Lost(format!("the worker died before answering ({e})"));
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

/// `text` with control characters written as escapes (`\r`, `\u{1b}`): a plugin's output can
/// never end a log line early or forge another one.
pub(crate) fn escape_control(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ------------------------------------------------------------------ the worker process

/// Host service calls waiting for the host's answer, by id.
type HostCalls = Arc<Mutex<HashMap<u64, mpsc::Sender<Result<String, String>>>>>;

/// A host service call answered by the host at the other end of the socket.
struct RemoteHost {
    writer: Arc<Mutex<UnixStream>>,
    pending: HostCalls,
    next_id: AtomicU64,
}

thread_local! {
    /// The call connection this worker thread is serving a call on: the host services that
    /// call uses go out and come back on it.
    static SERVING: std::cell::RefCell<Option<CallStream>> = const { std::cell::RefCell::new(None) };
}

impl HostObject for RemoteHost {
    fn call(&self, op: RStr<'_>, request: RStr<'_>) -> RResult<RString, RString> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let on_call = SERVING.with(|serving| {
            let mut serving = serving.borrow_mut();
            let stream = serving.as_mut()?;
            let frame = Frame::HostCall {
                id,
                op: op.as_str().to_owned(),
                payload: request.as_str().to_owned(),
            };
            if let Err(e) = write_frame(&mut stream.writer, &frame) {
                return Some(Err(format!("the host is gone: {e}")));
            }
            Some(match read_frame(&mut stream.reader) {
                Ok(Frame::HostAnswer {
                    id: got,
                    ok: Some(ok),
                    ..
                }) if got == id => Ok(ok),
                Ok(Frame::HostAnswer { id: got, err, .. }) if got == id => {
                    Err(err.unwrap_or_else(|| "an empty host answer".into()))
                }
                Ok(other) => Err(format!("the host answered out of turn: {other:?}")),
                Err(e) => Err(format!("the host is gone: {e}")),
            })
        });
        match on_call {
            Some(Ok(answer)) => return RResult::ROk(RString::from(answer)),
            Some(Err(err)) => return RResult::RErr(RString::from(err)),
            // A thread of the provider's own: through the control socket.
            None => {}
        }
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = Frame::HostCall {
            id,
            op: op.as_str().to_owned(),
            payload: request.as_str().to_owned(),
        };
        let sent = write_frame(
            &mut *self.writer.lock().unwrap_or_else(|e| e.into_inner()),
            &frame,
        );
        if let Err(e) = sent {
            return RResult::RErr(RString::from(format!("the host is gone: {e}")));
        }
        match rx.recv() {
            Ok(Ok(answer)) => RResult::ROk(RString::from(answer)),
            Ok(Err(err)) => RResult::RErr(RString::from(err)),
            Err(_) => RResult::RErr(RString::from("the host is gone")),
        }
    }
}

/// `payhost worker`: loads one library and serves its calls over `socket` until the host
/// closes it.
pub fn run(socket: &Path, max_memory_mb: Option<u64>) -> ExitCode {
    // Before any vendor code runs: no privileges to gain, and the kernel's memory limit.
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        eprintln!("worker: cannot set no_new_privs: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(mb) = max_memory_mb {
        let bytes = mb.saturating_mul(1024 * 1024);
        if let Err(e) = rlimit::setrlimit(rlimit::Resource::AS, bytes, bytes) {
            eprintln!("worker: cannot limit memory to {mb} MiB: {e}");
            return ExitCode::FAILURE;
        }
    }
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: cannot connect to {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut reader = BufReader::new(stream);
    let Ok(Frame::Init {
        library,
        sha256,
        instance_id,
        options,
        config_dir,
        log_level,
    }) = read_frame(&mut reader)
    else {
        eprintln!("worker: the host sent no Init frame");
        return ExitCode::FAILURE;
    };
    let pending: HostCalls = Arc::default();
    let host = HostObject_TO::from_value(
        RemoteHost {
            writer: writer.clone(),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
        },
        TD_Opaque,
    );
    // Host answers arrive on this same socket while loading (a provider may log in `new`).
    let calls_path = socket.with_file_name(CALL_SOCKET);
    let loading = {
        let (writer, library) = (writer.clone(), library.clone());
        std::thread::spawn(move || {
            let opened = crate::plugins::open_and_instantiate(
                &library,
                sha256.as_deref(),
                &instance_id,
                options,
                config_dir,
                log_level,
                host,
            );
            let calls = match &opened {
                Ok(_) => Some(UnixListener::bind(&calls_path)),
                Err(_) => None,
            };
            let frame = match (&opened, &calls) {
                (Ok(_), Some(Err(e))) => Frame::LoadFailed {
                    code: "worker.socket".into(),
                    message: format!("cannot listen on {}: {e}", calls_path.display()),
                    refused: None,
                },
                (Ok(o), _) => Frame::Ready {
                    manifest: Box::new(o.manifest.clone()),
                    protocol: o.protocol,
                    sha256: o.sha256.clone(),
                    path: library.clone(),
                },
                (Err(crate::plugins::OpenFailure::Load(e)), _) => Frame::LoadFailed {
                    code: e.code().to_owned(),
                    message: e.to_string(),
                    refused: None,
                },
                (Err(crate::plugins::OpenFailure::Refused(e)), _) => Frame::LoadFailed {
                    code: "plugin.options_rejected".into(),
                    message: e.message.clone(),
                    refused: Some(e.clone()),
                },
            };
            // Listening before the host hears Ready, so its first call finds the socket.
            if let (Ok(o), Some(Ok(calls))) = (opened, calls) {
                let object = Arc::new(o.object);
                let _ = std::thread::Builder::new()
                    .name("payhost-worker-accept".into())
                    .spawn(move || accept_calls(calls, object));
            }
            let _ = write_frame(
                &mut *writer.lock().unwrap_or_else(|e| e.into_inner()),
                &frame,
            );
        })
    };
    drop(loading);
    loop {
        let frame = match read_frame(&mut reader) {
            Ok(f) => f,
            // The host closed the socket (or died): nothing more to do.
            Err(_) => return ExitCode::SUCCESS,
        };
        // Only answers to host services asked from the provider's own threads come here.
        if let Frame::HostAnswer { id, ok, err } = frame
            && let Some(tx) = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
        {
            let _ = tx.send(match (ok, err) {
                (Some(ok), _) => Ok(ok),
                (None, Some(err)) => Err(err),
                (None, None) => Err("an empty host answer".into()),
            });
        }
    }
}

/// Serves the host's call connections, each on a thread of its own (the host opens one per
/// call in flight, so a call never waits behind another; its `max_concurrency` bounds them).
fn accept_calls(listener: UnixListener, object: Arc<ProviderBox>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let object = object.clone();
        let _ = std::thread::Builder::new()
            .name("payhost-worker-call".into())
            .spawn(move || serve_calls(stream, &object));
    }
}

/// Runs the calls that arrive on one connection, one after another, until the host closes it.
fn serve_calls(stream: UnixStream, object: &ProviderBox) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    SERVING.with(|s| {
        *s.borrow_mut() = Some(CallStream {
            reader: BufReader::new(stream),
            writer,
        })
    });
    loop {
        let frame = SERVING.with(|s| s.borrow_mut().as_mut().map(|c| read_frame(&mut c.reader)));
        let Some(Ok(Frame::Call { id, op, payload })) = frame else {
            return;
        };
        // No borrow is held here: the provider's host services use the connection meanwhile.
        let answer = match object.call(RStr::from_str(&op), RStr::from_str(&payload)) {
            RResult::ROk(ok) => Frame::Answer {
                id,
                ok: Some(ok.into_string()),
                err: None,
            },
            RResult::RErr(err) => Frame::Answer {
                id,
                ok: None,
                err: Some(err.into_string()),
            },
        };
        let written = SERVING.with(|s| {
            s.borrow_mut()
                .as_mut()
                .map(|c| write_frame(&mut c.writer, &answer))
        });
        if !matches!(written, Some(Ok(()))) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
