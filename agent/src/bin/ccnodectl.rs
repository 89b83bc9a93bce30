//! ccnodectl: the ccnode admin CLI. Talks to ccnoded over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ccnode_agent::admin::client::{AdminClient, ClientError};
use ccnode_agent::admin::protocol::{Command, ErrorCode};
use clap::{Parser, Subcommand};
use serde_json::Value;

/// Exit codes scripts can act on.
mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const DENIED: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const PROTOCOL: u8 = 6;
}

/// Drain, quarantine and inspect a ccnode host through ccnoded's admin socket.
///
/// Exit codes: 0 done; 2 usage error; 3 ccnoded unreachable; 4 permission
/// denied; 5 refused by ccnoded (the node's state does not allow it, or the
/// request was invalid); 6 protocol error.
#[derive(Debug, Parser)]
#[command(name = "ccnodectl", version, about, long_about)]
struct Cli {
    /// ccnoded's admin socket.
    #[arg(
        long,
        global = true,
        env = "CCNODE_ADMIN_SOCKET",
        default_value = "/run/ccnode/admin.sock"
    )]
    socket: PathBuf,
    /// Print ccnoded's JSON response instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for ccnoded.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the node's state, why, since when and who set it.
    Status,
    /// Stop taking new work; in-flight work finishes.
    Drain {
        /// Why (required; recorded in the audit log).
        #[arg(long, short)]
        reason: String,
    },
    /// Take work again after a drain.
    Undrain {
        #[arg(long, short)]
        reason: String,
    },
    /// Stop workers now and refuse everything until released.
    Quarantine {
        #[arg(long, short)]
        reason: String,
    },
    /// Lift a quarantine: the node becomes active.
    Release {
        #[arg(long, short)]
        reason: String,
    },
    /// Show recent admin actions and node transitions.
    Audit {
        /// How many records (1 to 1000).
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
    },
    /// Show the GPUs: inventory, MIG devices, versions and health.
    Gpus,
    /// Compare the driver, firmware and GPU modes with the pinned baseline.
    Drift,
}

fn main() -> ExitCode {
    // SAFETY: called first in main, before any thread exists; restores the
    // default action so that `ccnodectl gpus | head` ends quietly on a
    // closed pipe instead of panicking in println!.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let (command, reason, limit) = match &cli.command {
        Cmd::Status => (Command::Status, None, None),
        Cmd::Drain { reason } => (Command::Drain, Some(reason.as_str()), None),
        Cmd::Undrain { reason } => (Command::Undrain, Some(reason.as_str()), None),
        Cmd::Quarantine { reason } => (Command::Quarantine, Some(reason.as_str()), None),
        Cmd::Release { reason } => (Command::Release, Some(reason.as_str()), None),
        Cmd::Audit { limit } => (Command::Audit, None, Some(*limit)),
        Cmd::Gpus => (Command::Gpus, None, None),
        Cmd::Drift => (Command::Drift, None, None),
    };
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let response = AdminClient::connect(&cli.socket, timeout)
        .and_then(|mut client| client.call(command, reason, limit));
    let response = match response {
        Ok(r) => r,
        Err(err) => return client_failure(&err),
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).expect("serialises")
        );
    }
    match (&response.error, &response.result) {
        (Some(err), _) => {
            if !cli.json {
                eprintln!("ccnodectl: {} ({})", err.message, err.code.as_str());
            }
            ExitCode::from(match err.code {
                ErrorCode::PermissionDenied => exit::DENIED,
                ErrorCode::TooManyConnections | ErrorCode::ShuttingDown | ErrorCode::Timeout => {
                    exit::UNREACHABLE
                }
                ErrorCode::InvalidTransition
                | ErrorCode::InvalidRequest
                | ErrorCode::MissingField
                | ErrorCode::PersistFailed => exit::REFUSED,
                _ => exit::PROTOCOL,
            })
        }
        (None, Some(result)) if response.ok => {
            if !cli.json {
                print_human(command, result);
            }
            ExitCode::from(exit::OK)
        }
        _ => {
            eprintln!("ccnodectl: ccnoded sent a response with neither result nor error");
            ExitCode::from(exit::PROTOCOL)
        }
    }
}

fn client_failure(err: &ClientError) -> ExitCode {
    eprintln!("ccnodectl: {}", ccnode_agent::error_chain(err));
    let denied = matches!(err, ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied);
    ExitCode::from(match err {
        _ if denied => exit::DENIED,
        ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed => exit::UNREACHABLE,
        ClientError::BadResponse(_) | ClientError::TooLarge => exit::PROTOCOL,
    })
}

