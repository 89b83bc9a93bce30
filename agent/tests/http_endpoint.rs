//! The HTTP endpoint end to end, over raw TCP against the real daemon:
//! health and readiness, errors (404, 405, 413), and the bounds (header read
//! timeout, connection cap) with the counters that report them.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ccnode_testkit::{TestNode, PATIENCE};
use serde_json::Value;

fn node() -> TestNode {
    TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Header names lowercased.
    headers: BTreeMap<String, String>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

fn parse(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Reads until the peer closes. `Ok(bytes)` on EOF; `Err` with what was
/// read on a reset; panics if the peer keeps the connection open past
/// [`PATIENCE`].
fn read_until_close(s: &mut TcpStream) -> Result<Vec<u8>, (ErrorKind, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the server kept the connection open for {PATIENCE:?}; read so far: {:?}",
                    String::from_utf8_lossy(&raw)
                )
            }
            Err(e) => return Err((e.kind(), raw)),
        }
    }
}

/// Sends `request` as is on a new connection and reads the response until
/// the server closes (requests here say `Connection: close`).
fn exchange(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut s = connect(addr);
    s.write_all(request).expect("write request");
    match read_until_close(&mut s) {
        Ok(raw) => parse(&raw),
        // A close with unread request bytes resets; the response came first.
        Err((_, raw)) if !raw.is_empty() => parse(&raw),
        Err((kind, _)) => panic!("connection failed before a response: {kind:?}"),
    }
}

/// `METHOD path` with `Connection: close` and `extra` header lines.
fn request(addr: SocketAddr, method: &str, path: &str, extra: &str) -> Resp {
    exchange(
        addr,
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, "")
}

fn admin_ok(node: &TestNode, line: &str) -> Value {
    let resp = node.request(line);
    assert_eq!(resp["ok"], true, "{line} failed: {resp}");
    resp
}

/// The samples of `name` in a text exposition: labels → value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let labels = labels
            .split("\",")
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
            .collect();
        out.push((labels, value.parse().expect("sample value")));
    }
    out
}

/// The value of `name{labels}` (exactly those labels), if present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples(text, name)
        .into_iter()
        .find(|(l, _)| *l == want)
        .map(|(_, v)| v)
}

