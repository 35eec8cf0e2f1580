//! The HTTP edge of `payhost serve`: accepting connections under a limit, and cutting the ones
//! that stall before a request is under way, so no client can hold a descriptor for ever.
//!
//! Each connection's socket is wrapped ([`Guarded`]) and knows which phase it is in: *idle*
//! between requests (cut after `idle_timeout`, silently), reading a *head* once its first byte
//! arrived (cut after `header_timeout` with a `408`), or *busy* while the router handles a
//! request (then the body guard in [`super::guard`] bounds the body, and provider deadlines bound
//! the rest). Connections past `max_connections` wait in the kernel's accept queue; the ones
//! already open keep being served. HTTP/1.1 only.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// How a listener treats its connections.
#[derive(Clone)]
pub struct EdgeSettings {
    /// `api` or `admin`, in logs and metrics.
    pub name: &'static str,
    /// From a request's first byte to the end of its head (and for a TLS handshake).
    pub header_timeout: Duration,
    /// Between two requests on one connection.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// After the shutdown signal: how long requests in progress may take.
    pub shutdown_grace: Duration,
    /// How long a write to the client may make no progress before the connection is cut.
    pub write_timeout: Duration,
    /// Serve HTTPS with this.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for EdgeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeSettings")
            .field("name", &self.name)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("write_timeout", &self.write_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why a TLS configuration cannot be used; names the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub file: std::path::PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// A TLS acceptor from a PEM certificate chain and private key.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |file: &std::path::Path, message: String| TlsError {
        file: file.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, format!("cannot read a PEM certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(bad(cert, "holds no certificate".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(key, format!("cannot read a PEM private key: {e}")))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(cert, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| bad(key, format!("does not go with the certificate: {e}")))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the requests in progress
/// finish for up to `shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: EdgeSettings,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header timeout also runs while a connection idles between requests, so the
    // edge keeps both clocks itself (see `Guarded`).
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let m = crate::metrics::global();
    let open = m.http_connections_open.with_label_values(&[settings.name]);
    m.http_connection_limit
        .with_label_values(&[settings.name])
        .set(settings.max_connections as i64);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: keep serving the
                    // open ones and try again shortly.
                    tracing::warn!(listener = settings.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let (http, app, settings, open) =
            (http.clone(), app.clone(), settings.clone(), open.clone());
        tokio::spawn(async move {
            open.inc();
            match &settings.tls {
                None => serve_connection(stream, peer, &http, app, &settings, watcher).await,
                Some(tls) => {
                    match tokio::time::timeout(settings.header_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, &http, app, &settings, watcher).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = settings.name, "TLS handshake failed: {e}")
                        }
                        Err(_) => crate::metrics::global()
                            .http_connections_cut
                            .with_label_values(&["tls_handshake_timeout"])
                            .inc(),
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(listener = settings.name, "requests still in progress after the shutdown grace period; closing their connections");
        }
    }
}

/// Serves one connection's requests until it closes.
async fn serve_connection<T>(
    stream: T,
    peer: std::net::SocketAddr,
    http: &hyper::server::conn::http1::Builder,
    app: Router,
    settings: &EdgeSettings,
    watcher: hyper_util::server::graceful::Watcher,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let phase = Arc::new(PhaseCell::new());
    let io = TokioIo::new(Guarded::new(stream, phase.clone(), settings));
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        phase.set(Phase::Busy);
        let phase = phase.clone();
        let app = app.clone();
        let mut request = request.map(Body::new);
        // The client's address, for the audit log lines and per-client limits.
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        async move {
            let response = app.oneshot(request).await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(IdleWhenSent {
                    inner: body,
                    phase: Some(phase),
                })
            }))
        }
    });
    let _ = watcher.watch(http.serve_connection(io, service)).await;
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the next request since then.
    Idle(Instant),
    /// A request's head is arriving, since its first byte.
    Head(Instant),
    /// The router has a request.
    Busy,
}

/// A connection's phase, and the reader to wake when the router hands the connection back
/// (the read side may be waiting with no clock armed while the router is busy).
#[derive(Debug)]
struct PhaseCell(Mutex<(Phase, Option<std::task::Waker>)>);

