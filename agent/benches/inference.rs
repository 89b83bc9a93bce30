//! The inference benchmark, end to end on CPU: a generated, signed
//! Llama-shaped model ([`Shape::bench`], about 166 M parameters, f32)
//! served by the real `ccnoded` through its sandboxed `ccnode-worker`
//! (namespaces, Landlock, seccomp, sealed memfds) and streamed over
//! `POST /v1/completions`, against the same model directory run directly
//! with candle in this process ([`Direct`]), and against the worker's own
//! [`Engine`] loaded from the same bytes in this process (the same
//! generation code as the worker, without the sandbox, the socket and the
//! HTTP path): time to first token, decode tokens per second and the time
//! ccnoded adds per token, side by side in one run.
//!
//! Run (cargo builds a bench's own package's binaries, so `ccnoded`, but
//! not `ccnode-worker`, which is another package's; the release build puts
//! it where the bench looks, next to `ccnoded`):
//!
//! ```text
//! cargo build --release -p ccnode-worker && cargo bench -p ccnode-agent --bench inference
//! ```
//!
//! Prints a table and one `BENCH_JSON {...}` line; docs/benchmarks.md
//! records the machine, the command and the figures.
//!
//! | variable                   | default | meaning                                          |
//! |----------------------------|---------|--------------------------------------------------|
//! | `CCNODE_BENCH_ROUNDS`      | 5       | timed rounds on the bench model (one served, one direct, one engine generation each) |
//! | `CCNODE_BENCH_WARMUP`      | 1       | untimed rounds first (each model)                |
//! | `CCNODE_BENCH_TOKENS`      | 64      | `max_tokens` of every generation                 |
//! | `CCNODE_BENCH_TINY_ROUNDS` | 40      | timed rounds on the tiny model (0: skip it)      |
//! | `CCNODE_BENCH_SEED`        | 1       | the first model seed tried (see below)           |
//! | `CCNODE_BENCH_JSON`        | unset   | also write the JSON figures to this file         |
//! | `CCNODE_BENCH_PEERS_PIN`   | 1       | 0: the in-process peers run candle's default thread count (recounted on every matrix product) instead of pinning it as the worker does |
//! | `GLIBC_TUNABLES`           | unset   | passed on to ccnoded and its workers too (allocator experiments) |
//!
//! Each round runs one greedy generation through ccnoded, one directly and
//! one on the in-process engine, never at the same time, with the same
//! prompt (108 tokens, a realistic prefill) and length; the order rotates
//! between rounds so that a drift of the machine falls on every side. All
//! texts must be equal (same weights, greedy). The "added" figures are
//! medians of the per-round differences (served minus peer), shown with
//! their interquartile range:
//! on a shared 2-vCPU machine the compute itself varies by several percent
//! from one generation to the next, far more than the goals' margins.
//!
//! - ccnoded: a new TCP connection (`TCP_NODELAY`, connect not timed), then
//!   from writing the request: time to the first SSE event with text
//!   (TTFT), to `[DONE]` (total), the gaps between text events, and the
//!   token count from the usage chunk (`stream_options.include_usage`).
//! - direct: [`Direct::greedy`]'s `first_token` (from the call, tokenising
//!   included) and `total`.
//! - Decode rate: (tokens − 1) / (total − first token), on both sides; the
//!   time added per token is the difference of the two per-token times.
//! - CPU time (`/proc/PID/task/*/schedstat`, nanoseconds) of ccnoded, the
//!   worker and this bench's client thread over each served generation, and
//!   of this process over each direct one: ccnoded's and the client's CPU
//!   per token is what the serving path costs, which on a machine whose
//!   cores all compute comes off the compute. ccnoded's idle CPU rate
//!   (health checks, the supervisor's read tick) is measured first and
//!   subtracted.
//!
//! A second model, the tiny test shape (0.1 M parameters, a fraction of a
//! millisecond per token), is served by the same ccnoded and measured the
//! same way: with next to no compute, the differences there are the
//! serving path's own latency, resolved far below the big model's noise.
//!
//! The weights are random, so the greedy text is mostly bytes that are not
//! whole UTF-8 characters, which the worker holds back until they are (one
//! text event can carry several tokens). For the time to first token to be
//! the first token's on both sides, the first generated token must be a
//! whole character: for each model the bench tries seeds from
//! `CCNODE_BENCH_SEED` on until the direct run's first token is one (an
//! ASCII byte or a merge of the test tokenizer), and prints the seed used.
//!
//! Without `--bench` (as under `cargo test --all-targets`) it is a smoke
//! run on the tiny shape only, 1 round of 8 tokens, labelled as no
//! measurement.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ccnode_testkit::bench::{count, env_f64, loadavg, metric, Summary};
use ccnode_testkit::{api, TestNode, PATIENCE};
use ccnode_worker::engine::{Engine, Request};
use ccnode_worker::reference::{Direct, Run};
use ccnode_worker::testmodel::{self, Shape};
use serde_json::{json, Value};

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");