/// A string field, with control characters escaped: what the daemon sends
/// may carry text from other users (reasons), and must not drive the
/// terminal.
fn s(v: &Value, key: &str) -> String {
    let raw = v.get(key).and_then(Value::as_str).unwrap_or("-");
    raw.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn actor(v: Option<&Value>) -> String {
    match v {
        Some(a) if a.get("kind").and_then(Value::as_str) == Some("admin") => format!(
            "uid {} (pid {})",
            a.get("uid").map_or("?".into(), Value::to_string),
            a.get("pid").map_or("?".into(), Value::to_string)
        ),
        Some(a) => format!("system ({})", s(a, "component")),
        None => "-".into(),
    }
}

fn print_human(command: Command, result: &Value) {
    match command {
        Command::Status => {
            println!("node:     {}", s(result, "node_id"));
            println!("state:    {}", s(result, "state"));
            println!("reason:   {}", s(result, "reason"));
            println!("since:    {}", s(result, "since"));
            println!("by:       {}", actor(result.get("by")));
            println!(
                "in flight: {}",
                result.get("in_flight").map_or("-".into(), Value::to_string)
            );
            println!("version:  {}", s(result, "version"));
            println!("metrics:  {}", s(result, "metrics_url"));
        }
        Command::Audit => {
            let empty = Vec::new();
            let records = result
                .get("records")
                .and_then(Value::as_array)
                .unwrap_or(&empty);
            if records.is_empty() {
                println!("no audit records");
            }
            for r in records {
                let transition = match (r.get("from"), r.get("to")) {
                    (Some(f), Some(t)) => format!(
                        "{} -> {}",
                        f.as_str().unwrap_or("?"),
                        t.as_str().unwrap_or("?")
                    ),
                    (Some(f), None) => format!("{} (unchanged)", f.as_str().unwrap_or("?")),
                    _ => "-".into(),
                };
                println!(
                    "{}  {:<14} {:<20} {:<30} {}  {}",
                    s(r, "ts"),
                    s(r, "command"),
                    s(r, "result"),
                    transition,
                    actor(r.get("actor")),
                    s(r, "reason"),
                );
            }
        }
        Command::Gpus => print_gpus(result),
        Command::Drift => print_drift(result),
        _ => {
            println!("{} -> {}", s(result, "from"), s(result, "to"));
        }
    }
}

fn num(v: &Value, key: &str) -> String {
    v.get(key).map_or("-".into(), |n| match n {
        Value::Null => "-".into(),
        Value::String(_) => s(v, key),
        other => other.to_string(),
    })
}

fn backend_line(result: &Value) {
    let simulated = result.get("simulated").and_then(Value::as_bool) == Some(true);
    println!(
        "backend: {}{}",
        s(result, "backend"),
        if simulated { " (SIMULATED GPUs)" } else { "" }
    );
}

fn print_gpus(result: &Value) {
    backend_line(result);
    let Some(inv) = result.get("inventory").filter(|v| !v.is_null()) else {
        println!("no GPU inventory");
        return;
    };
    println!(
        "driver:  {} (CUDA {}), scrub on free: {}",
        s(inv, "driver_version"),
        s(inv, "cuda_driver_version"),
        inv.get("scrub_on_free")
            .map_or("-".into(), |v| s(v, "state"))
    );
    let empty = Vec::new();
    let health = result.get("health");
    for g in inv.get("gpus").and_then(Value::as_array).unwrap_or(&empty) {
        let index = num(g, "index");
        let h = health.and_then(|h| h.get(index.as_str()));
        let state = match h {
            Some(h) if h.get("healthy").and_then(Value::as_bool) == Some(true) => "healthy".into(),
            Some(h) => format!(
                "UNHEALTHY: {}",
                h.get("problems")
                    .and_then(Value::as_array)
                    .map(|p| p
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
            None => "-".into(),
        };
        let mem_gib = g
            .get("memory_total_bytes")
            .and_then(Value::as_u64)
            .map_or("-".into(), |b| {
                format!("{:.0} GiB", b as f64 / (1u64 << 30) as f64)
            });
        println!();
        println!("gpu {index}: {}  {}", s(g, "name"), s(g, "uuid"));
        println!(
            "  pci bus id: {}  minor: {}  memory: {mem_gib}",
            s(g, "pci_bus_id"),
            num(g, "minor_number")
        );
        println!(
            "  vbios: {}  inforom: {}  gsp: {}",
            s(g, "vbios_version"),
            s(g, "inforom_version"),
            s(g, "gsp_firmware_version")
        );
        println!(
            "  cc mode: {}  mig mode: {}",
            s(g, "cc_mode"),
            s(g, "mig_mode")
        );
        println!("  health: {state}");
        for m in g
            .get("mig_devices")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
        {
            println!(
                "  mig gi {} ci {}  {:<10} {}",
                num(m, "gpu_instance_id"),
                num(m, "compute_instance_id"),
                s(m, "profile"),
                s(m, "uuid")
            );
        }
    }
    let reasons = result.get("blocked_reasons").and_then(Value::as_array);
    if let Some(r) = reasons.filter(|r| !r.is_empty()) {
        println!();
        println!("new workers BLOCKED:");
        for reason in r.iter().filter_map(Value::as_str) {
            println!("  {}", reason.escape_default());
        }
    }
}

fn print_drift(result: &Value) {
    backend_line(result);
    let empty = Vec::new();
    let drift = result
        .get("drift")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if drift.is_empty() {
        println!("no drift: the host matches the baseline");
        return;
    }
    println!(
        "{:<22} {:<5} {:<24} {:<24} action",
        "field", "gpu", "expected", "found"
    );
    for d in drift {
        println!(
            "{:<22} {:<5} {:<24} {:<24} {}",
            s(d, "field"),
            num(d, "gpu"),
            s(d, "expected"),
            s(d, "found"),
            s(d, "action")
        );
    }
}