impl PhaseCell {
    fn new() -> PhaseCell {
        PhaseCell(Mutex::new((Phase::Idle(Instant::now()), None)))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, (Phase, Option<std::task::Waker>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn get(&self) -> Phase {
        self.lock().0
    }
    fn set(&self, phase: Phase) {
        let waker = {
            let mut cell = self.lock();
            cell.0 = phase;
            cell.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
    /// While busy, the read side waits without a clock: wake it when that changes.
    fn wake_when_idle(&self, waker: &std::task::Waker) {
        self.lock().1 = Some(waker.clone());
    }
    /// Bytes arrived: an idle connection starts a head.
    fn bytes_arrived(&self) {
        let mut cell = self.lock();
        if let Phase::Idle(_) = cell.0 {
            cell.0 = Phase::Head(Instant::now());
        }
    }
}

/// The answer to a head that did not arrive in time.
fn request_timeout_answer() -> &'static [u8] {
    static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ANSWER.get_or_init(|| {
        let body = r#"{"error":{"type":"invalid_request_error","code":"request_timeout","message":"the request head did not arrive in time"}}"#;
        format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// A connection's socket that ends the connection when its phase's clock runs out, or when
/// the client stops taking what is written to it.
struct Guarded<T> {
    inner: T,
    phase: Arc<PhaseCell>,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    cut: bool,
    listener: &'static str,
    write_timeout: Duration,
    write_timer: Pin<Box<Sleep>>,
    /// Since when writes have made no progress.
    write_stalled: Option<Instant>,
}

impl<T> Guarded<T> {
    fn new(inner: T, phase: Arc<PhaseCell>, settings: &EdgeSettings) -> Guarded<T> {
        Guarded {
            inner,
            phase,
            header_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
            cut: false,
            listener: settings.name,
            write_timeout: settings.write_timeout,
            write_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            write_stalled: None,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            // End of stream: hyper closes the connection.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.phase.bytes_arrived();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let (deadline, reason) = match this.phase.get() {
            Phase::Idle(since) => (since + this.idle_timeout, "idle_timeout"),
            Phase::Head(since) => (since + this.header_timeout, "header_timeout"),
            Phase::Busy => {
                this.phase.wake_when_idle(cx.waker());
                // The router may have finished between the read above and now.
                if this.phase.get() == Phase::Busy {
                    return Poll::Pending;
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        };
        if this.armed_for != Some(deadline) {
            this.timer.as_mut().reset(deadline);
            this.armed_for = Some(deadline);
        }
        if this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.cut = true;
        crate::metrics::global()
            .http_connections_cut
            .with_label_values(&[reason])
            .inc();
        if reason == "header_timeout" {
            // Best effort: the socket's buffer has room for this unless the client stopped
            // reading too, and then it will not read the answer anyway.
            let _ = Pin::new(&mut this.inner).poll_write(cx, request_timeout_answer());
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
            tracing::info!(
                listener = this.listener,
                "connection closed: request head incomplete after {} ms (408)",
                this.header_timeout.as_millis()
            );
        } else {
            tracing::debug!(listener = this.listener, "idle connection closed");
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.guard_write(cx, polled)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.guard_write(cx, polled)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.guard_write(cx, polled)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.guard_write(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T> Guarded<T> {
    /// A write that made progress (or failed on its own) stops the stall clock; one that waits
    /// for the client to read starts it, and past `write_timeout` without progress the
    /// connection is cut (the error makes hyper drop it, which frees its slot).
    fn guard_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.write_stalled = None;
            return polled;
        }
        let since = *self.write_stalled.get_or_insert_with(Instant::now);
        let deadline = since + self.write_timeout;
        if self.write_timer.deadline() != deadline {
            self.write_timer.as_mut().reset(deadline);
        }
        if self.write_timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        crate::metrics::global()
            .http_connections_cut
            .with_label_values(&["write_timeout"])
            .inc();
        tracing::info!(
            listener = self.listener,
            "connection cut: the client took nothing of its answer for {} ms",
            self.write_timeout.as_millis()
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

/// A response body that marks its connection idle once it has been sent (or dropped).
struct IdleWhenSent {
    inner: Body,
    phase: Option<Arc<PhaseCell>>,
}

impl IdleWhenSent {
    fn done(&mut self) {
        if let Some(p) = self.phase.take() {
            p.set(Phase::Idle(Instant::now()));
        }
    }
}

impl Drop for IdleWhenSent {
    fn drop(&mut self) {
        self.done();
    }
}

impl HttpBody for IdleWhenSent {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
