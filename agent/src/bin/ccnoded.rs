//! ccnoded: the ccnode on-host agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use ccnode_agent::config::{Config, DEFAULT_CONFIG_PATH};
use ccnode_agent::daemon::{self, exit};
use ccnode_agent::{error_chain as chain, workers};
use clap::{Parser, Subcommand};

/// The ccnode on-host agent: node state, admin socket, metrics.
#[derive(Debug, Parser)]
#[command(name = "ccnoded", version, about, long_about = None)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH, env = "CCNODE_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate the configuration and exit: 0 when valid, 78 when not.
    CheckConfig {
        /// Check only syntax and values, not the host (groups).
        #[arg(long)]
        syntax_only: bool,
    },
    /// Run a command under exactly the worker sandbox profile, to see what
    /// a worker can and cannot do. Exits with the command's code, or 128 +
    /// the signal that killed it (159 for SIGSYS: a seccomp violation).
    SandboxExec {
        /// Give the command one GPU or MIG device, as a worker assigned it
        /// would get it: a GPU index or GPU-… UUID (MIG off), or a MIG-…
        /// UUID; its device nodes and CUDA_VISIBLE_DEVICES, resolved from
        /// the configured GPU backend (repeatable).
        #[arg(long = "gpu", value_name = "ID")]
        gpus: Vec<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    // ccnoded re-executes itself as the worker jail (single-threaded, before
    // anything else runs): see ccnode_sandbox::jail.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == workers::JAIL_ARG)
    {
        ccnode_sandbox::jail::main();
    }
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("ccnoded: {}", chain(&err));
            return ExitCode::from(exit::CONFIG);
        }
    };
    match cli.command {
        Some(Cmd::CheckConfig { syntax_only }) => {
            return check_config(&config, &cli.config, syntax_only)
        }
        Some(Cmd::SandboxExec { gpus, command }) => {
            let jail = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("ccnoded: cannot find my own executable: {e}");
                    return ExitCode::from(exit::SOFTWARE);
                }
            };
            return match workers::sandbox_exec(&config, &jail, &gpus, &command) {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("ccnoded: {}", chain(&err));
                    ExitCode::from(match err {
                        workers::WorkerError::Config(_) => exit::CONFIG,
                        workers::WorkerError::Backend(_)
                        | workers::WorkerError::NoBackend
                        | workers::WorkerError::Device { .. }
                        | workers::WorkerError::DevicesOwned(_) => exit::UNAVAILABLE,
                        workers::WorkerError::StateLock(_) => exit::IOERR,
                        _ => exit::SOFTWARE,
                    })
                }
            };
        }
        None => {}
    }
    if let Err(err) = ccnode_agent::logging::init(&config.log) {
        eprintln!("ccnoded: {}", chain(&err));
        return ExitCode::from(exit::SOFTWARE);
    }
    tracing::info!(version = ccnode_agent::VERSION, config = %cli.config.display(), "starting");
    match daemon::run(config) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(err) => {
            let code = err.exit_code();
            tracing::error!(exit_code = code, "{}", chain(&err));
            eprintln!("ccnoded: {}", chain(&err));
            ExitCode::from(code)
        }
    }
}

fn check_config(config: &Config, path: &std::path::Path, syntax_only: bool) -> ExitCode {
    if !syntax_only {
        let groups = config.admin.group.resolve("admin.group").and_then(|_| {
            config
                .admin
                .read_only_group
                .as_ref()
                .map(|g| g.resolve("admin.read_only_group"))
                .transpose()
        });
        if let Err(err) = groups {
            eprintln!("ccnoded: {}: {}", path.display(), chain(&err));
            return ExitCode::from(exit::CONFIG);
        }
        // A simulation file is configuration: check it too. NVML is the
        // host, not the configuration, and is not touched here.
        if let Some(sim) = config.gpu.sim_file.as_deref() {
            if let Err(err) = ccnode_gpu::sim::SimBackend::open(sim) {
                eprintln!("ccnoded: {}: gpu.sim_file: {}", path.display(), chain(&err));
                return ExitCode::from(exit::CONFIG);
            }
        }
    }
    println!("{}: ok", path.display());
    ExitCode::from(exit::OK)
}
