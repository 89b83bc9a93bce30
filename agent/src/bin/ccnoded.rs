//! ccnoded: the ccnode on-host agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use ccnode_agent::config::{Config, DEFAULT_CONFIG_PATH};
use ccnode_agent::daemon::{self, exit};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("ccnoded: {}", chain(&err));
            return ExitCode::from(exit::CONFIG);
        }
    };
    if let Some(Cmd::CheckConfig { syntax_only }) = cli.command {
        return check_config(&config, &cli.config, syntax_only);
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
    }
    println!("{}: ok", path.display());
    ExitCode::from(exit::OK)
}

/// The error and its sources, once each, joined with ": ".
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
