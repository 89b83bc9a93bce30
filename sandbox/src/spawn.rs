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

/// Why [`Jailed::wait_started_within`] returned without a started worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStarted {
    /// Setup failed: the events end with the `error` event, or the reports
    /// ended.
    Failed,
    /// No `started` or `error` within the time given.
    TimedOut,
    /// The caller's `abort` said so.
    Aborted,
}

impl Jailed {
    /// Reads report lines until the worker has started or setup failed:
    /// `Ok(events)` ending with `started`, or `Err(events)` ending with the
    /// `error` event (or EOF). Blocking, without a deadline: for tests and
    /// benchmarks; a supervisor uses [`Jailed::wait_started_within`].
    pub fn wait_started(&mut self) -> Result<Vec<Value>, Vec<Value>> {
        self.wait_started_within(std::time::Duration::MAX, &mut || false)
            .map_err(|(events, _)| events)
    }

    /// As [`Jailed::wait_started`], but gives up after `timeout`, and when
    /// `abort` (asked at least every 50 ms) says so. The jail is left as
    /// it is: ending it is the caller's business.
    pub fn wait_started_within(
        &mut self,
        timeout: std::time::Duration,
        abort: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<Value>, (Vec<Value>, NotStarted)> {
        let deadline = std::time::Instant::now().checked_add(timeout);
        let mut events = Vec::new();
        let mut line = String::new();
        loop {
            // The jail writes each report in one write: once the fd is
            // readable, or a line is buffered, read_line does not wait long.
            while !self.reports.buffer().contains(&b'\n') {
                if abort() {
                    return Err((events, NotStarted::Aborted));
                }
                let left = match deadline {
                    Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                        Some(left) if !left.is_zero() => left,
                        _ => return Err((events, NotStarted::TimedOut)),
                    },
                    None => std::time::Duration::MAX,
                };
                let ms = left.as_millis().clamp(1, 50) as libc::c_int;
                let mut pfd = libc::pollfd {
                    fd: self.reports.get_ref().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
                if rc > 0 {
                    break;
                }
                if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return Err((events, NotStarted::Failed));
                }
            }
            line.clear();
            match self.reports.read_line(&mut line) {
                Ok(0) | Err(_) => return Err((events, NotStarted::Failed)),
                Ok(_) => {}
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let event = v["event"].as_str().unwrap_or("").to_owned();
            events.push(v);
            match event.as_str() {
                "started" => return Ok(events),
                "error" => return Err((events, NotStarted::Failed)),
                _ => {}
            }
        }
    }
}

/// Takes each of `numbers` that is free, as a close-on-exec duplicate of
/// /dev/null, and holds it until the result is dropped. A number in use
/// already (by another thread) is left as it is: should that thread close
/// it before std opens its pipe, the pipe may still get it (the exec error
/// is then lost and the jail reads as ended, not started: closed, not
/// open).
fn hold_free(numbers: impl Iterator<Item = RawFd>) -> io::Result<Vec<OwnedFd>> {
    let null = OwnedFd::from(File::open("/dev/null")?);
    let mut held = Vec::new();
    let mut null = Some(null);
    for n in numbers {
        // Opening /dev/null took the lowest free number, which may be one
        // of these: it is held as it is.
        if null.as_ref().is_some_and(|f| f.as_raw_fd() == n) {
            held.extend(null.take());
            continue;
        }
        let Some(src) = held.first().or(null.as_ref()).map(|f| f.as_raw_fd()) else {
            break;
        };
        // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one,
        // the lowest free at or above `n`, owned by nobody else.
        let raw = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, n) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if raw == n {
            held.push(fd);
        }
    }
    Ok(held)
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
    // std opens a pipe for exec errors inside spawn(); were it given one
    // of the numbers the child dup2s onto, the dup2 would close it and an
    // exec error would read as success. Every free target number is held
    // until spawn() returns.
    let _held = hold_free(plan.iter().map(|&(_, d)| d)).map_err(SpawnError::Fds)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_that_cannot_be_executed_is_a_spawn_error() {
        // With ten fds to hand over the child dup2s onto 3 to 14, numbers
        // that are free in a test process when std opens its exec-error
        // pipe: the pipe must not be among them, or the exec error is
        // lost (the parent reads end of file, as after a good exec).
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let passed: Vec<BorrowedFd<'_>> = (0..10).map(|_| a.as_fd()).collect();
        let mut p = Profile::new("/usr/bin/true".into(), 65534, 65534);
        p.passed_fds = 10;
        let e = spawn(
            Path::new("/nonexistent/ccnode-jail"),
            &[],
            &p,
            &passed,
            Stdio::null(),
            Stdio::null(),
        )
        .expect_err("nothing to execute");
        match e {
            SpawnError::Spawn { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound, "{source}")
            }
            other => panic!("{other:?}"),
        }
    }
}
