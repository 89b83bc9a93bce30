//! Reads this host's GPUs through the NVML backend and prints, as one JSON
//! object: the inventory, two samples (the first after the inventory, the
//! second straight after it) with the time each took, and the events that
//! arrived within `--events SECONDS` (default 0: none waited for).
//!
//! ```text
//! cargo run -p ccnode-gpu --example nvml_probe
//! cargo run -p ccnode-gpu --example nvml_probe -- --events 10
//! ```
//!
//! It only reads: no GPU setting is changed. This is how the parts of the
//! NVML backend that need a GPU are exercised; compare its output with
//! `nvidia-smi -q`. Exit status: 0 success, 2 NVML missing, 3 no GPU, 1
//! any other error (the error goes to stderr).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ccnode_gpu::nvml::NvmlBackend;
use ccnode_gpu::{GpuBackend, GpuError};

fn main() -> ExitCode {
    let mut events_secs = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse::<u64>())) {
            ("--events", Some(Ok(secs))) => events_secs = secs,
            _ => {
                eprintln!("usage: nvml_probe [--events SECONDS]");
                return ExitCode::from(64);
            }
        }
    }
    match run(Duration::from_secs(events_secs)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nvml_probe: {e}");
            ExitCode::from(match e {
                GpuError::LibraryMissing(_) => 2,
                GpuError::NoGpu => 3,
                _ => 1,
            })
        }
    }
}

fn run(events_for: Duration) -> Result<String, GpuError> {
    let started = Instant::now();
    let backend = NvmlBackend::open()?;
    let open_ms = ms(started);

    let started = Instant::now();
    let inventory = backend.inventory()?;
    let inventory_ms = ms(started);

    let mut samples = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let sample = backend.sample()?;
        let took = ms(started);
        samples.push(serde_json::json!({
            "took_ms": took,
            "per_gpu_ms": took / sample.len().max(1) as f64,
            "gpus": sample,
        }));
    }

    let mut events = Vec::new();
    let deadline = Instant::now() + events_for;
    let started = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        events.extend(backend.wait_events(left)?);
        if left.is_zero() {
            break;
        }
    }
    let events_ms = ms(started);

    let out = serde_json::json!({
        "backend": format!("{backend:?}"),
        "open_ms": open_ms,
        "inventory_ms": inventory_ms,
        "inventory": inventory,
        "samples": samples,
        "events_waited_ms": events_ms,
        "events": events,
    });
    Ok(serde_json::to_string_pretty(&out).expect("JSON values always serialise"))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
