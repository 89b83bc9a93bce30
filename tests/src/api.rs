//! A small HTTP/1.1 client for the OpenAI-compatible API in end-to-end
//! tests: JSON requests, chunked responses, server-sent event streams read
//! event by event (so a test can act in the middle of a stream).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use serde_json::Value;

use crate::PATIENCE;

/// A response: status, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// Reads a response's status line and headers (names lower-cased).
pub fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).expect("header") == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    (status, headers)
}

/// Whether `headers` (from [`read_head`]) say the body is chunked.
pub fn is_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
}

/// Reads a chunked body's next chunk; `None` at the end.
pub fn next_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
    if size == 0 {
        let mut end = String::new();
        let _ = r.read_line(&mut end);
        return None;
    }
    let mut buf = vec![0u8; size + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(size);
    Some(buf)
}

fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    // A server that refuses a body it has not read (413) answers and closes
    // before the body is all sent: the write fails (EPIPE, or a reset), and
    // the answer is what to read.
    if let Err(e) = s.write_all(&req) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "send request: {e}"
        );
    }
    BufReader::new(s)
}

/// One request, the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut r = send(addr, method, path, body);
    let (status, headers) = read_head(&mut r);
    let chunked = is_chunked(&headers);
    let mut raw = Vec::new();
    if chunked {
        while let Some(c) = next_chunk(&mut r) {
            raw.extend_from_slice(&c);
        }
    } else {
        let _ = r.read_to_end(&mut raw);
    }
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, b"")
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, body.to_string().as_bytes())
}

/// A server-sent event stream, read event by event.
#[derive(Debug)]
pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    pending: String,
    chunked: bool,
}

/// One `data:` event: JSON, or the end marker.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Data(Value),
    Done,
}

impl Stream {
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> Stream {
        let mut reader = send(addr, "POST", path, body.to_string().as_bytes());
        let (status, headers) = read_head(&mut reader);
        let chunked = is_chunked(&headers);
        Stream {
            status,
            headers,
            reader,
            pending: String::new(),
            chunked,
        }
    }

    /// The next event; `None` when the stream has ended.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(at) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..at + 2).collect();
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue;
                }
                if data == "[DONE]" {
                    return Some(Event::Done);
                }
                let v = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"));
                return Some(Event::Data(v));
            }
            let more = if self.chunked {
                next_chunk(&mut self.reader)?
            } else {
                let mut buf = vec![0u8; 4096];
                let n = self.reader.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                buf.truncate(n);
                buf
            };
            self.pending.push_str(&String::from_utf8_lossy(&more));
        }
    }

    /// Every remaining event.
    pub fn rest(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

/// A binary of this workspace (`ccnode-worker`, ...), built next to the
/// test's own executable by `cargo test --workspace` / nextest.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built: run the tests for the whole workspace (./scripts/test.sh)",
        p.display()
    );
    p
}
