//! Helpers shared by the benchmark harnesses (`benches/`): run sizes from
//! the environment (so a quick run is one variable away), latency
//! summaries, a keep-alive HTTP client, and readings of /proc.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
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

/// Runs `callers` threads, each calling `op` `per` times once all are
/// ready; returns every latency, what `op` kept, and the wall time from the
/// common start until the last thread finished.
pub fn run_level<T, F>(callers: usize, per: usize, op: F) -> (Vec<Duration>, Vec<T>, Duration)
where
    T: Send + 'static,
    F: Fn(usize, [u8; 32]) -> Option<T> + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(callers + 1));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let op = op.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut random = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
                let mut lat = Vec::with_capacity(per);
                let mut kept = Vec::new();
                barrier.wait();
                for i in 0..per {
                    let n = random_nonce(&mut random);
                    let start = Instant::now();
                    let k = op(i, n);
                    lat.push(start.elapsed());
                    kept.extend(k);
                }
                (lat, kept)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(callers * per);
    let mut kept = Vec::new();
    for t in threads {
        let (l, k) = t.join().expect("verifier thread");
        lat.extend(l);
        kept.extend(k);
    }
    (lat, kept, start.elapsed())
}

/// 32 fresh random bytes from `random` (an open `/dev/urandom`).
pub fn random_nonce(random: &mut std::fs::File) -> [u8; 32] {
    let mut n = [0u8; 32];
    random.read_exact(&mut n).expect("read /dev/urandom");
    n
}

/// One concurrency level's figures: latencies and throughput.
#[derive(Debug)]
pub struct Level {
    pub summary: Summary,
    pub per_second: f64,
}

impl Level {
    pub fn of(mut lat: Vec<Duration>, wall: Duration) -> Level {
        let n = lat.len();
        Level {
            summary: Summary::of(&mut lat),
            per_second: n as f64 / wall.as_secs_f64(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let s = &self.summary;
        json!({
            "n": s.n, "p50_ms": s.p50 / 1e3, "p90_ms": s.p90 / 1e3, "p99_ms": s.p99 / 1e3,
            "mean_ms": s.mean / 1e3, "max_ms": s.max / 1e3, "per_second": self.per_second,
        })
    }
}

/// Mean of `ccnode_attestation_seconds` between two scrapes, in ms: the
/// daemon's own time per observation, HTTP not included. Before batched
/// quotes one observation per request, from taking a slot to the evidence
/// (TPM queueing included); since, one per quote (per batch).
pub fn daemon_mean_ms(before: &str, after: &str) -> f64 {
    let get = |t: &str, m: &str| metric(t, m).unwrap_or(0.0);
    let sum = get(after, "ccnode_attestation_seconds_sum")
        - get(before, "ccnode_attestation_seconds_sum");
    let n = get(after, "ccnode_attestation_seconds_count")
        - get(before, "ccnode_attestation_seconds_count");
    if n > 0.0 {
        1e3 * sum / n
    } else {
        0.0
    }
}
