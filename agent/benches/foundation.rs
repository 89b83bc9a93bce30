//! The foundation benchmark: admin-socket round trips, `/metrics` latency
//! and size, and the daemon's idle RSS, measured against the real `ccnoded`
//! binary started by the testkit.
//!
//! A plain harness, not criterion: what matters here is the distribution of
//! single round trips (p50/p99/max), not a mean with a confidence interval.
//!
//! Run: `cargo bench -p ccnode-agent --bench foundation`. Results are
//! printed as a table and as one `BENCH_JSON {...}` line. docs/benchmarks.md
//! records the machine, the command and the figures.
//!
//! Counts can be changed through the environment:
//!
//! | variable                      | default | meaning                                  |
//! |-------------------------------|---------|------------------------------------------|
//! | `CCNODE_BENCH_SCALE`          | 1.0     | multiplies every count below (0.05 = quick run) |
//! | `CCNODE_BENCH_SINGLE`         | 20000   | round trips at 1 client                  |
//! | `CCNODE_BENCH_CLIENTS`        | 32      | concurrent clients                       |
//! | `CCNODE_BENCH_PER_CLIENT`     | 2000    | round trips per concurrent client        |
//! | `CCNODE_BENCH_WARMUP`         | 1000    | warm-up round trips (per connection)     |
//! | `CCNODE_BENCH_METRICS`        | 2000    | keep-alive `/metrics` GETs               |
//! | `CCNODE_BENCH_METRICS_CLOSE`  | 500     | `/metrics` GETs on a new connection each |
//! | `CCNODE_BENCH_IDLE_SECS`      | 5       | idle time before each RSS reading        |
//!
//! (Counts are not scaled below 10; `CCNODE_BENCH_CLIENTS` and
//! `CCNODE_BENCH_IDLE_SECS` are not scaled.) Without `--bench`, as under
//! `cargo test --all-targets`, it is a smoke run: scale 0.01 and 0.5 s idle
//! waits unless the variables say otherwise, labelled as no measurement.

use std::io::{BufRead, BufReader, Write};

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ccnode_testkit::bench::{count, env_f64, loadavg, metric, proc_status, HttpClient, Summary};
use ccnode_testkit::TestNode;
use serde_json::json;

const STATUS: &[u8] = b"{\"v\":1,\"cmd\":\"status\"}\n";

/// One persistent admin connection.
struct AdminClient {
    write: UnixStream,
    read: BufReader<UnixStream>,
    line: String,
}

impl AdminClient {
    fn new(node: &TestNode) -> AdminClient {
        let write = node.connect();
        let read = BufReader::new(write.try_clone().expect("clone admin stream"));
        AdminClient {
            write,
            read,
            line: String::with_capacity(1024),
        }
    }

    /// One `status` round trip; panics on anything but an ok response.
    fn status(&mut self) -> Duration {
        let start = Instant::now();
        self.write.write_all(STATUS).expect("write request");
        self.line.clear();
        let n = self.read.read_line(&mut self.line).expect("read response");
        let elapsed = start.elapsed();
        assert!(
            n > 0 && self.line.contains("\"ok\":true"),
            "bad admin response: {:?}",
            self.line
        );
        elapsed
    }

    fn run(&mut self, warmup: usize, n: usize) -> Vec<Duration> {
        for _ in 0..warmup {
            self.status();
        }
        (0..n).map(|_| self.status()).collect()
    }
}

