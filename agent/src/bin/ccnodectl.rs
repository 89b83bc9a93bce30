//! ccnodectl: the ccnode admin CLI. Talks to ccnoded over its admin socket;
//! `dev-model` writes a signed test model locally (no daemon involved).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ccnode_agent::admin::client::{AdminClient, ClientError};
use ccnode_agent::admin::protocol::{Command, ErrorCode};
use ccnode_attest::printable;
use clap::{Parser, Subcommand};
use serde_json::Value;

/// Exit codes scripts can act on.
mod exit {
    pub const OK: u8 = 0;
    /// `dev-model`: the model could not be written.
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const DENIED: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const PROTOCOL: u8 = 6;
}

/// Drain, quarantine and inspect a ccnode host through ccnoded's admin socket.
///
/// Exit codes: 0 done; 1 (dev-model) the model could not be written; 2
/// usage error; 3 ccnoded unreachable; 4 permission denied; 5 refused by
/// ccnoded (the node's state does not allow it, or the request was
/// invalid); 6 protocol error.
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
    /// List, load and unload the models ccnoded serves.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Write a small signed Llama-shaped model, for development and tests.
    ///
    /// FOR DEVELOPMENT AND TESTS ONLY. Writes into DIR: `model/` (an HF
    /// Llama config.json, a byte-level BPE tokenizer.json and random f32
    /// safetensors weights: it runs, and talks gibberish), `model.sig` (its
    /// OpenSSF model-signing signature), `signing-key.pem` (the P-256
    /// private key, unencrypted, mode 0600), `signing-key.pub.pem` and
    /// `trust-policy.toml` (trusting that key for this model only). Needs
    /// no ccnoded and no network. Production models are signed with the
    /// reference `model_signing` tool, with keys that never sit next to the
    /// model; never add a development key to a production trust policy.
    #[command(name = "dev-model")]
    DevModel(DevModelArgs),
}

#[derive(Debug, Subcommand)]
enum ModelCmd {
    /// Show each model: its signature digest, signer, queue and workers.
    List,
    /// Verify a model's signature and start its sandboxed workers. A model
    /// whose signature does not verify under the trust policy gets no
    /// worker. Returns once the workers are starting (`model list` shows
    /// when they are ready).
    Load {
        /// The model's name in the API and the trust policy.
        #[arg(long)]
        name: String,
        /// The model directory (config.json, tokenizer.json, safetensors).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The OMS signature file; default DIR/model.sig.
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// The trust policy; default ccnoded's `[inference] trust_policy`.
        #[arg(long, value_name = "FILE")]
        trust_policy: Option<PathBuf>,
        /// Where the workers compute.
        #[arg(long, value_parser = ["cpu", "cuda"], default_value = "cpu")]
        device: String,
        /// A GPU or MIG device for one replica (index, GPU-… or MIG-…);
        /// repeat once per replica.
        #[arg(long = "gpu", value_name = "ID")]
        gpus: Vec<String>,
        /// Workers serving the model.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Generations waiting for a worker before 429.
        #[arg(long, default_value_t = 8)]
        max_queue: u32,
    },
    /// Stop a model's workers (generations in flight finish) and forget it.
    Unload {
        /// The model's name.
        name: String,
    },
}

/// An absolute path (ccnoded resolves relative ones against its own
/// working directory, not ours).
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The request line and command for a `model` subcommand.
fn model_request(cmd: &ModelCmd) -> (Command, Vec<u8>) {
    use serde_json::{json, Map};
    match cmd {
        ModelCmd::List => (
            Command::Models,
            ccnode_agent::admin::protocol::Request::to_line(Command::Models, None, None),
        ),
        ModelCmd::Unload { name } => {
            let mut f = Map::new();
            f.insert("name".into(), json!(name));
            (
                Command::ModelUnload,
                ccnode_agent::admin::protocol::Request::to_line_with(Command::ModelUnload, f),
            )
        }
        ModelCmd::Load {
            name,
            dir,
            signature,
            trust_policy,
            device,
            gpus,
            replicas,
            max_queue,
        } => {
            let mut model = json!({
                "name": name,
                "dir": absolute(dir),
                "device": device,
                "gpus": gpus,
                "replicas": replicas,
                "max_queue": max_queue,
            });
            if let Some(sig) = signature {
                model["signature"] = json!(absolute(sig));
            }
            if let Some(p) = trust_policy {
                model["trust_policy"] = json!(absolute(p));
            }
            let mut f = Map::new();
            f.insert("model".into(), model);
            (
                Command::ModelLoad,
                ccnode_agent::admin::protocol::Request::to_line_with(Command::ModelLoad, f),
            )
        }
    }
}

