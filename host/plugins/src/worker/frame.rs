//! The worker's wire: length-prefixed binary frames (`[u32 BE length][u8 tag][u64 call
//! id][u32 len][bytes][u32 len][bytes]`). Calls, answers and host calls carry their operation and
//! the provider protocol's JSON as bytes, untouched; the control frames (`Init`, `Ready`,
//! `LoadFailed`) are JSON. A frame is read as it arrives, never allocated from the length it
//! announces, and never shown with what it carries.

use std::io::{Read, Write};
use std::path::PathBuf;

use payhost_provider_api::{Manifest, ProviderError};
use serde::{Deserialize, Serialize};

/// One message on the socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Frame {
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
pub(super) const CALL_SOCKET: &str = "calls.sock";

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
pub(super) fn too_large(e: &std::io::Error) -> Option<usize> {
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

pub(super) fn write_frame(stream: &mut impl Write, frame: &Frame) -> std::io::Result<()> {
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

pub(super) fn read_frame(stream: &mut impl Read) -> std::io::Result<Frame> {
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
