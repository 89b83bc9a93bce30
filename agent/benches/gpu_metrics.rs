//! The GPU telemetry benchmark: `/metrics` latency and size with 8
//! simulated GPUs in 7 MIG instances each, and ccnoded's CPU use at the
//! default 10 s poll interval, against the real `ccnoded` binary.
//!
//! Run: `cargo bench -p ccnode-agent --bench gpu_metrics`. Prints a table and
//! one `BENCH_JSON {...}` line; docs/benchmarks.md records the figures.
//!
//! | variable                  | default | meaning                                   |
//! |---------------------------|---------|-------------------------------------------|
//! | `CCNODE_BENCH_SCALE`      | 1.0     | multiplies the GET count                  |
//! | `CCNODE_BENCH_METRICS`    | 2000    | keep-alive `/metrics` GETs                |
//! | `CCNODE_BENCH_CPU_SECS`   | 60      | window over which CPU use is measured     |
//!
//! During the CPU window `/metrics` is scraped every 15 s, as a Prometheus
//! server with its default interval would. Without `--bench` (as under
//! `cargo test --all-targets`) it is a smoke run: 20 GETs and a 2 s window,
//! labelled as no measurement.

use std::time::{Duration, Instant};

use ccnode_testkit::bench::{count, env_f64, loadavg, metric, proc_status, HttpClient, Summary};
use ccnode_testkit::TestNode;
use serde_json::json;

const GPUS: u32 = 8;
const MIG_PER_GPU: u32 = 7;

fn sim_spec() -> String {
    let mut s = String::from(
        "driver_version = \"550.127.05\"\ncuda_driver_version = \"12.4\"\nscrub_on_free = true\n",
    );
    s.push_str(&format!(
        "\n[[gpus]]\ncount = {GPUS}\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_gib = 80\n\
         vbios_version = \"96.00.99.00.01\"\ninforom_version = \"G520.0200.00.05\"\n\
         gsp_firmware_version = \"550.127.05\"\ncc_mode = \"on\"\nmig = {{ \"1g.10gb\" = {MIG_PER_GPU} }}\n"
    ));
    s
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = env_f64("CCNODE_BENCH_SCALE", if measuring { 1.0 } else { 0.01 });
    let gets = count("CCNODE_BENCH_METRICS", 2000, scale, 20);
    let cpu_secs = env_f64("CCNODE_BENCH_CPU_SECS", if measuring { 60.0 } else { 2.0 });

    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    let sim = node.dir().join("gpus.sim.toml");
    std::fs::write(&sim, sim_spec()).expect("write sim file");
    let mut node = node
        .with_gpu(&format!(
            "backend = \"sim\"\nsim_file = \"{}\"\npoll_interval = \"10s\"",
            sim.display()
        ))
        .start();
    let addr = node.http_addr.expect("http address");
    let pid = node.pid();
    let load_before = loadavg();

    let mut http = HttpClient::new(addr);
    let (_, size) = http.get("/metrics");
    for _ in 0..(gets / 10).max(5) {
        http.get("/metrics");
    }
    let mut lat: Vec<Duration> = (0..gets).map(|_| http.get("/metrics").0).collect();
    let scrape = Summary::of(&mut lat);
    let (_, text) = node.http_get("/metrics");
    let series = text
        .lines()
        .filter(|l| l.starts_with("ccnode_gpu_") && !l.starts_with('#'))
        .count();
    drop(http);

    // CPU over the window: polls every 10 s, a scrape every 15 s.
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let window = Duration::from_secs_f64(cpu_secs);
    let mut next_scrape = Duration::ZERO;
    while t0.elapsed() < window {
        if t0.elapsed() >= next_scrape {
            node.http_get("/metrics");
            next_scrape += Duration::from_secs(15);
        }
        std::thread::sleep(Duration::from_millis(100).min(window.saturating_sub(t0.elapsed())));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let (_, text) = node.http_get("/metrics");
    let polls = metric(&text, "ccnode_gpu_polls_total{result=\"ok\"}").unwrap_or(0.0);
    let poll_secs = metric(&text, "ccnode_gpu_poll_seconds_total").unwrap_or(0.0);
    let rss = proc_status(pid);
    let load_after = loadavg();
    node.stop();

    let cpu_pct = 100.0 * cpu / wall;
    println!(
        "gpu_metrics ({}): {GPUS} simulated GPUs x {MIG_PER_GPU} MIG instances",
        if measuring {
            "measurement"
        } else {
            "smoke run, no measurement"
        }
    );
    println!(
        "  /metrics keep-alive: n={} p50={:.0}us p90={:.0}us p99={:.0}us max={:.0}us, {} bytes, {} GPU series",
        scrape.n, scrape.p50, scrape.p90, scrape.p99, scrape.max, size, series
    );
    println!(
        "  CPU at 10 s polls: {cpu:.3} s over {wall:.1} s = {cpu_pct:.3}% of one core; {polls} polls, {:.2} ms per poll",
        if polls > 0.0 { 1000.0 * poll_secs / polls } else { 0.0 }
    );
    println!(
        "  rss {} KiB, load {load_before} -> {load_after}",
        rss["vm_rss_kib"]
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "gpu_metrics",
            "measuring": measuring,
            "gpus": GPUS,
            "mig_per_gpu": MIG_PER_GPU,
            "metrics": scrape.json(),
            "metrics_bytes": size,
            "gpu_series": series,
            "cpu_window_s": wall,
            "cpu_s": cpu,
            "cpu_pct_of_core": cpu_pct,
            "polls": polls,
            "poll_ms_mean": if polls > 0.0 { 1000.0 * poll_secs / polls } else { 0.0 },
            "rss": rss,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        })
    );
}
