//! Request-body guards, part of the router so embedders get them too: a body must arrive within
//! the body timeout (`408` otherwise, and the connection closes), and an answer given before the
//! body was read in full (a `413`, a `415`, a `401`) first drains what is left, within a bound,
//! or says `connection: close`. Either way a keep-alive client's next request never lands on a
//! socket the server is about to drop.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::AppState;
use super::error::ApiError;

/// The most of an unread body that is drained to keep its connection open.
pub(super) const DRAIN_LIMIT: u64 = 2 * 1024 * 1024;
/// The longest a drain may take.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// How far a request body got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Reading,
    Done,
    TimedOut,
    Failed,
}

struct Slot {
    /// The real body, until it ended.
    body: Option<Body>,
    progress: Progress,
    read: u64,
}

/// The body the handlers see: the real one, under the body deadline, watched.
struct Watched {
    slot: Arc<Mutex<Slot>>,
    deadline: Pin<Box<Sleep>>,
}

/// The request body did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let mut slot = this.slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(body) = slot.body.as_mut() else {
            return Poll::Ready(match slot.progress {
                Progress::TimedOut => Some(Err(axum::Error::new(BodyTimedOut))),
                _ => None,
            });
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(None) => {
                slot.progress = Progress::Done;
                slot.body = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                slot.progress = Progress::Failed;
                slot.body = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    slot.read += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    slot.progress = Progress::TimedOut;
                    slot.body = None;
                    return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

/// The middleware: watches the body, and settles the connection's fate after the handler.
pub(super) async fn guard_body(
    State(s): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let http1 = request.version() <= Version::HTTP_11;
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = request.into_parts();
    let deadline = Instant::now() + s.body_timeout;
    let slot = Arc::new(Mutex::new(Slot {
        body: Some(body),
        progress: Progress::Reading,
        read: 0,
    }));
    let watched = Watched {
        slot: slot.clone(),
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
    };
    let mut response = next
        .run(Request::from_parts(parts, Body::new(watched)))
        .await;
    let (progress, read, rest) = {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        (slot.progress, slot.read, slot.body.take())
    };
    let keep_open = match progress {
        Progress::Done => true,
        Progress::Failed => false,
        Progress::TimedOut => {
            crate::metrics::global()
                .http_connections_cut
                .with_label_values(&["body_timeout"])
                .inc();
            tracing::info!(
                "request body incomplete after {} ms: 408, connection closed",
                s.body_timeout.as_millis()
            );
            response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    s.body_timeout.as_millis()
                ),
            )
            .into_response();
            false
        }
        Progress::Reading => match rest {
            None => true,
            Some(rest) if rest.is_end_stream() => true,
            // A client waiting for `100 Continue` that got a final answer sends no body.
            Some(_) if expects_continue && read == 0 => false,
            Some(rest) => {
                let left = rest.size_hint().upper().unwrap_or(u64::MAX);
                left <= DRAIN_LIMIT && drain(rest, deadline.min(Instant::now() + DRAIN_TIME)).await
            }
        },
    };
    if !keep_open && http1 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and drops what is left of a body, within [`DRAIN_LIMIT`] and by `until`. Whether it
/// ended.
async fn drain(mut body: Body, until: Instant) -> bool {
    let read_all = async {
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    total += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if total > DRAIN_LIMIT {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    tokio::time::timeout_at(until, read_all)
        .await
        .unwrap_or(false)
}
