//! The HTTP edge against careless and hostile clients, over raw sockets against a spawned
//! `payhost serve` with short timeouts: answers before the body was read, slowloris heads,
//! trickling bodies, idle keep-alive connections, and the connection limit.

use std::time::{Duration, Instant};

use payhost_e2e::{HOST, Scratch, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = r#"
[server]
header_timeout_ms = 800
body_timeout_ms = 1000
idle_timeout_ms = 1500
max_connections = 8
"#;

struct Edge {
    server: Server,
    _scratch: Scratch,
}

impl Edge {
    fn start(server_table: &str) -> Edge {
        let scratch = Scratch::new();
        let text = format!("{server_table}\n{HOST}")
            .replace("{dir}", &scratch.dir.path().display().to_string());
        let path = scratch.config(&text);
        Edge {
            server: Server::start(&path),
            _scratch: scratch,
        }
    }

    fn addr(&self) -> String {
        self.server.base.trim_start_matches("http://").to_owned()
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr()).await.expect("connect")
    }
}

/// Reads one HTTP/1.1 response with a content-length body: (status, head, body).
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Some((status, head, body))
}

/// Whether the peer closed the connection (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(within, stream.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("unexpected bytes on a connection that should close"),
        Err(_) => false,
    }
}

const GET_HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_413_on_the_same_connection_is_answered() {
    let edge = Edge::start("");
    // Raw: the next request goes on the same socket, right after the 413. Whole bodies of these
    // lengths: up to the drain cap of 2 MiB (2,097,152 bytes) the rest is drained and the
    // connection stays; past it by more than the server could have read before answering (it
    // reads at most the 64 KiB limit and a chunk), the answer says `connection: close`.
    const CAP: usize = 2_097_152;
    for (size, drained) in [
        (70_000usize, true),
        (200_000, true),
        (1_500_000, true),
        (CAP, true),
        (CAP + 256 * 1024, false),
        (3_000_000, false),
    ] {
        let mut s = edge.connect().await;
        let frame = "{\"amount\": 5, \"currency_code\": \"eur\", \"metadata\": \"\"}".len();
        let body = format!(
            "{{\"amount\": 5, \"currency_code\": \"eur\", \"metadata\": \"{}\"}}",
            "x".repeat(size - frame)
        );
        assert_eq!(body.len(), size);
        let head = format!(
            "POST /v1/payment-collections HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The server answers while the body is still on its way; keep sending like a client does.
        let (read, mut write) = s.into_split();
        let writer = tokio::spawn(async move {
            // A closed connection may cut the write short: that is what `drained: false` means.
            let written = write.write_all(body.as_bytes()).await;
            (write, written)
        });
        let (write, written) = writer.await.unwrap();
        if drained {
            written.expect("a body within the drain cap is read through");
        }
        let mut reader = read.reunite(write).unwrap();
        let (status, head, answer) = read_response(&mut reader).await.expect("the 413");
        assert_eq!(status, 413, "{answer}");
        assert!(answer.contains("body_too_large"), "{answer}");
        assert_eq!(
            head.contains("connection: close"),
            !drained,
            "{size} bytes: {head}"
        );
        if !drained {
            // Too much to drain: the server said so, and closes.
            assert!(closed_within(&mut reader, Duration::from_secs(3)).await);
            continue;
        }
        reader.write_all(GET_HEALTH).await.unwrap();
        let (status, _, body) = read_response(&mut reader)
            .await
            .unwrap_or_else(|| panic!("after a {size}-byte 413 the connection died"));
        assert_eq!(status, 200, "{body}");
    }

    // With a pooled keep-alive client, as every real client is.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = edge.server.base.clone();
    for _ in 0..20 {
        let huge = format!(
            "{{\"amount\": 5, \"currency_code\": \"eur\", \"metadata\": \"{}\"}}",
            "x".repeat(200_000)
        );
        let r = client
            .post(format!("{url}/v1/payment-collections"))
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .expect("the 413 arrives");
        assert_eq!(r.status(), 413);
        let r = client
            .get(format!("{url}/health"))
            .send()
            .await
            .expect("the next request on the pooled connection is answered");
        assert_eq!(r.status(), 200);
    }

    // A 415 before the body was read, and a client waiting for 100-continue.
    let mut s = edge.connect().await;
    s.write_all(b"POST /v1/payment-collections HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\namount=5")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut s).await.unwrap();
    assert_eq!(status, 415);
    s.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().0, 200);
    let mut s = edge.connect().await;
    s.write_all(b"POST /v1/payment-collections HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\nexpect: 100-continue\r\ncontent-length: 8\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut s).await.unwrap();
    assert_eq!(status, 415, "refused before the body is asked for");
    assert!(head.contains("connection: close"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_with_a_408_while_a_normal_client_is_served() {
    let edge = Edge::start(&LIMITS.replace("max_connections = 8", "max_connections = 200"));
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = edge.connect().await;
        s.write_all(b"POST /v1/payment-collections HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        let mut answers = Vec::new();
        // One header line every 200 ms: each connection is never idle, but its head never ends.
        for round in 0..40 {
            for s in slow.iter_mut() {
                let _ = s
                    .write_all(format!("x-slow-{round}: 1\r\n").as_bytes())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if round == 10 {
                break;
            }
        }
        for mut s in slow {
            answers.push(tokio::time::timeout(Duration::from_secs(5), read_response(&mut s)).await);
        }
        answers
    });
    // Meanwhile a normal client is served at once.
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = client
            .get(format!("{}/health", edge.server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answers = trickle.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    for answer in answers {
        let (status, head, body) = answer
            .expect("answered within the header timeout")
            .expect("a 408 before the close");
        assert_eq!(status, 408, "{body}");
        assert!(head.contains("connection: close"));
        assert!(body.contains("request_timeout"), "{body}");
    }
    let metrics = client
        .get(format!("{}/metrics", edge.server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_http_connections_cut_total{reason=\"header_timeout\"} 50"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_is_cut_with_a_408_within_the_body_timeout() {
    let edge = Edge::start(LIMITS);
    let mut s = edge.connect().await;
    s.write_all(b"POST /v1/payment-collections HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut read, mut write) = s.into_split();
    let trickler = tokio::spawn(async move {
        for _ in 0..30 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut buf)).await;
    let elapsed = started.elapsed();
    trickler.abort();
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let metrics = reqwest::get(format!("{}/metrics", edge.server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("payhost_http_connections_cut_total{reason=\"body_timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_before() {
    let edge = Edge::start(LIMITS);
    let mut s = edge.connect().await;
    s.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().0, 200);
    // Idle for longer than the header timeout: still open, and served.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.write_all(GET_HEALTH).await.unwrap();
    assert_eq!(
        read_response(&mut s).await.expect("still open").0,
        200,
        "idling is not a slow head"
    );
    let idle_since = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(4)).await,
        "closed once idle"
    );
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(1400) && idle < Duration::from_secs(3),
        "{idle:?}"
    );
    // A connection that never sends a byte is idle too.
    let mut silent = edge.connect().await;
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_while_open_ones_are_served() {
    let edge = Edge::start(&LIMITS.replace("idle_timeout_ms = 1500", "idle_timeout_ms = 20000"));
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s = edge.connect().await;
        s.write_all(GET_HEALTH).await.unwrap();
        assert_eq!(read_response(&mut s).await.unwrap().0, 200);
        open.push(s);
    }
    // The ninth is accepted by the kernel but not served while eight are open.
    let mut ninth = edge.connect().await;
    ninth.write_all(GET_HEALTH).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(700), read_response(&mut ninth)).await;
    assert!(
        waited.is_err(),
        "the ninth connection was served past the limit"
    );
    // The open ones keep being served.
    for s in open.iter_mut() {
        s.write_all(GET_HEALTH).await.unwrap();
        assert_eq!(read_response(s).await.unwrap().0, 200);
    }
    // One closes: the ninth is served.
    drop(open.pop());
    let served = tokio::time::timeout(Duration::from_secs(3), read_response(&mut ninth))
        .await
        .expect("served once a slot is free")
        .expect("an answer");
    assert_eq!(served.0, 200);
}

/// A client that sends requests and never reads the answers fills its socket's buffers; past
/// `write_timeout_ms` without progress its connection is cut, so its slot is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_after_the_write_timeout() {
    let edge = Edge::start(
        "[server]\nmax_connections = 1\nwrite_timeout_ms = 1000\nidle_timeout_ms = 60000\n",
    );
    let mut greedy = edge.connect().await;
    let addr = edge.addr();
    // Pipelined requests for the OpenAPI document (tens of KiB each), none read.
    let request = format!("GET /openapi.json HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let flood = tokio::spawn(async move {
        for _ in 0..2000 {
            if greedy.write_all(request.as_bytes()).await.is_err() {
                return true;
            }
        }
        // Keep the socket open, unread, until the server gives up on it.
        let mut byte = [0u8; 1];
        tokio::time::sleep(Duration::from_secs(30)).await;
        let _ = greedy.peek(&mut byte).await;
        false
    });
    // The one slot is taken; a second client waits, then is served once the first is cut.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut next = edge.connect().await;
    next.write_all(GET_HEALTH).await.unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), read_response(&mut next))
        .await
        .expect("served once the client that never reads was cut")
        .expect("an answer");
    assert_eq!(served.0, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the slot was really taken: {:?}",
        started.elapsed()
    );
    flood.abort();
    drop(next);
    let metrics = reqwest::get(format!("{}/metrics", edge.server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("payhost_http_connections_cut_total{reason=\"write_timeout\"} ")),
        "{metrics}"
    );
}
