//! A merchant's endpoint for payhost's outgoing events: a real HTTP/1.1 server on a loopback
//! port (raw sockets, so it can also answer 500, hang, or cut the connection), recording every
//! request with whether its `payhost-signature` verifies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// 200 after `delay`.
    Ok,
    /// 500.
    Fail,
    /// Never answers (the sender's timeout ends it).
    Hang,
    /// Closes the connection without an answer.
    Close,
    /// 500, never answer, close: one after the other, per request.
    Cycle,
    /// A 200 whose body is cut off (the connection closes before its content-length).
    CutOk,
    /// A 200 with a 1 MiB body.
    HugeOk,
}

/// One request received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event's id (from the body).
    pub id: String,
    /// Its type.
    pub kind: String,
    /// Its sequence number.
    pub seq: i64,
    /// Its session, if any.
    pub session: Option<String>,
    /// The whole body.
    pub body: Value,
    /// Whether the signature verified with the secret.
    pub verified: bool,
    /// How the receiver answered.
    pub answered: Answer,
    /// When it arrived.
    pub at: Instant,
}

struct State {
    secret: String,
    answer: Mutex<Answer>,
    delay: Mutex<Duration>,
    received: Mutex<Vec<Received>>,
    requests: std::sync::atomic::AtomicUsize,
}

/// The receiving endpoint; stops when dropped.
pub struct Receiver {
    state: Arc<State>,
    /// `http://127.0.0.1:<port>/hooks/payhost`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts one on a free loopback port (inside the current tokio runtime).
    pub async fn start(secret: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!(
            "http://{}/hooks/payhost",
            listener.local_addr().expect("address")
        );
        let state = Arc::new(State {
            secret: secret.to_owned(),
            answer: Mutex::new(Answer::Ok),
            delay: Mutex::new(Duration::ZERO),
            received: Mutex::new(Vec::new()),
            requests: Default::default(),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(socket, s.clone()));
            }
        });
        Receiver { state, url, task }
    }

    /// Answers from now on as `answer`.
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    /// Waits this long before each 200.
    pub fn delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// Everything received so far, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The events answered 200, deduplicated by id (the first receipt of each), in order of
    /// arrival: what a receiver that dedupes by event id ends with.
    pub fn accepted(&self) -> Vec<Received> {
        let mut seen = std::collections::HashSet::new();
        self.received()
            .into_iter()
            .filter(|r| r.answered == Answer::Ok && seen.insert(r.id.clone()))
            .collect()
    }

    /// Waits until `done` holds for what was received; fails the test if it does not within
    /// `within` (a wait that times out quietly would let what follows check nothing).
    pub async fn wait_until(
        &self,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                started.elapsed() <= within,
                "the receiver did not get what was awaited within {within:?}: {} received ({:?})",
                received.len(),
                received
                    .iter()
                    .map(|r| (&r.kind, r.answered))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn serve(mut socket: tokio::net::TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        // The head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let n = state
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answer = match *state.answer.lock().unwrap() {
            Answer::Cycle => [Answer::Fail, Answer::Hang, Answer::Close][n % 3],
            other => other,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let verified = header(payhost::events::SIGNATURE_HEADER).is_some_and(|sig| {
            payhost::events::verify(&state.secret, &sig, &body, now, Duration::from_secs(300))
                .is_ok()
        });
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let delay = *state.delay.lock().unwrap();
        if answer == Answer::Ok && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        state.received.lock().unwrap().push(Received {
            id: json["id"].as_str().unwrap_or_default().to_owned(),
            kind: json["type"].as_str().unwrap_or_default().to_owned(),
            seq: json["seq"].as_i64().unwrap_or(-1),
            session: json["payment_session_id"].as_str().map(str::to_owned),
            body: json,
            verified,
            answered: answer,
            at: Instant::now(),
        });
        let reply: &[u8] = match answer {
            Answer::Ok => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Answer::Fail => b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nfail",
            Answer::Hang => {
                // Hold the connection until the sender gives up.
                let mut rest = [0u8; 1];
                let _ = socket.read(&mut rest).await;
                return;
            }
            Answer::CutOk => {
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nok")
                    .await;
                return;
            }
            Answer::HugeOk => {
                let body = vec![b'k'; 1 << 20];
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if socket.write_all(head.as_bytes()).await.is_err()
                    || socket.write_all(&body).await.is_err()
                {
                    return;
                }
                continue;
            }
            Answer::Close | Answer::Cycle => return,
        };
        if socket.write_all(reply).await.is_err() {
            return;
        }
    }
}