/// Waits until the daemon has released every admin connection, so the next
/// phase gets the whole connection cap.
fn wait_for_no_admin_connections(node: &TestNode) {
    let deadline = Instant::now() + ccnode_testkit::PATIENCE;
    loop {
        let (_, body) = node.http_get("/metrics");
        if metric(&body, "ccnode_admin_connections") == Some(0.0) {
            return;
        }
        assert!(Instant::now() < deadline, "admin connections did not drain");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kib_to_mib(v: &serde_json::Value) -> f64 {
    v["vm_rss_kib"].as_u64().unwrap_or(0) as f64 / 1024.0
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs the target
    // without it: do a minimal run then, so the bench stays compiled and
    // working without taking minutes.
    let benching = std::env::args().any(|a| a == "--bench");
    let scale = env_f64("CCNODE_BENCH_SCALE", if benching { 1.0 } else { 0.01 });
    let single = count("CCNODE_BENCH_SINGLE", 20_000, scale, 10);
    let clients = env_f64("CCNODE_BENCH_CLIENTS", 32.0) as usize;
    let per_client = count("CCNODE_BENCH_PER_CLIENT", 2_000, scale, 10);
    let warmup = count("CCNODE_BENCH_WARMUP", 1_000, scale, 10);
    let metrics_n = count("CCNODE_BENCH_METRICS", 2_000, scale, 10);
    let metrics_close_n = count("CCNODE_BENCH_METRICS_CLOSE", 500, scale, 10);
    let idle = Duration::from_secs_f64(env_f64(
        "CCNODE_BENCH_IDLE_SECS",
        if benching { 5.0 } else { 0.5 },
    ));
    assert!(clients >= 1, "CCNODE_BENCH_CLIENTS must be at least 1");

    let load_before = loadavg();
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).start();
    let pid = node.pid();
    let addr = node.http_addr.expect("metrics address");

    // Idle RSS after start.
    std::thread::sleep(idle);
    let rss_idle = proc_status(pid);

    // Admin, 1 client.
    let mut one = AdminClient::new(&node);
    let mut lat = one.run(warmup, single);
    drop(one);
    let admin_1 = Summary::of(&mut lat);

    // Admin, N clients: each connects and warms up, then all start the
    // measured loop together.
    wait_for_no_admin_connections(&node);
    let node = Arc::new(node);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let node = node.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = AdminClient::new(&node);
                for _ in 0..warmup {
                    c.status();
                }
                barrier.wait();
                let lat: Vec<Duration> = (0..per_client).map(|_| c.status()).collect();
                // Hold the connection until everyone is done, so the load
                // stays at `clients` connections to the end.
                barrier.wait();
                lat
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    barrier.wait();
    let wall = started.elapsed();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    let admin_n = Summary::of(&mut lat);
    let admin_n_rps = admin_n.n as f64 / wall.as_secs_f64();
    let node = Arc::into_inner(node).expect("client threads are done");

    // /metrics over one keep-alive connection.
    let mut http = HttpClient::new(addr);
    for _ in 0..warmup.min(metrics_n) {
        http.get("/metrics");
    }
    let mut metrics_size = 0;
    let mut lat: Vec<Duration> = (0..metrics_n)
        .map(|_| {
            let (d, size) = http.get("/metrics");
            metrics_size = size;
            d
        })
        .collect();
    drop(http);
    let metrics_ka = Summary::of(&mut lat);

    // /metrics with a new connection per request (the testkit's client:
    // connect, GET with `Connection: close`, read to EOF).
    let mut lat: Vec<Duration> = (0..metrics_close_n)
        .map(|_| {
            let start = Instant::now();
            let (status, _) = ccnode_testkit::http_get(addr, "/metrics");
            let d = start.elapsed();
            assert_eq!(status, 200);
            d
        })
        .collect();
    let metrics_close = Summary::of(&mut lat);

    // Counters the daemon kept: every request answered, none refused.
    let (_, body) = node.http_get("/metrics");
    let refused = metric(
        &body,
        "ccnode_admin_refused_connections_total{reason=\"connection_limit\"}",
    )
    .unwrap_or(-1.0);

    // Idle RSS after the load.
    std::thread::sleep(idle);
    let rss_after = proc_status(pid);
    let load_after = loadavg();
    drop(node);

    let rss_idle_mib = kib_to_mib(&rss_idle);
    let rss_after_mib = kib_to_mib(&rss_after);
    let p99_goal_us = 2000.0;
    let rss_goal_mib = 20.0;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };

    println!();
    println!("ccnode foundation benchmark (ccnoded pid {pid}, 2 runtime worker threads)");
    if !benching {
        println!("smoke run (no --bench: `cargo test` mode, minimal counts): not a measurement");
    }
    println!(
        "load average before: {load_before}; after: {load_after}; idle wait {:.1}s",
        idle.as_secs_f64()
    );
    println!();
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (µs)", "n", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "{:<34} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            name, s.n, s.mean, s.p50, s.p90, s.p99, s.p999, s.max
        );
    };
    row("admin status, 1 client", &admin_1);
    row(&format!("admin status, {clients} clients"), &admin_n);
    row("/metrics, keep-alive", &metrics_ka);
    row("/metrics, new connection each", &metrics_close);
    println!();
    println!(
        "admin throughput at {clients} clients: {admin_n_rps:.0} req/s; connection_limit refusals: {refused}"
    );
    println!("/metrics response body: {metrics_size} bytes");
    println!(
        "ccnoded RSS idle after start: {rss_idle_mib:.2} MiB (threads {}); idle after load: {rss_after_mib:.2} MiB (peak VmHWM {:.2} MiB)",
        rss_idle["threads"],
        rss_after["vm_hwm_kib"].as_u64().unwrap_or(0) as f64 / 1024.0
    );
    println!();
    println!(
        "goal: admin p99 < 2 ms at {clients} clients: {:.3} ms -> {}",
        admin_n.p99 / 1000.0,
        verdict(admin_n.p99 < p99_goal_us)
    );
    println!(
        "goal: idle RSS < 20 MiB: {rss_idle_mib:.2} MiB after start, {rss_after_mib:.2} MiB after load -> {}",
        verdict(rss_idle_mib < rss_goal_mib && rss_after_mib < rss_goal_mib)
    );

    let report = json!({
        "bench": "foundation",
        "measurement": benching,
        "scale": scale,
        "load_before": load_before,
        "load_after": load_after,
        "admin_1_client": admin_1.json(),
        "admin_concurrent": {
            "clients": clients,
            "rps": admin_n_rps.round(),
            "connection_limit_refusals": refused,
            "latency": admin_n.json(),
        },
        "metrics_keepalive": metrics_ka.json(),
        "metrics_new_connection": metrics_close.json(),
        "metrics_body_bytes": metrics_size,
        "rss_idle_start": rss_idle,
        "rss_idle_after_load": rss_after,
        "goals": {
            "admin_p99_32_clients_under_2ms": admin_n.p99 < p99_goal_us,
            "idle_rss_under_20mib": rss_idle_mib < rss_goal_mib && rss_after_mib < rss_goal_mib,
        },
    });
    println!("BENCH_JSON {report}");
}