#[test]
fn healthz_is_ok_and_readyz_follows_the_node_state() {
    let node = node().start();
    let addr = node.http_addr.unwrap();

    let health = get(addr, "/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body, "ok\n");
    assert!(health
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let head = request(addr, "HEAD", "/healthz", "");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.body, "", "HEAD has no body");

    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200, "active node is ready: {ready:?}");
    assert_eq!(ready.body, "ready\n");

    admin_ok(&node, r#"{"v":1,"cmd":"drain","reason":"http test"}"#);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503, "drained node is not ready: {ready:?}");
    assert!(
        ready.body.starts_with("not ready: node is drain"),
        "says why: {:?}",
        ready.body
    );
    let health = get(addr, "/healthz");
    assert_eq!(
        health.status, 200,
        "a drained node is still alive: {health:?}"
    );

    admin_ok(&node, r#"{"v":1,"cmd":"undrain","reason":"done"}"#);
    let ready = get(addr, "/readyz");
    assert_eq!(
        ready.status, 200,
        "undrained node is ready again: {ready:?}"
    );
}

#[test]
fn unknown_path_is_404_with_a_json_error() {
    let node = node().start();
    let addr = node.http_addr.unwrap();
    for path in ["/nope", "/metrics/extra", "/"] {
        let resp = get(addr, path);
        assert_eq!(resp.status, 404, "{path}: {resp:?}");
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let body = resp.json();
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

#[test]
fn methods_other_than_get_and_head_are_405_with_allow() {
    let node = node().start();
    let addr = node.http_addr.unwrap();
    for (method, path) in [
        ("POST", "/metrics"),
        ("PUT", "/healthz"),
        ("DELETE", "/readyz"),
    ] {
        let resp = request(addr, method, path, "Content-Length: 0\r\n");
        assert_eq!(resp.status, 405, "{method} {path}: {resp:?}");
        assert_eq!(
            resp.header("allow"),
            Some("GET, HEAD"),
            "{method} {path}: {resp:?}"
        );
        assert_eq!(resp.json()["error"]["code"], "method_not_allowed");
    }
}

#[test]
fn a_declared_body_over_max_body_bytes_is_413() {
    let node = node().with_http("max_body_bytes = 100").start();
    let addr = node.http_addr.unwrap();

    // Declared, never sent: the server answers on the header alone.
    let resp = request(addr, "GET", "/healthz", "Content-Length: 101\r\n");
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json()["error"]["code"], "body_too_large");

    let resp = request(addr, "GET", "/metrics", "Content-Length: 1000000000\r\n");
    assert_eq!(resp.status, 413, "{resp:?}");

    // At the limit is fine (the endpoints ignore the body).
    let mut req = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 100\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&[b'x'; 100]);
    let resp = exchange(addr, &req);
    assert_eq!(resp.status, 200, "{resp:?}");

    // A chunked body declares no size: refused too.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let resp = exchange(addr, req.as_bytes());
    assert_eq!(resp.status, 413, "{resp:?}");
}

#[test]
fn a_client_that_stalls_mid_request_is_disconnected() {
    let node = node().with_http(r#"header_read_timeout = "500ms""#).start();
    let addr = node.http_addr.unwrap();

    let mut s = connect(addr);
    s.write_all(b"GET /heal")
        .expect("write half a request line");
    // Then nothing. The server must close; no assertion on when, beyond
    // the harness's patience.
    let got = read_until_close(&mut s);
    let raw = match &got {
        Ok(raw) => raw.clone(),
        Err((kind, raw)) => {
            assert!(
                matches!(
                    kind,
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ),
                "unexpected error: {kind:?}"
            );
            raw.clone()
        }
    };
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.starts_with("HTTP/1.1 2"),
        "a half request must not be served: {text:?}"
    );

    // Headers that never end get the same treatment.
    let mut s = connect(addr);
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
        .unwrap();
    if let Ok(raw) = read_until_close(&mut s) {
        assert!(!String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 2"));
    }

    // And the server still serves.
    assert_eq!(get(addr, "/healthz").status, 200);
}

/// The docs' claim that `header_read_timeout` also bounds idleness: a
/// kept-alive connection that sends nothing after its response, and a
/// connection that never sends a byte, are both closed by the server.
#[test]
fn idle_connections_are_closed() {
    let node = node().with_http(r#"header_read_timeout = "300ms""#).start();
    let addr = node.http_addr.unwrap();
    let mut s = connect(addr);
    let resp = keep_alive_get(&mut s, addr, "/healthz");
    assert_eq!(resp.status, 200, "{resp:?}");
    // Then nothing: closed, with nothing more said (or a reset).
    match read_until_close(&mut s) {
        Ok(raw) => assert!(raw.is_empty(), "{:?}", String::from_utf8_lossy(&raw)),
        Err((kind, raw)) => {
            assert!(raw.is_empty(), "{:?}", String::from_utf8_lossy(&raw));
            assert!(
                matches!(
                    kind,
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ),
                "unexpected error: {kind:?}"
            );
        }
    }
    let mut silent = connect(addr);
    if let Ok(raw) = read_until_close(&mut silent) {
        assert!(!String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 2"));
    }
    assert_eq!(get(addr, "/healthz").status, 200);
}

/// Sends a keep-alive request and reads exactly one response (by
/// Content-Length), leaving the connection open.
fn keep_alive_get(s: &mut TcpStream, addr: SocketAddr, path: &str) -> Resp {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .expect("write request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read response");
        assert!(n > 0, "server closed a keep-alive connection");
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = parse(&raw[..end + 4]);
        let len: usize = head
            .header("content-length")
            .expect("content-length")
            .parse()
            .unwrap();
        if raw.len() >= end + 4 + len {
            return parse(&raw);
        }
    }
}

/// GETs `path` on new connections until one is served (connections over
/// the cap are closed unanswered); panics with `stuck` after [`PATIENCE`].
fn once_a_slot_frees(addr: SocketAddr, path: &str, stuck: &str) -> Resp {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut s = connect(addr);
        let _ = s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        if let Ok(raw) = read_until_close(&mut s) {
            if !raw.is_empty() {
                return parse(&raw);
            }
        }
        assert!(Instant::now() < deadline, "{stuck} ({PATIENCE:?})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_over_the_cap_are_closed_and_counted() {
    let node = node()
        .with_http("max_connections = 2\nheader_read_timeout = \"60s\"")
        .start();
    let addr = node.http_addr.unwrap();

    // Two connections that the server has certainly accepted (each got a
    // response), now idle in the middle of their next request.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(addr);
        let resp = keep_alive_get(&mut s, addr, "/healthz");
        assert_eq!(resp.status, 200, "{resp:?}");
        s.write_all(b"GET /hea").unwrap();
        held.push(s);
    }

    // A third is closed on accept, without a response.
    let mut third = connect(addr);
    // The write may fail if the close already arrived.
    let _ = third.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    match read_until_close(&mut third) {
        Ok(raw) => assert!(
            raw.is_empty(),
            "got a response: {:?}",
            String::from_utf8_lossy(&raw)
        ),
        Err((kind, raw)) => {
            assert!(
                raw.is_empty(),
                "got a response: {:?}",
                String::from_utf8_lossy(&raw)
            );
            assert!(
                matches!(
                    kind,
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ),
                "unexpected error: {kind:?}"
            );
        }
    }

    // Released, the slots free up (once the server sees the closes).
    drop(held);
    let metrics = once_a_slot_frees(addr, "/metrics", "the connection slots were not released");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let refused = sample(&metrics.body, "ccnode_http_refused_connections_total", &[])
        .expect("refused counter exported");
    assert!(refused >= 1.0, "refused = {refused}\n{}", metrics.body);
    // The refused connection never reached a handler.
    assert_eq!(
        sample(
            &metrics.body,
            "ccnode_http_requests_total",
            &[("handler", "healthz"), ("code", "200")]
        ),
        Some(2.0),
        "{}",
        metrics.body
    );
}

/// A client that pipelines requests and reads none of the answers holds
/// its connection only until a write has made no progress for
/// `write_timeout`: then it is closed and its slot (here the only one)
/// serves others again.
#[test]
fn a_client_that_does_not_read_its_answers_is_disconnected() {
    let node = node()
        .with_http("max_connections = 1\nheader_read_timeout = \"1h\"\nwrite_timeout = \"300ms\"")
        .start();
    let addr = node.http_addr.unwrap();
    let mut stuck = connect(addr);
    let asked = 5000;
    let requests = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(asked);
    // Far more answers than the socket buffers hold; the server stops
    // reading requests when it cannot write, so they are written aside.
    let writer = {
        let mut w = stuck.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(requests.as_bytes());
        })
    };
    // The only slot is held until the server gives up on the stuck one.
    let health = once_a_slot_frees(
        addr,
        "/healthz",
        "a client that reads nothing held the only slot",
    );
    assert_eq!(health.status, 200);
    // The stuck connection was closed with answers left unwritten.
    let raw = match read_until_close(&mut stuck) {
        Ok(raw) => raw,
        Err((_, raw)) => raw,
    };
    let answered = String::from_utf8_lossy(&raw)
        .matches("HTTP/1.1 200")
        .count();
    assert!(answered < asked, "{answered} of {asked} answered");
    writer.join().unwrap();
}

#[test]
fn requests_are_counted_by_handler_and_code() {
    let node = node().start();
    let addr = node.http_addr.unwrap();

    for _ in 0..3 {
        assert_eq!(get(addr, "/healthz").status, 200);
    }
    assert_eq!(get(addr, "/readyz").status, 200);
    assert_eq!(get(addr, "/nope").status, 404);
    assert_eq!(get(addr, "/elsewhere").status, 404);
    assert_eq!(
        request(addr, "POST", "/metrics", "Content-Length: 0\r\n").status,
        405
    );
    admin_ok(&node, r#"{"v":1,"cmd":"drain","reason":"count"}"#);
    assert_eq!(get(addr, "/readyz").status, 503);

    let first = get(addr, "/metrics");
    assert_eq!(first.status, 200);
    let count = |text: &str, handler: &str, code: &str| {
        sample(
            text,
            "ccnode_http_requests_total",
            &[("handler", handler), ("code", code)],
        )
    };
    let text = &first.body;
    assert_eq!(count(text, "healthz", "200"), Some(3.0), "{text}");
    assert_eq!(count(text, "readyz", "200"), Some(1.0), "{text}");
    assert_eq!(count(text, "readyz", "503"), Some(1.0), "{text}");
    assert_eq!(count(text, "other", "404"), Some(2.0), "{text}");
    assert_eq!(count(text, "metrics", "405"), Some(1.0), "{text}");
    assert_eq!(
        count(text, "healthz", "404"),
        None,
        "no such series: {text}"
    );

    // The scrape itself is counted (after it is rendered).
    let second = get(addr, "/metrics");
    let before = count(&first.body, "metrics", "200").unwrap_or(0.0);
    assert_eq!(
        count(&second.body, "metrics", "200"),
        Some(before + 1.0),
        "{}",
        second.body
    );
}