/// The fixed prompt: plain English, 108 tokens with the test tokenizer
/// (BOS included; the run prints the count).
const PROMPT: &str = "The node starts its workers in a sandbox, verifies every model it \
serves against a signature, and answers requests from clients. Tell me what happens next:";

/// Goals of the issue.
const GOAL_TPS_OVERHEAD_PCT: f64 = 5.0;
const GOAL_ADDED_PER_TOKEN_US: f64 = 100.0;
const GOAL_ADDED_TTFT_MS: f64 = 2.0;
/// The issue asks for a model where one token takes at least this long.
const MIN_TOKEN_MS: f64 = 10.0;

/// `ccnode-worker`, built next to `ccnoded` (same profile, same target
/// directory).
fn worker_binary() -> PathBuf {
    let p = Path::new(CCNODED)
        .parent()
        .expect("ccnoded's directory")
        .join("ccnode-worker");
    if !p.is_file() {
        eprintln!(
            "\n{} is missing: cargo does not build another package's binaries for a bench.\n\
             Build it first, with the same profile and target directory:\n\n  \
             cargo build --release -p ccnode-worker && cargo bench -p ccnode-agent --bench inference\n\n\
             (for the smoke run under `cargo test --all-targets`: `cargo build -p ccnode-worker`)\n",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

/// A generated model, signed, with its trust policy, and the same files
/// loaded directly.
struct Model {
    name: &'static str,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    sig: PathBuf,
    policy: PathBuf,
    seed: u64,
    shape: Shape,
    direct: Direct,
    /// The worker's own engine, loaded the way the worker loads it (from
    /// the files' bytes), in this process.
    engine: Engine,
}

fn write_model(name: &str, shape: &Shape, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("ccnode-bench-model-")
        .tempdir()
        .expect("temp dir");
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).expect("model dir");
    testmodel::write_model(&dir, shape, seed).expect("write model");
    let key = ccnode_attest::oms::sign::key_from_seed(seed);
    let bundle = ccnode_attest::oms::sign::sign_dir_p256(&dir, &key, name).expect("sign");
    std::fs::write(tmp.path().join("model.sig"), bundle).expect("write signature");
    ccnode_attest::oms::sign::write_public_key_pem(&tmp.path().join("key.pub.pem"), &key)
        .expect("write key");
    std::fs::write(
        tmp.path().join("trust.toml"),
        format!("[[signer]]\nmodels = [\"{name}\"]\npublic_keys = [\"key.pub.pem\"]\n"),
    )
    .expect("write policy");
    (tmp, dir)
}

/// Whether token `id` of the test tokenizer decodes to whole characters on
/// its own: an ASCII byte, or a merge (merges are ASCII).
fn whole_character(id: u32) -> bool {
    !(0x80..=testmodel::EOS_TOKEN_ID).contains(&id)
}

/// The first seed from `seed` on whose model's first greedy token is a
/// whole character (see the header).
fn make_model(name: &'static str, shape: Shape, seed: u64) -> Model {
    for seed in seed..seed + 20 {
        let (tmp, dir) = write_model(name, &shape, seed);
        let direct = Direct::load(&dir).expect("direct load");
        let first = direct.greedy(PROMPT, 1).expect("direct run").tokens;
        if first.first().is_some_and(|&t| whole_character(t)) {
            let bytes: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
                .expect("model dir")
                .map(|e| {
                    let e = e.expect("dir entry");
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).expect("read model file"))
                })
                .collect();
            let files: Vec<(&str, &[u8])> = bytes
                .iter()
                .map(|(n, b)| (n.as_str(), b.as_slice()))
                .collect();
            let engine = Engine::load(&files, &candle_core::Device::Cpu).expect("engine load");
            return Model {
                engine,
                name,
                sig: tmp.path().join("model.sig"),
                policy: tmp.path().join("trust.toml"),
                _tmp: tmp,
                dir,
                seed,
                shape,
                direct,
            };
        }
    }
    panic!("20 seeds in a row whose first token is not a whole character");
}

fn start_node(models: &[&Model], worker: &Path) -> TestNode {
    let entries: String = models
        .iter()
        .map(|m| {
            format!(
                "[[inference.models]]\nname = \"{}\"\ndir = \"{}\"\nsignature = \"{}\"\ntrust_policy = \"{}\"\n\n",
                m.name,
                m.dir.display(),
                m.sig.display(),
                m.policy.display()
            )
        })
        .collect();
    // For experiments on the worker's allocator: GLIBC_TUNABLES set for
    // the bench reaches ccnoded and, through the allow-list, the worker.
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    let mut node = TestNode::new(CCNODED);
    let mut allow = "";
    if let Some(t) = &tunables {
        node = node.with_env("GLIBC_TUNABLES", t);
        allow = "env_allow = [\"GLIBC_TUNABLES\"]\n";
    }
    node.with_toml(&format!(
        "[sandbox]\nworker_user = \"nobody\"\n{allow}\n\
             [api]\nenabled = true\nlisten = \"127.0.0.1:0\"\nmax_tokens_cap = 4096\n\n\
             [inference]\nworker_binary = \"{}\"\nload_timeout = \"10m\"\n\n{entries}",
        worker.display(),
    ))
    .start()
}

