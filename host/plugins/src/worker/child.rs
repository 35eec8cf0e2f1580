//! The worker process (`payhost worker`): loads one library and serves its calls over the
//! socket the host gives, each on a thread of its own; host services the provider uses go back
//! to the host over the call's own connection (or the control socket, from the provider's own
//! threads).

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use payhost_provider_api::envelope::{
    HostObject, HostObject_TO, ProviderBox, RResult, RStr, RString, TD_Opaque,
};

use super::frame::{CALL_SOCKET, Frame, read_frame, write_frame};

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
            let opened = crate::library::open_and_instantiate(
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
                (Err(crate::library::OpenFailure::Load(e)), _) => Frame::LoadFailed {
                    code: e.code().to_owned(),
                    message: e.to_string(),
                    refused: None,
                },
                (Err(crate::library::OpenFailure::Refused(e)), _) => Frame::LoadFailed {
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

/// The call connection of a worker thread (`SERVING`'s): a call's reader and writer.
struct CallStream {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}
