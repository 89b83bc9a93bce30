//! What is left of a worker whose jail could not be seen to end it: the
//! worker's PID namespace, watched through a pidfd of its init.
//!
//! When a PID namespace's init exits, the kernel kills every other process
//! in the namespace and waits for them all to be gone before init's exit
//! completes; only then does a pidfd of init poll readable. So a readable
//! pidfd of the namespace init says that no process of the worker is left
//! to hold its device open, however long something stuck in a driver took
//! to die.
//!
//! The jail reports init's pid and start time (`/proc/<pid>/stat` field
//! 22, clock ticks since boot) in its `started` event. The supervisor
//! opens a pidfd for the pid and then checks the start time: equal, the
//! pidfd is that process and not one that got its pid later. Anything
//! not known (no start time, a mismatch, no pidfd support) is never taken
//! to mean "gone".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pid's start time, in clock ticks since boot (`/proc/<pid>/stat`
/// field 22); `None` when the process is gone or the file cannot be read.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses itself: fields after the last ')' are plain. Field 3 is
    // the first of them, so field 22 is the 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// A pidfd for `pid`, if it is still the process that started at
/// `start_time`.
pub(crate) fn open_verified(pid: i32, start_time: u64) -> Option<OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or
    // -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just returned by pidfd_open and is owned by no
    // one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after opening: the pidfd pins the process it refers to, so
    // a start time read now that matches is that process's.
    (self::start_time(pid) == Some(start_time)).then_some(fd)
}

/// Waits for the worker's namespace, if its init was seen.
#[derive(Debug, Clone, Default)]
pub struct Remains {
    init: Arc<Mutex<Option<Arc<OwnedFd>>>>,
}

impl Remains {
    pub(crate) fn set(&self, init: Option<OwnedFd>) {
        *self.init.lock().unwrap_or_else(|e| e.into_inner()) = init.map(Arc::new);
    }

    /// Whether the namespace init of the latest life is known, so that
    /// [`Remains::wait_gone`] can ever say it is gone.
    pub fn watched(&self) -> bool {
        self.init
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Blocks until the latest life's PID namespace is empty (`true`), or
    /// `timeout` passes, or that is not known and never will be (`false`).
    /// `None` waits without limit.
    pub fn wait_gone(&self, timeout: Option<Duration>) -> bool {
        let Some(fd) = self.init.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return false;
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
                }
            };
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                return pfd.revents & libc::POLLIN != 0;
            }
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_past_a_command_name_with_parentheses() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t), "stable");
        assert_eq!(start_time(0), None);
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn a_pidfd_is_only_for_the_process_that_started_then() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap();
        assert!(open_verified(pid, t + 1).is_none(), "another start time");
        let r = Remains::default();
        assert!(!r.wait_gone(Some(Duration::from_millis(1))), "unknown");
        r.set(open_verified(pid, t));
        assert!(r.watched());
        assert!(!r.wait_gone(Some(Duration::from_millis(50))), "alive");
        child.kill().unwrap();
        assert!(r.wait_gone(None));
        child.wait().unwrap();
    }
}