/// Waits until `name` has a ready worker and returns its pid (exits with
/// the log if it never gets one).
fn wait_ready(node: &TestNode, name: &str) -> u32 {
    let deadline = Instant::now() + PATIENCE * 20;
    loop {
        let r = node.request(r#"{"v":1,"cmd":"models"}"#);
        let pid = r["result"]["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["name"] == name)
            .flat_map(|m| m["workers"].as_array().cloned().unwrap_or_default())
            .find(|w| w["state"] == "ready")
            .and_then(|w| w["pid"].as_u64());
        if let Some(pid) = pid {
            return pid as u32;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never got a ready worker: {r}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time of every thread of some processes at one moment, ns by
/// thread id (`/proc/PID/task/TID/schedstat`).
#[derive(Debug, Default)]
struct CpuSnap(std::collections::HashMap<u32, u64>);

impl CpuSnap {
    fn take(pids: &[u32]) -> CpuSnap {
        let mut m = std::collections::HashMap::new();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.filter_map(|t| t.ok()) {
                let tid = t.file_name().to_str().and_then(|n| n.parse().ok());
                let ns = std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok());
                if let (Some(tid), Some(ns)) = (tid, ns) {
                    m.insert(tid, ns);
                }
            }
        }
        CpuSnap(m)
    }

    /// CPU time since `earlier`, ns: threads started since count from
    /// zero; threads that ended meanwhile are not counted (a thread of a
    /// pool that ends after idling has nothing to add).
    fn since(&self, earlier: &CpuSnap) -> u64 {
        self.0
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// Minor page faults of some processes so far (`/proc/PID/stat`, field 10):
/// the prefill's fresh allocations show here.
fn minor_faults(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().nth(7)?.parse::<u64>().ok()
        })
        .sum()
}

/// `pid` and every process below it (the jail, its init, the worker).
fn with_descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold anything.
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// CPU time of the calling thread so far (ns).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One streamed completion through ccnoded.
#[derive(Debug)]
struct Served {
    ttft: Duration,
    total: Duration,
    tokens: u64,
    prompt_tokens: u64,
    finish: String,
    text: String,
    text_events: usize,
    /// Between consecutive text events.
    gaps: Vec<Duration>,
    /// CPU time over the generation, ns: ccnoded, the worker, this client.
    cpu_ccnoded: u64,
    cpu_worker: u64,
    cpu_client: u64,
    /// Minor faults of the worker up to the first token, and over the run.
    faults_first: u64,
    faults: u64,
    /// The worker's own time from reading the request to its first token
    /// (`ccnode_inference_worker_first_token_seconds`, this request's
    /// share of its sum).
    worker_first: Duration,
}

/// The pids whose CPU time a served generation accounts.
#[derive(Debug, Clone)]
struct Pids {
    ccnoded: u32,
    /// The jail and everything in it.
    worker: Vec<u32>,
    /// ccnoded's metrics endpoint, and the model's series there.
    metrics: SocketAddr,
    model: &'static str,
}

impl Pids {
    fn snap(&self) -> (CpuSnap, CpuSnap) {
        (CpuSnap::take(&[self.ccnoded]), CpuSnap::take(&self.worker))
    }

    /// The sum of the worker-reported times to first token, seconds.
    fn worker_first_sum(&self) -> f64 {
        let (status, body) = ccnode_testkit::http_get(self.metrics, "/metrics");
        assert_eq!(status, 200, "metrics: {body}");
        metric(
            &body,
            &format!(
                "ccnode_inference_worker_first_token_seconds_sum{{model=\"{}\"}}",
                self.model
            ),
        )
        .unwrap_or(0.0)
    }
}

fn served(addr: SocketAddr, model: &str, max_tokens: usize, pids: &Pids) -> Served {
    let body = json!({
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sock = TcpStream::connect(addr).expect("connect to the API");
    sock.set_nodelay(true).expect("nodelay");
    sock.set_read_timeout(Some(PATIENCE * 4))
        .expect("read timeout");
    let mut r = BufReader::new(sock.try_clone().expect("clone socket"));
    let mut out = Served {
        ttft: Duration::ZERO,
        total: Duration::ZERO,
        tokens: 0,
        prompt_tokens: 0,
        finish: String::new(),
        text: String::new(),
        text_events: 0,
        gaps: Vec::new(),
        cpu_ccnoded: 0,
        cpu_worker: 0,
        cpu_client: 0,
        faults_first: 0,
        faults: 0,
        worker_first: Duration::ZERO,
    };
    let worker_first0 = pids.worker_first_sum();
    let faults0 = minor_faults(&pids.worker);
    let cpu0 = (pids.snap(), thread_cpu_ns());
    let start = Instant::now();
    sock.write_all(request.as_bytes()).expect("send request");
    let (status, headers) = api::read_head(&mut r);
    let chunked = api::is_chunked(&headers);
    if status != 200 {
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        panic!(
            "ccnoded answered {status}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(chunked, "the stream is not chunked");
    let mut pending = String::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = api::next_chunk(&mut r) {
        let now = Instant::now();
        pending.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
        while let Some(at) = pending.find("\n\n") {
            let block: String = pending.drain(..at + 2).collect();
            let data = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                out.total = now - start;
                out.cpu_client = thread_cpu_ns().saturating_sub(cpu0.1);
                let (ccnoded, worker) = pids.snap();
                out.cpu_ccnoded = ccnoded.since(&cpu0.0 .0);
                out.cpu_worker = worker.since(&cpu0.0 .1);
                out.faults = minor_faults(&pids.worker) - faults0;
                out.worker_first =
                    Duration::from_secs_f64((pids.worker_first_sum() - worker_first0).max(0.0));
                return out;
            }
            let v: Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"));
            assert!(v.get("error").is_none(), "error event: {v}");
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                out.tokens = u["completion_tokens"].as_u64().expect("completion_tokens");
                out.prompt_tokens = u["prompt_tokens"].as_u64().expect("prompt_tokens");
            }
            let choice = &v["choices"][0];
            if let Some(f) = choice["finish_reason"].as_str() {
                out.finish = f.to_owned();
            }
            let text = choice["text"].as_str().unwrap_or("");
            if !text.is_empty() {
                match last {
                    None => {
                        out.ttft = now - start;
                        out.faults_first = minor_faults(&pids.worker) - faults0;
                    }
                    Some(l) => out.gaps.push(now - l),
                }
                last = Some(now);
                out.text_events += 1;
                out.text.push_str(text);
            }
        }
    }
    panic!("the stream ended without [DONE]");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Per-token decode time in ms: (total − first token) / (tokens − 1).
fn per_token_ms(first: Duration, total: Duration, tokens: u64) -> f64 {
    ms(total.saturating_sub(first)) / (tokens.saturating_sub(1).max(1)) as f64
}

/// Nearest-rank quantile `q` of `v` (the median by interpolation).
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if q == 0.5 {
        return if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
    }
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    v[rank - 1]
}

/// Median and interquartile range.
#[derive(Debug, Clone, Copy)]
struct Spread {
    p25: f64,
    p50: f64,
    p75: f64,
}

impl Spread {
    fn of(v: Vec<f64>) -> Spread {
        Spread {
            p25: quantile(v.clone(), 0.25),
            p50: quantile(v.clone(), 0.5),
            p75: quantile(v, 0.75),
        }
    }

    fn json(&self) -> Value {
        json!({"p25": self.p25, "median": self.p50, "p75": self.p75})
    }
}

/// One generation in this process: [`Direct`] or the worker's [`Engine`].
#[derive(Debug)]
struct Local {
    first_token: Duration,
    total: Duration,
    tokens: u64,
    text: String,
    /// CPU time of this process over the generation, ns.
    cpu: u64,
    /// Minor faults of this process up to the first token (the engine
    /// only; the direct peer's are counted over the run), and over the run.
    faults_first: u64,
    faults: u64,
}

impl Local {
    fn per_token_ms(&self) -> f64 {
        per_token_ms(self.first_token, self.total, self.tokens)
    }
}

fn run_direct(m: &Model, max_tokens: usize) -> (Local, usize) {
    let me = std::process::id();
    let c = CpuSnap::take(&[me]);
    let f0 = minor_faults(&[me]);
    let r: Run = m.direct.greedy(PROMPT, max_tokens).expect("direct run");
    let cpu = CpuSnap::take(&[me]).since(&c);
    let faults = minor_faults(&[me]) - f0;
    let local = Local {
        first_token: r.first_token,
        total: r.total,
        tokens: r.tokens.len() as u64,
        text: r.text,
        cpu,
        faults_first: faults,
        faults,
    };
    (local, r.prompt_tokens)
}

/// The worker's engine, called as the worker calls it (greedy, no stop
/// strings), timed like [`Direct::greedy`]: the first token is the first
/// piece of text (the seed makes it a whole character).
fn run_engine(m: &Model, max_tokens: usize) -> Local {
    let me = std::process::id();
    let req = Request {
        prompt: PROMPT.to_owned(),
        max_tokens: max_tokens as u32,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: Vec::new(),
    };
    let c = CpuSnap::take(&[me]);
    let f0 = minor_faults(&[me]);
    let mut faults_first = 0;
    let start = Instant::now();
    let mut first = None;
    let mut text = String::new();
    let out = m
        .engine
        .generate(&req, &|| false, &mut |piece| {
            first.get_or_insert_with(|| {
                faults_first = minor_faults(&[me]) - f0;
                start.elapsed()
            });
            text.push_str(piece);
        })
        .expect("engine run");
    let faults = minor_faults(&[me]) - f0;
    let total = start.elapsed();
    Local {
        first_token: first.unwrap_or(total),
        total,
        tokens: u64::from(out.completion_tokens),
        text,
        cpu: CpuSnap::take(&[me]).since(&c),
        faults_first,
        faults,
    }
}

/// The in-process peers, in the order the figures list them.
const PEERS: [&str; 2] = ["direct", "engine"];

/// One round's figures.
#[derive(Debug)]
struct Round {
    served: Served,
    /// [`PEERS`], in that order.
    peers: [Local; 2],
    prompt_tokens: usize,
    /// Which ran first, second, third.
    order: [&'static str; 3],
}

impl Round {
    fn served_per_token_ms(&self) -> f64 {
        per_token_ms(self.served.ttft, self.served.total, self.served.tokens)
    }
    fn ttft_added_ms(&self, p: usize) -> f64 {
        ms(self.served.ttft) - ms(self.peers[p].first_token)
    }
    fn added_us(&self, p: usize) -> f64 {
        (self.served_per_token_ms() - self.peers[p].per_token_ms()) * 1e3
    }
    /// 1 − served rate / peer rate, in %.
    fn overhead_pct(&self, p: usize) -> f64 {
        (1.0 - self.peers[p].per_token_ms() / self.served_per_token_ms()) * 100.0
    }
    fn equal(&self) -> bool {
        self.peers.iter().all(|l| l.text == self.served.text)
    }
}

/// One round: ccnoded, [`Direct`] and the engine one after the other, in
/// an order that rotates with `i`.
fn run_round(
    addr: SocketAddr,
    m: &Model,
    max_tokens: usize,
    pids: &Pids,
    i: usize,
    pause: Duration,
) -> Round {
    let mut order = ["ccnoded", "direct", "engine"];
    order.rotate_left(i % 3);
    let mut served_run = None;
    let mut direct = None;
    let mut engine = None;
    for who in order {
        match who {
            "ccnoded" => served_run = Some(served(addr, m.name, max_tokens, pids)),
            "direct" => direct = Some(run_direct(m, max_tokens)),
            _ => engine = Some(run_engine(m, max_tokens)),
        }
        std::thread::sleep(pause);
    }
    let (direct, prompt_tokens) = direct.expect("ran");
    Round {
        served: served_run.expect("ran"),
        peers: [direct, engine.expect("ran")],
        prompt_tokens,
        order,
    }
}

/// The goals, judged against one peer.
#[derive(Debug, Clone, Copy)]
struct Verdicts {
    ttft: bool,
    per_token: bool,
    tps: bool,
}

/// One model's rounds, summarised.
struct Case<'a> {
    model: &'a Model,
    rounds: Vec<Round>,
    max_tokens: usize,
    /// ccnoded's CPU per second when idle, ns.
    idle_ns_per_s: f64,
}

impl Case<'_> {
    fn spread(&self, f: impl Fn(&Round) -> f64) -> Spread {
        Spread::of(self.rounds.iter().map(f).collect())
    }

    /// ccnoded's CPU over a served generation, idle rate subtracted, µs.
    fn ccnoded_cpu_us(&self, r: &Round) -> f64 {
        let idle = self.idle_ns_per_s * r.served.total.as_secs_f64();
        (r.served.cpu_ccnoded as f64 - idle).max(0.0) / 1e3
    }

    fn print_rounds(&self) {
        println!(
            "{:>5} {:>24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>6} {:>8} {:>8} {:>5} {:>13} {:>20}",
            "round",
            "order",
            "ttft ccn",
            "ttft dir",
            "ttft eng",
            "wrk1",
            "path",
            "ms/t ccn",
            "ms/t dir",
            "ms/t eng",
            "+µs/t dir",
            "+µs/t eng",
            "tokens",
            "events",
            "ccn µs/t",
            "cli µs/t",
            "equal",
            "flt1 ccn/eng",
            "flt ccn/dir/eng"
        );
        for (i, r) in self.rounds.iter().enumerate() {
            let n = r.served.tokens.max(1) as f64;
            println!(
                "{:>5} {:>24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.3} {:>9.3} {:>9.3} {:>+10.1} {:>+10.1} {:>7} {:>6} {:>8.1} {:>8.1} {:>5} {:>13} {:>20}",
                i + 1,
                r.order.join(","),
                ms(r.served.ttft),
                ms(r.peers[0].first_token),
                ms(r.peers[1].first_token),
                ms(r.served.worker_first),
                ms(r.served.ttft) - ms(r.served.worker_first),
                r.served_per_token_ms(),
                r.peers[0].per_token_ms(),
                r.peers[1].per_token_ms(),
                r.added_us(0),
                r.added_us(1),
                format!("{}/{}", r.served.tokens, r.peers[0].tokens),
                r.served.text_events,
                self.ccnoded_cpu_us(r) / n,
                r.served.cpu_client as f64 / 1e3 / n,
                r.equal(),
                format!("{}/{}", r.served.faults_first, r.peers[1].faults_first),
                format!(
                    "{}/{}/{}",
                    r.served.faults, r.peers[0].faults, r.peers[1].faults
                )
            );
        }
    }

    fn report(&self, goals: bool) -> Value {
        let r0 = &self.rounds[0];
        let n = self.rounds.len();
        let ttft_s = self.spread(|r| ms(r.served.ttft));
        let pt_s = self.spread(Round::served_per_token_ms);
        let total_s = self.spread(|r| ms(r.served.total));
        let per_token = |r: &Round, ns: f64| ns / r.served.tokens.max(1) as f64;
        let cpu_ccn = self.spread(|r| per_token(r, self.ccnoded_cpu_us(r)));
        let cpu_cli = self.spread(|r| per_token(r, r.served.cpu_client as f64 / 1e3));
        let cpu_wrk = self.spread(|r| per_token(r, r.served.cpu_worker as f64 / 1e6));
        let mut gaps: Vec<Duration> = self
            .rounds
            .iter()
            .flat_map(|r| r.served.gaps.clone())
            .collect();
        let gap = (!gaps.is_empty()).then(|| Summary::of(&mut gaps));
        let equal = self.rounds.iter().filter(|r| r.equal()).count();
        let full_length = self.rounds.iter().all(|r| {
            r.served.finish == "length"
                && r.served.tokens == self.max_tokens as u64
                && r.peers.iter().all(|l| l.tokens == self.max_tokens as u64)
        });
        let mark = |met: bool| match (goals, met) {
            (false, _) => "",
            (true, true) => "met",
            (true, false) => "MISSED",
        };

        println!(
            "{}: medians over {n} rounds; added = median of the per-round differences, ccnoded minus peer [p25 .. p75]",
            self.model.name
        );
        println!(
            "  ccnoded: time to first token {:.3} ms, {:.3} ms per token ({:.3} tokens/s), whole generation {:.1} ms",
            ttft_s.p50,
            pt_s.p50,
            1e3 / pt_s.p50,
            total_s.p50
        );
        let mut peers_json = serde_json::Map::new();
        let mut verdicts = Vec::new();
        for (p, name) in PEERS.iter().enumerate() {
            let ttft = self.spread(|r| ms(r.peers[p].first_token));
            let pt = self.spread(|r| r.peers[p].per_token_ms());
            let total = self.spread(|r| ms(r.peers[p].total));
            let cpu =
                self.spread(|r| r.peers[p].cpu as f64 / 1e6 / r.peers[p].tokens.max(1) as f64);
            let ttft_add = self.spread(|r| r.ttft_added_ms(p));
            let added = self.spread(|r| r.added_us(p));
            let overhead = self.spread(|r| r.overhead_pct(p));
            let v = Verdicts {
                ttft: ttft_add.p50 < GOAL_ADDED_TTFT_MS,
                per_token: added.p50 < GOAL_ADDED_PER_TOKEN_US,
                tps: overhead.p50 < GOAL_TPS_OVERHEAD_PCT,
            };
            verdicts.push(v);
            println!(
                "  vs {name}: TTFT {:.3} ms, {:.3} ms per token ({:.3} tokens/s), whole {:.1} ms, CPU {:.3} ms per token",
                ttft.p50,
                pt.p50,
                1e3 / pt.p50,
                total.p50,
                cpu.p50
            );
            println!(
                "    added TTFT {:+.3} ms [{:+.3} .. {:+.3}] (goal < +2 ms) {}; added per token {:+.1} µs [{:+.1} .. {:+.1}] \
                 (goal < +100 µs) {}; tokens/s overhead {:+.2}% [{:+.2} .. {:+.2}] (goal < 5%) {}",
                ttft_add.p50,
                ttft_add.p25,
                ttft_add.p75,
                mark(v.ttft),
                added.p50,
                added.p25,
                added.p75,
                mark(v.per_token),
                overhead.p50,
                overhead.p25,
                overhead.p75,
                mark(v.tps)
            );
            peers_json.insert(
                (*name).to_owned(),
                json!({
                    "ttft_ms": ttft.p50, "ms_per_token": pt.p50, "tokens_per_s": 1e3 / pt.p50,
                    "total_ms": total.p50, "cpu_ms_per_token": cpu.p50,
                    "added_ttft_ms": ttft_add.json(), "added_us_per_token": added.json(),
                    "tps_overhead_pct": overhead.json(),
                    "goals": goals.then(|| json!({
                        "added_ttft_under_2ms": v.ttft,
                        "added_per_token_under_100us": v.per_token,
                        "tps_overhead_under_5pct": v.tps,
                    })),
                }),
            );
        }
        println!(
            "  CPU per token over ccnoded's generations: ccnoded {:.1} µs [{:.1} .. {:.1}] (its idle {:.1} µs/s \
             subtracted), client {:.1} µs, worker {:.3} ms",
            cpu_ccn.p50,
            cpu_ccn.p25,
            cpu_ccn.p75,
            self.idle_ns_per_s / 1e3,
            cpu_cli.p50,
            cpu_wrk.p50
        );
        let wrk1 = self.spread(|r| ms(r.served.worker_first));
        let share = self.spread(|r| ms(r.served.ttft) - ms(r.served.worker_first));
        let in_worker = self.spread(|r| ms(r.served.worker_first) - ms(r.peers[1].first_token));
        println!(
            "  TTFT split: the worker's own (request read to first token) {:.3} ms [{:.3} .. {:.3}]; the rest \
             (ccnoded, sockets, client) {:.3} ms [{:.3} .. {:.3}]; the worker's own less the engine's TTFT \
             {:+.3} ms [{:+.3} .. {:+.3}]",
            wrk1.p50,
            wrk1.p25,
            wrk1.p75,
            share.p50,
            share.p25,
            share.p75,
            in_worker.p50,
            in_worker.p25,
            in_worker.p75
        );
        if let Some(g) = &gap {
            println!(
                "  gaps between ccnoded's text events: n {} p50 {:.3} ms p90 {:.3} p99 {:.3} max {:.3}",
                g.n,
                g.p50 / 1e3,
                g.p90 / 1e3,
                g.p99 / 1e3,
                g.max / 1e3
            );
        }
        println!(
            "  model seed {}, {} parameters; prompt {} tokens (ccnoded counted {}); every generation ran to \
             max_tokens: {full_length}; texts equal in {equal} of {n} rounds",
            self.model.seed,
            self.model.shape.parameters(),
            r0.prompt_tokens,
            r0.served.prompt_tokens,
        );
        let direct_pt = self.spread(|r| r.peers[0].per_token_ms()).p50;
        let slow_enough = direct_pt >= MIN_TOKEN_MS;
        if goals {
            println!(
                "  one token takes {direct_pt:.2} ms in the direct run: {} the {MIN_TOKEN_MS} ms the issue asks for",
                if slow_enough { "at least" } else { "LESS than" }
            );
        }
        for (i, r) in self.rounds.iter().enumerate().filter(|(_, r)| !r.equal()) {
            println!(
                "  round {}: TEXTS DIFFER\n    ccnoded {:?}\n    direct  {:?}\n    engine  {:?}",
                i + 1,
                r.served.text,
                r.peers[0].text,
                r.peers[1].text
            );
        }

        let rows: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                let local = |l: &Local| {
                    json!({
                        "ttft_ms": ms(l.first_token), "total_ms": ms(l.total), "tokens": l.tokens,
                        "ms_per_token": l.per_token_ms(), "cpu_ms": l.cpu as f64 / 1e6,
                        "minor_faults_first_token": l.faults_first, "minor_faults": l.faults,
                    })
                };
                json!({
                    "order": r.order,
                    "ccnoded": {
                        "ttft_ms": ms(r.served.ttft), "total_ms": ms(r.served.total),
                        "tokens": r.served.tokens, "text_events": r.served.text_events,
                        "ms_per_token": r.served_per_token_ms(), "finish": r.served.finish,
                        "cpu_ccnoded_us": r.served.cpu_ccnoded as f64 / 1e3,
                        "cpu_worker_ms": r.served.cpu_worker as f64 / 1e6,
                        "cpu_client_us": r.served.cpu_client as f64 / 1e3,
                        "worker_minor_faults_first_token": r.served.faults_first,
                        "worker_minor_faults": r.served.faults,
                        "worker_first_token_ms": ms(r.served.worker_first),
                    },
                    "direct": local(&r.peers[0]),
                    "engine": local(&r.peers[1]),
                    "texts_equal": r.equal(),
                })
            })
            .collect();
        json!({
            "model": self.model.name,
            "seed": self.model.seed,
            "parameters": self.model.shape.parameters(),
            "prompt_tokens": r0.prompt_tokens,
            "max_tokens": self.max_tokens,
            "rounds": rows,
            "ccnoded": {
                "ttft_ms": ttft_s.p50, "ms_per_token": pt_s.p50, "tokens_per_s": 1e3 / pt_s.p50,
                "total_ms": total_s.p50,
            },
            "peers": peers_json,
            "ttft_split_ms": {
                "worker_first_token": wrk1.json(),
                "rest": share.json(),
                "worker_less_engine": in_worker.json(),
            },
            "cpu_per_token": {
                "ccnoded_us": cpu_ccn.json(), "client_us": cpu_cli.json(),
                "worker_ms": cpu_wrk.json(),
                "ccnoded_idle_us_per_s": self.idle_ns_per_s / 1e3,
            },
            "ccnoded_event_gaps": gap.map(|g| g.json()),
            "one_token_at_least_10ms": goals.then_some(slow_enough),
            "texts_equal": equal == n,
            "full_length": full_length,
            "text_events": text_events_note(&self.rounds),
            "text": r0.served.text,
        })
    }
}

fn text_events_note(rounds: &[Round]) -> Value {
    json!(rounds
        .iter()
        .map(|r| r.served.text_events)
        .collect::<Vec<_>>())
}

/// ccnoded's CPU per second over `d` of idleness, ns.
fn idle_rate(pid: u32, d: Duration) -> f64 {
    let c = CpuSnap::take(&[pid]);
    std::thread::sleep(d);
    CpuSnap::take(&[pid]).since(&c) as f64 / d.as_secs_f64()
}

#[allow(clippy::too_many_arguments)]
fn measure<'a>(
    node: &TestNode,
    addr: SocketAddr,
    m: &'a Model,
    rounds: usize,
    warmup: usize,
    max_tokens: usize,
    pause: Duration,
    idle: Duration,
) -> Case<'a> {
    let pids = Pids {
        ccnoded: node.pid(),
        worker: with_descendants(wait_ready(node, m.name)),
        metrics: node.http_addr.expect("started"),
        model: m.name,
    };
    assert!(
        pids.worker.len() > 1,
        "no process below the jail {}",
        pids.worker[0]
    );
    for i in 0..warmup {
        let _ = run_round(addr, m, max_tokens, &pids, i, pause);
    }
    // ccnoded's idle CPU rate, right before the timed rounds.
    let idle_ns_per_s = idle_rate(pids.ccnoded, idle);
    let rounds = (0..rounds)
        .map(|i| run_round(addr, m, max_tokens, &pids, i, pause))
        .collect();
    Case {
        model: m,
        rounds,
        max_tokens,
        idle_ns_per_s,
    }
}

