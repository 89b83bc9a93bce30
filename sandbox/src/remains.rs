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
//! opens a pidfd for the pid and then checks that it is still init: its
//! start time is the one reported, or (where ccnoded may not read a
//! process of the worker's uid, as under systemd's `ProtectProc=invisible`)
//! the jail, ccnoded's own unreaped child, lists it among its children
//! (`/proc/<jail>/task/<jail>/children`): the jail forks nothing else, so
//! a pid it lists after the pidfd was opened was init's throughout. Anything
//! not known (neither check passes, no pidfd support) is never taken to
//! mean "gone".

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

/// The children of `pid` (of each of its threads, at most 64 threads);
/// empty when they cannot be read.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .take(64)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// A pidfd for `pid`, if it is still the process that started at
/// `start_time`, or still a child of `parent` (which must fork no other).
pub(crate) fn open_verified(pid: i32, start_time: Option<u64>, parent: i32) -> Option<OwnedFd> {
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
    // Checked after opening: the pidfd refers to whatever had the pid at
    // that moment. A process that has it now and had it before (init was
    // reported before the pidfd was opened) is that process, unless the
    // pid was freed and reused in between, which a matching start time (a
    // reuse within one clock tick aside) or being the parent's only child
    // rules out.
    let same_start = start_time.is_some() && self::start_time(pid) == start_time;
    (same_start || children_of(parent).contains(&pid)).then_some(fd)
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
        // A command name with spaces and a parenthesis: counting fields
        // from the start would read the wrong one.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a) (b c");
        std::fs::copy("/bin/sleep", &odd).unwrap();
        let mut child = std::process::Command::new(&odd).arg("600").spawn().unwrap();
        let pid = child.id() as i32;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(stat.contains("(a) (b c)"), "{stat}");
        let naive: Option<u64> = stat.split(' ').nth(21).and_then(|f| f.parse().ok());
        let got = start_time(pid).expect("its start time");
        assert!(got >= t, "started after this test: {got} < {t}");
        assert_ne!(Some(got), naive, "{stat}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_pidfd_is_only_for_the_process_that_started_then() {
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap();
        let me = std::process::id() as i32;
        assert!(
            open_verified(pid, Some(t + 1), 1).is_none(),
            "another start time, and not a child of the parent named"
        );
        assert!(open_verified(pid, None, 1).is_none());
        assert!(open_verified(pid, None, me).is_some(), "our child");
        let r = Remains::default();
        assert!(!r.wait_gone(Some(Duration::from_millis(1))), "unknown");
        r.set(open_verified(pid, Some(t), 1));
        assert!(r.watched());
        assert!(!r.wait_gone(Some(Duration::from_millis(50))), "alive");
        child.kill().unwrap();
        assert!(r.wait_gone(None));
        child.wait().unwrap();
    }
}
