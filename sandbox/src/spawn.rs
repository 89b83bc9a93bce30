//! Starting a jailed worker from ccnoded (a multi-threaded process): only
//! close-on-exec flags of its own descriptors change between fork and
//! exec; everything else, moving them to 3, 4, ... included, is the jail's
//! job.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::jail::{FDS_ENV, FIRST_PASSED_FD, PROFILE_FD, REPORT_FD};
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
    // In the order the jail takes them: the profile (to PROFILE_FD), the
    // report pipe (REPORT_FD), the passed fds (FIRST_PASSED_FD, ...). All
    // sit above the numbers the jail moves them to, so no move overwrites
    // a descriptor not yet moved.
    const _: () = assert!(REPORT_FD == PROFILE_FD + 1 && FIRST_PASSED_FD == REPORT_FD + 1);
    let mut sources: Vec<OwnedFd> = vec![
        dup_high(profile_file.as_fd()).map_err(SpawnError::Fds)?,
        dup_high(report_w.as_fd()).map_err(SpawnError::Fds)?,
    ];
    for fd in passed {
        sources.push(dup_high(*fd).map_err(SpawnError::Fds)?);
    }
    drop(report_w);
    // The child only clears close-on-exec on these (all above 99, and
    // open in this process, so std's exec-error pipe cannot have one of
    // their numbers); the jail moves them to 3, 4, ... itself, once it
    // runs alone (`crate::jail::FDS_ENV`). A `dup2` onto 3, 4, ... here
    // could close that pipe: another thread may free a low number just
    // before std takes it.
    let raw: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let numbers = raw
        .iter()
        .map(RawFd::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(jail);
    cmd.args(jail_args)
        .env_clear()
        .env(FDS_ENV, numbers)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure runs between fork and exec and calls only
    // fcntl(F_SETFD), which is async-signal-safe, on descriptors this
    // function owns; `raw` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
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

    /// Starts a jail that does not exist, handing it `passed`.
    fn spawn_missing_jail(passed: &[BorrowedFd<'_>]) -> Result<Jailed, SpawnError> {
        let mut p = Profile::new("/usr/bin/true".into(), 65534, 65534);
        p.passed_fds = passed.len() as u32;
        spawn(
            Path::new("/nonexistent/ccnode-jail"),
            &[],
            &p,
            passed,
            Stdio::null(),
            Stdio::null(),
        )
    }

    #[test]
    fn a_jail_that_cannot_be_executed_is_a_spawn_error() {
        // With ten fds to hand over, the jail would have them at 3 to 14,
        // numbers that are free in a test process when std opens its
        // exec-error pipe: nothing the child does before exec may close
        // that pipe, or the exec error is lost (the parent reads end of
        // file, as after a good exec).
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let passed: Vec<BorrowedFd<'_>> = (0..10).map(|_| a.as_fd()).collect();
        let e = spawn_missing_jail(&passed).expect_err("nothing to execute");
        match e {
            SpawnError::Spawn { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound, "{source}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_exec_error_is_reported_while_other_threads_open_and_close_fds() {
        // Another thread takes and frees low fd numbers all the time, as
        // ccnoded's threads do: whichever number std's exec-error pipe gets,
        // the child must not close it before exec.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let held: Vec<File> = (0..8)
                        .filter_map(|_| File::open("/dev/null").ok())
                        .collect();
                    drop(held);
                }
            })
        };
        let mut lost = 0;
        for _ in 0..2000 {
            // A fresh pair each time: an exec error written to a passed
            // socket instead of std's pipe must not fill it and hang.
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            let passed: Vec<BorrowedFd<'_>> = (0..10).map(|_| a.as_fd()).collect();
            match spawn_missing_jail(&passed) {
                Err(SpawnError::Spawn { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(other) => panic!("{other:?}"),
                Ok(mut j) => {
                    let _ = j.child.wait();
                    lost += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
        assert_eq!(lost, 0, "exec errors read as a start");
    }
}
