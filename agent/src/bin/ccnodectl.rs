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
}

fn main() -> ExitCode {
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
        _ => {
            println!("{} -> {}", s(result, "from"), s(result, "to"));
        }
    }
}