#[derive(Debug, clap::Args)]
struct DevModelArgs {
    /// Directory to write into (created if missing; must be empty unless
    /// --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// tiny: about 0.11 M parameters, for tests; bench: about 166 M
    /// parameters (663 MB) in two shards, for benchmarks.
    #[arg(long, value_enum, default_value_t = Size::Tiny)]
    size: Size,
    /// Seed for the weights and the signing key: the same seed writes the
    /// same files. Without it the weights use seed 0 and the key comes
    /// from the OS random number generator.
    #[arg(long)]
    seed: Option<u64>,
    /// The model's name: the signature's subject and the trust policy's
    /// model id (letters, digits, `.`, `_`, `-`; at most 64). Default
    /// ccnode-dev-tiny or ccnode-dev-bench.
    #[arg(long)]
    name: Option<String>,
    /// Write into a non-empty DIR: its model/ directory and the files
    /// above are replaced, anything else is left alone.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Size {
    Tiny,
    Bench,
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
    let timeout = Duration::from_secs(cli.timeout.max(1));
    if let Cmd::Model(m) = &cli.command {
        let (command, line) = model_request(m);
        // Loading hashes the whole model before ccnoded answers.
        let timeout = if command == Command::ModelLoad {
            timeout.max(Duration::from_secs(600))
        } else {
            timeout
        };
        let response =
            AdminClient::connect(&cli.socket, timeout).and_then(|mut c| c.call_raw(&line));
        return match response {
            Ok(r) => finish(command, &r, cli.json),
            Err(err) => client_failure(&err),
        };
    }
    let (command, reason, limit) = match &cli.command {
        Cmd::DevModel(args) => return dev_model::run(args, cli.json),
        Cmd::Model(_) => unreachable!("handled above"),
        Cmd::Status => (Command::Status, None, None),
        Cmd::Drain { reason } => (Command::Drain, Some(reason.as_str()), None),
        Cmd::Undrain { reason } => (Command::Undrain, Some(reason.as_str()), None),
        Cmd::Quarantine { reason } => (Command::Quarantine, Some(reason.as_str()), None),
        Cmd::Release { reason } => (Command::Release, Some(reason.as_str()), None),
        Cmd::Audit { limit } => (Command::Audit, None, Some(*limit)),
        Cmd::Gpus => (Command::Gpus, None, None),
        Cmd::Drift => (Command::Drift, None, None),
    };
    let response = AdminClient::connect(&cli.socket, timeout)
        .and_then(|mut client| client.call(command, reason, limit));
    match response {
        Ok(r) => finish(command, &r, cli.json),
        Err(err) => client_failure(&err),
    }
}

