//! Starting a jailed worker from ccnoded (a multi-threaded process): only
//! fd shuffling happens between fork and exec; everything else is the
//! jail's job.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::jail::{FIRST_PASSED_FD, PROFILE_FD, REPORT_FD};
use crate::profile::Profile;

/// Errors starting the jail.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    #[error("the profile says {declared} fds are passed, {given} were given")]
    FdCount { declared: u32, given: usize },
    #[error("cannot start the jail {path}")]
    Spawn {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the jail's fds")]
    Fds(#[source] io::Error),
}

/// A started jail: the process, and its report stream.
#[derive(Debug)]
pub struct Jailed {
    pub child: Child,
    pub reports: BufReader<File>,
}

impl Jailed {
    /// Reads report lines until the worker has started or setup failed:
    /// `Ok(events)` ending with `started`, or `Err(events)` ending with the
    /// `error` event (or EOF). Blocking.
    pub fn wait_started(&mut self) -> Result<Vec<Value>, Vec<Value>> {
        let mut events = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match self.reports.read_line(&mut line) {
                Ok(0) | Err(_) => return Err(events),
                Ok(_) => {}
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let event = v["event"].as_str().unwrap_or("").to_owned();
            events.push(v);
            match event.as_str() {
                "started" => return Ok(events),
                "error" => return Err(events),
                _ => {}
            }
        }
    }
}

fn dup_high(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open descriptor returns a new
    // descriptor, which we take ownership of.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Starts `jail` (with `jail_args`, e.g. `["__jail"]` for ccnoded itself) to
/// run `profile`, handing over `passed` (they reach the worker at 3, 4, ...).
pub fn spawn(
    jail: &Path,
    jail_args: &[&str],
    profile: &Profile,
    passed: &[BorrowedFd<'_>],
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Jailed, SpawnError> {
    profile.validate()?;
    if passed.len() != profile.passed_fds as usize {
        return Err(SpawnError::FdCount {
            declared: profile.passed_fds,
            given: passed.len(),
        });
    }
    let memfd = nix::sys::memfd::memfd_create(
        c"ccnode-profile",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| SpawnError::Fds(e.into()))?;
    let mut profile_file = File::from(memfd);
    serde_json::to_writer(&mut profile_file, profile).map_err(|e| SpawnError::Fds(e.into()))?;
    profile_file.flush().map_err(SpawnError::Fds)?;
    profile_file.rewind().map_err(SpawnError::Fds)?;
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Fds(e.into()))?;
    // Everything the child needs sits above the target numbers, so the
    // dup2 calls below cannot overwrite a source before it is used.
    let mut sources: Vec<(OwnedFd, RawFd)> = vec![
        (
            dup_high(profile_file.as_fd()).map_err(SpawnError::Fds)?,
            PROFILE_FD,
        ),
        (
            dup_high(report_w.as_fd()).map_err(SpawnError::Fds)?,
            REPORT_FD,
        ),
    ];
    for (i, fd) in passed.iter().enumerate() {
        sources.push((
            dup_high(*fd).map_err(SpawnError::Fds)?,
            FIRST_PASSED_FD + i as RawFd,
        ));
    }
    drop(report_w);
    let plan: Vec<(RawFd, RawFd)> = sources.iter().map(|(s, d)| (s.as_raw_fd(), *d)).collect();
    let mut cmd = Command::new(jail);
    cmd.args(jail_args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure runs between fork and exec and calls only dup2,
    // which is async-signal-safe; `plan` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in &plan {
                if libc::dup2(src, dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        path: jail.display().to_string(),
        source,
    })?;
    drop(sources);
    Ok(Jailed {
        child,
        reports: BufReader::new(File::from(report_r)),
    })
}
