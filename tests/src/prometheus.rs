//! A real Prometheus server and promtool for tests.
//!
//! [`Prometheus`] runs Debian's `prometheus` on a private storage directory
//! and a free loopback port (127.0.0.1 only), scraping one target every
//! second, and answers PromQL over its HTTP API. [`promtool_check_metrics`]
//! lints an exposition with `promtool check metrics`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{tool, PATIENCE};

/// The scrape job every [`Prometheus`] has.
pub const JOB: &str = "ccnode";

/// A running Prometheus server; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    dir: tempfile::TempDir,
    child: Child,
    /// The server's address (on 127.0.0.1).
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts a server that scrapes `target` (a `host:port` serving
    /// `/metrics`) as job [`JOB`] every second, and waits until it is ready.
    /// Panics (with the server's log) if it does not get ready.
    pub fn start(target: SocketAddr) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("ccnode-prometheus-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus config");
        // The port is free when asked; another process may take it before
        // Prometheus binds, so a server that exits early is tried again.
        let mut last_log = String::new();
        for _ in 0..3 {
            let addr = free_loopback_port();
            let log = File::create(log_path(dir.path())).expect("prometheus log");
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=info")
                .current_dir(dir.path())
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            match wait_ready(&mut child, addr, dir.path()) {
                Ok(()) => return Prometheus { dir, child, addr },
                Err((exited, log)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !exited {
                        panic!("prometheus did not get ready:\n{log}");
                    }
                    last_log = log;
                }
            }
        }
        panic!("prometheus did not get ready:\n{last_log}");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// Evaluates `promql` now (`/api/v1/query`) and returns the whole JSON
    /// response. Panics if the server does not answer with JSON.
    pub fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (code, body) = get(self.addr, &path)
            .unwrap_or_else(|e| panic!("query {promql:?}: {e}\n{}", self.log()));
        serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!(
                "query {promql:?}: HTTP {code}, not JSON ({e}): {body}\n{}",
                self.log()
            )
        })
    }

    /// Polls `promql` until its result is not empty and returns the result
    /// (`data.result`, a JSON array). Panics after [`PATIENCE`] with the last
    /// response and the server's view of its targets.
    pub fn wait_for(&self, promql: &str) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let resp = self.query(promql);
            assert_eq!(resp["status"], "success", "query {promql:?} failed: {resp}");
            if let Some(result) = resp["data"]["result"].as_array() {
                if !result.is_empty() {
                    return result.clone();
                }
            }
            if Instant::now() > deadline {
                let targets = get(self.addr, "/api/v1/targets")
                    .map(|(_, b)| b)
                    .unwrap_or_else(|e| e);
                panic!(
                    "query {promql:?} had no result within {PATIENCE:?}; last response: {resp}\n\
                     targets: {targets}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `/-/ready`; on failure returns whether the server exited, and
/// why it failed with the log.
fn wait_ready(child: &mut Child, addr: SocketAddr, dir: &Path) -> Result<(), (bool, String)> {
    let log = || std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Err((true, format!("exited with {status}\n{}", log())));
        }
        if let Ok((200, _)) = get(addr, "/-/ready") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err((false, format!("not ready within {PATIENCE:?}\n{}", log())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("prometheus.log")
}

/// A loopback port nobody listens on right now.
fn free_loopback_port() -> SocketAddr {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    l.local_addr().expect("local addr")
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A minimal HTTP/1.0 GET (so the server neither keeps the connection nor
/// chunks the body): (status code, body), or why it failed.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// Runs `promtool check metrics` on `text` (on stdin): whether it passed,
/// and everything promtool printed. Lint problems fail it too.
pub fn promtool_check_metrics(text: &str) -> (bool, String) {
    let bin = tool("promtool");
    let mut child = Command::new(&bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("run promtool");
    let _ = writer.join();
    let mut printed = String::from_utf8_lossy(&out.stdout).into_owned();
    printed.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), printed)
}
