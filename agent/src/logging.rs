//! Log output: text on a terminal, JSON or journald under a service manager.

use std::io::IsTerminal;

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log.format is journald but the journal is not reachable")]
    Journald(#[source] std::io::Error),
    #[error("a logger is already installed")]
    AlreadySet,
}

/// The format `auto` resolves to: journald when stderr is the journal's
/// stream (`$JOURNAL_STREAM` names stderr's device and inode), text on a
/// terminal, JSON otherwise.
pub fn resolve(format: LogFormat) -> LogFormat {
    if format != LogFormat::Auto {
        return format;
    }
    if stderr_is_journal() {
        LogFormat::Journald
    } else if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    }
}

fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(libc::STDERR_FILENO) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}

/// Parses a filter directive, or `None` if it is not one. Only ASCII
/// without surrounding whitespace is handed to the parser:
/// tracing-subscriber 0.3 panics on a leading space followed by a
/// multi-byte character (found by fuzzing the config).
pub fn parse_filter(directive: &str) -> Option<EnvFilter> {
    if !directive.is_ascii() || directive.trim() != directive || directive.is_empty() {
        return None;
    }
    EnvFilter::try_new(directive).ok()
}

/// Installs the global logger. `RUST_LOG` overrides `cfg.level`.
pub fn init(cfg: &LogConfig) -> Result<LogFormat, LogError> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| parse_filter(&v))
        .or_else(|| parse_filter(&cfg.level))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let format = resolve(cfg.format);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Journald => {
            let layer = tracing_journald::layer()
                .map_err(LogError::Journald)?
                .with_syslog_identifier("ccnoded".to_owned());
            registry.with(layer).try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text | LogFormat::Auto => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
    };
    result.map_err(|_| LogError::AlreadySet)?;
    Ok(format)
}