fn main() {
    // The worker fixes candle's thread count at start (engine::
    // pin_thread_count): the in-process peers do the same unless told not
    // to, so that both sides run candle alike and the difference is the
    // serving path.
    let pinned = std::env::var("CCNODE_BENCH_PEERS_PIN").map_or(true, |v| v != "0");
    let peer_threads = pinned.then(ccnode_worker::engine::pin_thread_count);
    let measuring = std::env::args().any(|a| a == "--bench");
    let rounds = count("CCNODE_BENCH_ROUNDS", if measuring { 5 } else { 1 }, 1.0, 1);
    let tiny_rounds = if measuring {
        env_f64("CCNODE_BENCH_TINY_ROUNDS", 40.0) as usize
    } else {
        0
    };
    let warmup = env_f64("CCNODE_BENCH_WARMUP", 1.0) as usize;
    let max_tokens = count(
        "CCNODE_BENCH_TOKENS",
        if measuring { 64 } else { 8 },
        1.0,
        2,
    );
    let seed = env_f64("CCNODE_BENCH_SEED", 1.0) as u64;
    let worker = worker_binary();
    let load_before = loadavg();

    let t = Instant::now();
    let big = make_model(
        "bench",
        if measuring {
            Shape::bench()
        } else {
            Shape::tiny()
        },
        seed,
    );
    let tiny = (tiny_rounds > 0).then(|| make_model("tiny", Shape::tiny(), seed));
    let models_ms = ms(t.elapsed());
    let t = Instant::now();
    let mut served_models = vec![&big];
    served_models.extend(tiny.as_ref());
    let node = start_node(&served_models, &worker);
    for m in &served_models {
        wait_ready(&node, m.name);
    }
    let node_ready_ms = ms(t.elapsed());
    let addr = node.api_addr();
    let idle = Duration::from_secs(if measuring { 3 } else { 1 });

    println!(
        "inference ({}): {} parameters ({} layers, hidden {}), f32, CPU; prompt {} bytes, max_tokens {max_tokens}, \
         {rounds} rounds after {warmup} warm-up; models written, signed and loaded directly in {models_ms:.0} ms, \
         ccnoded ready in {node_ready_ms:.0} ms",
        if measuring {
            "measurement"
        } else {
            "smoke run on the tiny shape, no measurement"
        },
        big.shape.parameters(),
        big.shape.num_hidden_layers,
        big.shape.hidden_size,
        PROMPT.len(),
    );

    let pause = Duration::from_millis(200);
    let main_case = measure(&node, addr, &big, rounds, warmup, max_tokens, pause, idle);
    main_case.print_rounds();
    let main_report = main_case.report(measuring);
    let mut equal = main_report["texts_equal"] == true;
    let tiny_report = tiny.as_ref().map(|m| {
        let case = measure(
            &node,
            addr,
            m,
            tiny_rounds,
            warmup.max(3),
            max_tokens,
            Duration::from_millis(20),
            idle,
        );
        println!(
            "serving path alone, on the tiny model ({} parameters, same prompt and length):",
            m.shape.parameters()
        );
        let r = case.report(false);
        equal &= r["texts_equal"] == true;
        r
    });
    let load_after = loadavg();
    println!("load average {load_before} -> {load_after}");
    println!(
        "peers' candle threads: {}",
        match peer_threads {
            Some(n) => format!("pinned to {n} (RAYON_NUM_THREADS), as the worker pins its own"),
            None => "candle's default (CCNODE_BENCH_PEERS_PIN=0): it recounts the cores on every matrix product".into(),
        }
    );

    let report = json!({
        "bench": "inference",
        "measuring": measuring,
        "bench_model": main_report,
        "tiny_model": tiny_report,
        "load": {"before": load_before, "after": load_after},
        "peers_threads_pinned": peer_threads,
    });
    println!("BENCH_JSON {report}");
    if let Ok(path) = std::env::var("CCNODE_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("json"))
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    if !equal {
        eprintln!("ccnoded's text differs from the direct run's (see above)");
        std::process::exit(1);
    }
}