/// Prints a response and picks the exit code.
fn finish(
    command: Command,
    response: &ccnode_agent::admin::protocol::Response,
    json: bool,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(response).expect("serialises")
        );
    }
    match (&response.error, &response.result) {
        (Some(err), _) => {
            if !json {
                match &err.detail {
                    Some(d) => eprintln!(
                        "ccnodectl: {} ({}: {})",
                        printable(&err.message),
                        err.code.as_str(),
                        printable(d)
                    ),
                    None => eprintln!(
                        "ccnodectl: {} ({})",
                        printable(&err.message),
                        err.code.as_str()
                    ),
                }
            }
            ExitCode::from(match err.code {
                ErrorCode::PermissionDenied => exit::DENIED,
                ErrorCode::TooManyConnections | ErrorCode::ShuttingDown | ErrorCode::Timeout => {
                    exit::UNREACHABLE
                }
                ErrorCode::InvalidTransition
                | ErrorCode::InvalidRequest
                | ErrorCode::MissingField
                | ErrorCode::PersistFailed
                | ErrorCode::ModelLoadFailed
                | ErrorCode::ModelNotLoaded
                | ErrorCode::InferenceUnavailable => exit::REFUSED,
                _ => exit::PROTOCOL,
            })
        }
        (None, Some(result)) if response.ok => {
            if !json {
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

fn print_models(result: &Value) {
    let empty = Vec::new();
    let models = result["models"].as_array().unwrap_or(&empty);
    if models.is_empty() {
        println!("no models loaded");
        return;
    }
    for m in models {
        println!("{}", s(m, "name"));
        println!("  dir:       {}", s(m, "dir"));
        println!("  signer:    {}", s(m, "signer"));
        println!("  manifest:  sha256:{}", s(m, "manifest_digest"));
        println!("  files:     {} ({} bytes)", m["files"], m["bytes"]);
        println!("  queue:     {}", m["queue"]);
        for (i, w) in m["workers"].as_array().unwrap_or(&empty).iter().enumerate() {
            let device = w.get("device").and_then(Value::as_str).unwrap_or("cpu");
            let pid = w.get("pid").map_or("-".into(), |p| {
                if p.is_null() {
                    "-".into()
                } else {
                    p.to_string()
                }
            });
            let busy = if w["busy"] == true { " busy" } else { "" };
            let last = if w["last_exit"].is_string() {
                format!(" (last exit: {})", s(w, "last_exit"))
            } else {
                String::new()
            };
            println!(
                "  worker {i}:  {} on {device}, pid {pid}{busy}{last}",
                s(w, "state")
            );
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

/// A string field, passed through [`printable`]: what the daemon sends may
/// carry text from other users (reasons) and from model directories, and
/// must not drive the terminal.
fn s(v: &Value, key: &str) -> String {
    let raw = v.get(key).and_then(Value::as_str).unwrap_or("-");
    printable(raw).into_owned()
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
        Command::Models => print_models(result),
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
        let held_by = |uuid: &str| {
            result
                .get("assignments")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|x| x.get("device").and_then(Value::as_str) == Some(uuid))
                })
                .map(|x| format!("  -> model {} worker {}", s(x, "model"), num(x, "worker")))
                .unwrap_or_default()
        };
        let whole = held_by(&s(g, "uuid"));
        if !whole.is_empty() {
            println!("  assigned:{whole}");
        }
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
                "  mig gi {} ci {}  {:<10} {}{}",
                num(m, "gpu_instance_id"),
                num(m, "compute_instance_id"),
                s(m, "profile"),
                s(m, "uuid"),
                held_by(&s(m, "uuid"))
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

/// `ccnodectl dev-model`: a generated, signed test model.
mod dev_model {
    use std::fs;
    use std::io::Write as _;
    use std::path::Path;
    use std::process::ExitCode;

    use ccnode_attest::oms::{self, sign, HandOver, TrustPolicy, VerifyOptions};
    use ccnode_worker::testmodel::{self, Shape};
    use serde_json::json;

    use super::{exit, DevModelArgs, Size};

    const MODEL_DIR: &str = "model";
    const SIGNATURE: &str = "model.sig";
    const PRIVATE_KEY: &str = "signing-key.pem";
    const PUBLIC_KEY: &str = "signing-key.pub.pem";
    const POLICY: &str = "trust-policy.toml";
    const MAX_NAME: usize = 64;

    pub(super) fn run(args: &DevModelArgs, json: bool) -> ExitCode {
        match write(args) {
            Ok(summary) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&summary).unwrap_or_default()
                    );
                } else {
                    print_human(&summary);
                }
                ExitCode::from(exit::OK)
            }
            Err(message) => {
                eprintln!("ccnodectl: dev-model: {message}");
                ExitCode::from(exit::FAILED)
            }
        }
    }

    fn check_name(name: &str) -> Result<(), String> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "model name {:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                name.escape_default().to_string()
            ))
        }
    }

    fn io_err(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
        move |e| format!("{}: {e}", what.display())
    }

    /// Prepares DIR: created if missing; when not empty, refused without
    /// --force, else the paths this command writes are removed first (so no
    /// stale file of an earlier model is signed with the new one).
    fn prepare(out: &Path, force: bool) -> Result<(), String> {
        fs::create_dir_all(out).map_err(io_err(out))?;
        let mut entries = fs::read_dir(out).map_err(io_err(out))?;
        if entries.next().is_none() {
            return Ok(());
        }
        if !force {
            return Err(format!(
                "{} is not empty (--force replaces its model/ and the files dev-model writes)",
                out.display()
            ));
        }
        let model = out.join(MODEL_DIR);
        match fs::symlink_metadata(&model) {
            // remove_dir_all removes a symlink itself, never its target.
            Ok(m) if m.is_dir() => fs::remove_dir_all(&model).map_err(io_err(&model))?,
            Ok(_) => fs::remove_file(&model).map_err(io_err(&model))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&model)(e)),
        }
        for name in [SIGNATURE, PRIVATE_KEY, PUBLIC_KEY, POLICY] {
            let path = out.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `path` under a temporary name, then renames it.
    fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
        let tmp = path.with_extension("partial");
        let result = fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(path))
    }

    fn policy_text(name: &str) -> String {
        format!(
            "# Written by `ccnodectl dev-model`, for development and tests:\n\
             # trusts the development key next to this file for the model\n\
             # {name:?} only. Never merge this key into a production trust policy.\n\
             [[signer]]\n\
             models = [{name:?}]\n\
             public_keys = [\"{PUBLIC_KEY}\"]\n"
        )
    }

    fn write(args: &DevModelArgs) -> Result<serde_json::Value, String> {
        let (shape, size) = match args.size {
            Size::Tiny => (Shape::tiny(), "tiny"),
            Size::Bench => (Shape::bench(), "bench"),
        };
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("ccnode-dev-{size}"));
        check_name(&name)?;
        let out = &args.out;
        prepare(out, args.force)?;
        let model = out.join(MODEL_DIR);
        let seed = args.seed.unwrap_or(0);
        testmodel::write_model(&model, &shape, seed).map_err(io_err(&model))?;
        let key = args
            .seed
            .map_or_else(sign::generate_key, sign::key_from_seed);
        let bundle = sign::sign_dir_p256(&model, &key, &name)
            .map_err(|e| format!("signing: {}", ccnode_attest::error_chain(&e)))?;
        let signature = out.join(SIGNATURE);
        write_atomic(&signature, &bundle)?;
        let private = out.join(PRIVATE_KEY);
        sign::write_private_key_pem(&private, &key).map_err(|e| ccnode_attest::error_chain(&e))?;
        let public = out.join(PUBLIC_KEY);
        write_atomic(&public, sign::public_key_pem(&key).as_bytes())?;
        let policy_path = out.join(POLICY);
        write_atomic(&policy_path, policy_text(&name).as_bytes())?;

        // What was written must verify as written, through the same policy
        // file a node would load.
        let policy = TrustPolicy::load(&policy_path)
            .map_err(|e| format!("checking: {}", ccnode_attest::error_chain(&e)))?;
        let verified = oms::verify_model_with(
            &model,
            &signature,
            &policy,
            &VerifyOptions::new(name.clone()),
            HandOver::VerdictOnly,
        )
        .map_err(|e| format!("checking: {}", ccnode_attest::error_chain(&e)))?;

        let shown = |p: &Path| p.display().to_string();
        Ok(json!({
            "size": size,
            "parameters": shape.parameters(),
            "seed": seed,
            "key": if args.seed.is_some() { "derived from --seed" } else { "random" },
            "model_name": name,
            "model_dir": shown(&model),
            "model_files": testmodel::model_files(&shape),
            "signature": shown(&signature),
            "private_key": shown(&private),
            "public_key": shown(&public),
            "key_hint": sign::hint(&key),
            "trust_policy": shown(&policy_path),
            "manifest_digest": verified.manifest_digest,
            "bytes": verified.bytes_hashed,
        }))
    }

    fn print_human(v: &serde_json::Value) {
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let files: Vec<&str> = v["model_files"]
            .as_array()
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        println!(
            "development model {} ({}, {} parameters, seed {}); NOT for production",
            s("model_name"),
            s("size"),
            v["parameters"],
            v["seed"]
        );
        println!("  model:        {}/ ({})", s("model_dir"), files.join(", "));
        println!("  signature:    {}", s("signature"));
        println!(
            "  private key:  {} (mode 0600, {})",
            s("private_key"),
            s("key")
        );
        println!(
            "  public key:   {} (hint {})",
            s("public_key"),
            s("key_hint")
        );
        println!("  trust policy: {}", s("trust_policy"));
        println!("  manifest:     {}", s("manifest_digest"));
        println!(
            "check with: ccnode-verify model {} --signature {} --trust-config {} --model-id {}",
            s("model_dir"),
            s("signature"),
            s("trust_policy"),
            s("model_name")
        );
    }
}
