//! Helpers shared by the benchmark harnesses (`benches/`): run sizes from
//! the environment (so a quick run is one variable away), latency
//! summaries, a keep-alive HTTP client, and readings of /proc.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

/// `key` parsed as a number, or `default` when unset. Panics on a value
/// that is not a number: a mistyped scale must not silently measure less.
pub fn env_f64(key: &str, default: f64) -> f64 {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// A count: the variable if set, else `default`, times `scale`, and at
/// least `floor`.
pub fn count(key: &str, default: usize, scale: f64, floor: usize) -> usize {
    let base = env_f64(key, default as f64);
    ((base * scale).round() as usize).max(floor)
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &mut [Duration]) -> Summary {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        // Nearest rank: the smallest sample with at least q of all samples
        // at or below it.
        let pct = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            us(samples[rank - 1])
        };
        let total: f64 = samples.iter().map(|&d| us(d)).sum();
        Summary {
            n: samples.len(),
            mean: total / samples.len() as f64,
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            p999: pct(0.999),
            max: us(*samples.last().expect("not empty")),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "n": self.n,
            "mean_us": round1(self.mean),
            "p50_us": round1(self.p50),
            "p90_us": round1(self.p90),
            "p99_us": round1(self.p99),
            "p999_us": round1(self.p999),
            "max_us": round1(self.max),
        })
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A minimal keep-alive HTTP/1.1 client for `GET`s with a
/// `Content-Length` response.
#[derive(Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    write: TcpStream,
    read: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> HttpClient {
        let write = TcpStream::connect(addr).expect("connect http");
        write.set_nodelay(true).expect("nodelay");
        write
            .set_read_timeout(Some(crate::PATIENCE))
            .expect("read timeout");
        let read = BufReader::new(write.try_clone().expect("clone tcp stream"));
        HttpClient {
            addr,
            write,
            read,
            line: String::new(),
            body: Vec::new(),
        }
    }

    /// One GET; returns the latency (request written to body read) and the
    /// body size.
    pub fn get(&mut self, path: &str) -> (Duration, usize) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        let start = Instant::now();
        self.write
            .write_all(request.as_bytes())
            .expect("write http request");
        let mut status = 0;
        let mut length = None;
        let mut first = true;
        loop {
            self.line.clear();
            let n = self.read.read_line(&mut self.line).expect("read http head");
            assert!(n > 0, "http connection closed mid-response");
            let l = self.line.trim_end();
            if first {
                status = l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                first = false;
            } else if l.is_empty() {
                break;
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.expect("response has Content-Length");
        self.body.resize(length, 0);
        self.read
            .read_exact(&mut self.body)
            .expect("read http body");
        let elapsed = start.elapsed();
        assert_eq!(status, 200, "GET {path} failed");
        (elapsed, length)
    }
}

/// Fields of /proc/PID/status, in KiB (`Threads` as a count).
pub fn proc_status(pid: u32) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read proc status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    json!({
        "vm_rss_kib": field("VmRSS"),
        "vm_hwm_kib": field("VmHWM"),
        "rss_anon_kib": field("RssAnon"),
        "rss_file_kib": field("RssFile"),
        "threads": field("Threads"),
    })
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads one metric sample from the exposition text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
