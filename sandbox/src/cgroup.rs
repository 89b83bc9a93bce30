//! cgroup limits for workers: memory and pids (cgroup v2, when ccnoded has
//! a delegated subtree) and the device allow-list (the cgroup v1 `devices`
//! controller, or on cgroup v2 a device BPF program, [`crate::bpf`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

pub use crate::bpf::DeviceRule;
use crate::profile::{CgroupLimits, DeviceCgroup, DeviceCgroupKind};

/// Why workers run without cgroup limits, or `None` when a delegated
/// cgroup v2 subtree with the memory and pids controllers is available at
/// `parent`.
pub fn unavailable_reason(parent: &Path) -> Option<String> {
    let controllers = match std::fs::read_to_string(parent.join("cgroup.controllers")) {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "{} is not a cgroup v2 directory ({e})",
                parent.display()
            ))
        }
    };
    for needed in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Some(format!(
                "the {needed} controller is not available in {}",
                parent.display()
            ));
        }
    }
    let subtree = parent.join("cgroup.subtree_control");
    match std::fs::read_to_string(&subtree) {
        Ok(enabled) => {
            for needed in ["memory", "pids"] {
                if !enabled.split_whitespace().any(|c| c == needed) {
                    return Some(format!(
                        "the {needed} controller is not enabled for children in {}",
                        subtree.display()
                    ));
                }
            }
            None
        }
        Err(e) => Some(format!("cannot read {}: {e}", subtree.display())),
    }
}

/// Creates the worker's own cgroup, `parent/<name>-<this process's pid>`
/// (fresh, as for device groups: see [`place_devices`]), writes its limits
/// and moves `pid` in. The group is removed with [`Group::remove`] once the
/// worker is gone.
/// With `devices`, a loaded device program ([`crate::bpf::load`]), the
/// program is attached to the group before `pid` enters it: one group
/// carries both (cgroup v2 gives a process one group).
pub fn place(
    cg: &CgroupLimits,
    pid: i32,
    devices: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<Group> {
    let group = Group::create(&cg.parent, &cg.name)?;
    let fill = || -> io::Result<()> {
        let dir = &group.path;
        std::fs::write(dir.join("memory.max"), cg.memory_max.to_string())?;
        std::fs::write(dir.join("memory.swap.max"), "0").or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        std::fs::write(dir.join("pids.max"), cg.pids_max.to_string())?;
        if let Some(program) = devices {
            group.attach(program)?;
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
    };
    match fill() {
        Ok(()) => Ok(group),
        Err(e) => {
            group.remove();
            Err(e)
        }
    }
}

/// The controllers ccnoded's workers are limited with, when a delegated
/// cgroup v2 subtree offers them.
const LIMIT_CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// The cgroup v2 group ccnoded was delegated, as taken by
/// [`take_delegation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// The delegated group (under systemd, `…/ccnoded.service`).
    pub group: PathBuf,
    /// The leaf ccnoded moved itself into: `group/ccnoded`.
    pub leaf: PathBuf,
    /// The parent of the workers' groups: `group/workers`.
    pub workers: PathBuf,
    /// Of [`LIMIT_CONTROLLERS`], those enabled for the workers' groups
    /// (the others are not offered to `group`).
    pub enabled: Vec<String>,
}

/// This process's cgroup v2 directory: the `0::` line of
/// `/proc/self/cgroup`, under the `cgroup2` mount of
/// `/proc/self/mountinfo`.
pub fn own_v2_group() -> Result<PathBuf, String> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"));
    own_v2_group_in(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
}

/// [`own_v2_group`] from the two files' text.
fn own_v2_group_in(cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 group (no 0:: line in /proc/self/cgroup)")?;
    if path == "/" {
        return Err(
            "this process is in the root cgroup: nothing was delegated to it (under systemd, \
             Delegate=yes in the unit: the workers drop-in sets it)"
                .to_owned(),
        );
    }
    let rel = path
        .strip_prefix('/')
        .filter(|r| !r.is_empty())
        .ok_or_else(|| format!("/proc/self/cgroup names {path:?}, not a path in the hierarchy"))?;
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "/proc/self/cgroup names {path:?}, not a plain path"
        ));
    }
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split_whitespace().skip(3);
        let (Some(root), Some(point)) = (fields.next(), fields.next()) else {
            continue;
        };
        let root = unescape_mountinfo(root);
        // A mount of a subtree (root other than /) shows only the groups
        // beneath it.
        let under = if root == "/" {
            Some(rel.to_owned())
        } else {
            path.strip_prefix(root.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .map(str::to_owned)
        };
        if let Some(under) = under.filter(|u| !u.is_empty()) {
            return Ok(PathBuf::from(unescape_mountinfo(point)).join(under));
        }
    }
    Err(format!(
        "no cgroup2 mount in /proc/self/mountinfo shows this process's group {path}"
    ))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                u8::try_from(v).ok()
            });
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes the cgroup v2 group `group` that was delegated to this process
/// (systemd's `Delegate=yes`) and lays it out for workers:
///
/// ```text
/// group/                 memory, pids enabled for children (those offered)
/// ├── ccnoded/           this process (all its threads)
/// └── workers/           memory, pids enabled for children
///     └── <worker>-<pid> one group per worker (place, place_devices)
/// ```
///
/// A group whose children have controllers holds no process itself (the
/// kernel's no-internal-process rule), so this process first moves into
/// its own leaf. Existing `ccnoded` and `workers` directories are reused
/// (a restart under the same group). Fails when the group still holds
/// another process, or cannot be written.
pub fn take_delegation(group: &Path) -> Result<Delegation, String> {
    let at = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
    let offered = std::fs::read_to_string(group.join("cgroup.controllers"))
        .map_err(|e| format!("{} is not a cgroup v2 directory ({e})", group.display()))?;
    let enabled: Vec<String> = LIMIT_CONTROLLERS
        .iter()
        .filter(|c| offered.split_whitespace().any(|o| o == **c))
        .map(|c| (*c).to_owned())
        .collect();
    let mkdir = |p: &Path| match std::fs::create_dir(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(at(p, e)),
        _ => Ok(()),
    };
    let leaf = group.join("ccnoded");
    mkdir(&leaf)?;
    // "0": the writing process, with every thread it has.
    std::fs::write(leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("cannot move ccnoded into {}: {e}", leaf.display()))?;
    let others: Vec<String> = std::fs::read_to_string(group.join("cgroup.procs"))
        .map_err(|e| at(&group.join("cgroup.procs"), e))?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "{} still holds processes other than ccnoded ({}): a delegated group must be \
             ccnoded's alone",
            group.display(),
            others.join(" ")
        ));
    }
    let workers = group.join("workers");
    mkdir(&workers)?;
    if !enabled.is_empty() {
        let line = enabled
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        for dir in [group, workers.as_path()] {
            let file = dir.join("cgroup.subtree_control");
            std::fs::write(&file, &line)
                .map_err(|e| format!("cannot enable {line:?} in {}: {e}", file.display()))?;
        }
    }
    Ok(Delegation {
        group: group.to_owned(),
        leaf,
        workers,
        enabled,
    })
}

/// How workers' device groups under `parent` are enforced: `V1` when it is
/// a directory of the cgroup v1 `devices` hierarchy, `V2` when it is a
/// cgroup v2 directory and this process can load device programs;
/// otherwise why neither.
pub fn device_cgroup_kind(parent: &Path) -> Result<DeviceCgroupKind, String> {
    if std::fs::metadata(parent.join("devices.allow")).is_ok() {
        return match devices_unavailable_reason(parent) {
            None => Ok(DeviceCgroupKind::V1),
            Some(why) => Err(why),
        };
    }
    if std::fs::metadata(parent.join("cgroup.controllers")).is_ok() {
        return match crate::bpf::unavailable_reason() {
            None => Ok(DeviceCgroupKind::V2),
            Some(why) => Err(format!(
                "{} is a cgroup v2 directory, but device programs cannot be loaded: {why}",
                parent.display()
            )),
        };
    }
    Err(format!(
        "{} is neither a cgroup v1 devices directory (no devices.allow) nor a cgroup v2 \
         directory (no cgroup.controllers)",
        parent.display()
    ))
}

/// Why workers run without a v1 device cgroup, or `None` when `parent` is
/// a directory of the cgroup v1 `devices` hierarchy.
pub fn devices_unavailable_reason(parent: &Path) -> Option<String> {
    for file in ["devices.allow", "devices.deny", "cgroup.procs"] {
        if let Err(e) = std::fs::metadata(parent.join(file)) {
            return Some(format!(
                "{} is not a cgroup v1 devices directory (no {file}: {e})",
                parent.display()
            ));
        }
    }
    None
}

/// A worker's own cgroup (limits or device allow-list), removable after
/// the jail's mount namespace has pivoted away from the host's /sys (the
/// parent directory is held open).
#[derive(Debug)]
pub struct Group {
    parent: std::fs::File,
    name: String,
    pub path: PathBuf,
}

impl Group {
    /// Creates `parent/<name>-<this process's pid>` (unique among live
    /// jails, so a group is never shared and no worker's start rewrites
    /// another's settings). A leftover group of that name (a dead jail's,
    /// whose pid was reused) is removed first; one still in use is an error.
    fn create(parent_dir: &Path, name: &str) -> io::Result<Group> {
        let parent = std::fs::File::open(parent_dir)?;
        let name = format!("{name}-{}", std::process::id());
        let path = parent_dir.join(&name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                std::fs::remove_dir(&path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{} exists and is in use: {e}", path.display()),
                    )
                })?;
                std::fs::create_dir(&path)?;
            }
            Err(e) => return Err(e),
        }
        Ok(Group { parent, name, path })
    }

    /// Attaches a loaded device program to this (cgroup v2) group.
    fn attach(&self, program: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        let dir = std::fs::File::open(&self.path)?;
        crate::bpf::attach(dir.as_fd(), program)
    }

    /// Removes the group once its processes are gone; best effort (a group
    /// still in use, or already removed, stays as it is). The kernel
    /// releases a reaped task's hold on its group a moment after `waitpid`
    /// returns, so a busy group is retried for up to a second.
    pub fn remove(&self) {
        for _ in 0..100 {
            match nix::unistd::unlinkat(
                Some(self.parent.as_raw_fd()),
                self.name.as_str(),
                nix::unistd::UnlinkatFlags::RemoveDir,
            ) {
                Err(nix::errno::Errno::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
}

/// Creates the worker's own device group (a [`Group`]) under `dc.parent`,
/// allows read and write on each of `rules` and no other device, and moves
/// `pid` in. No mknod is granted: the worker has no CAP_MKNOD anyway.
/// v1: `devices.deny` of everything, then a `devices.allow` line a rule.
/// v2: `program` (loaded by the caller from [`crate::bpf::device_program`]
/// of the same rules) attached before `pid` enters.
pub fn place_devices(
    dc: &DeviceCgroup,
    pid: i32,
    rules: &[DeviceRule],
    program: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<Group> {
    let group = Group::create(&dc.parent, &dc.name)?;
    let fill = || -> io::Result<()> {
        match (dc.kind, program) {
            (DeviceCgroupKind::V1, _) => {
                std::fs::write(group.path.join("devices.deny"), "a")?;
                for rule in rules {
                    let line = rule.to_string();
                    std::fs::write(group.path.join("devices.allow"), &line).map_err(|e| {
                        io::Error::new(e.kind(), format!("devices.allow {line:?}: {e}"))
                    })?;
                }
            }
            (DeviceCgroupKind::V2, Some(program)) => group.attach(program)?,
            (DeviceCgroupKind::V2, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a cgroup v2 device group needs its device program",
                ))
            }
        }
        std::fs::write(group.path.join("cgroup.procs"), pid.to_string())
    };
    match fill() {
        Ok(()) => Ok(group),
        Err(e) => {
            group.remove();
            Err(e)
        }
    }
}

/// A worker group's name, `<name>-<jail pid>`: the jail's pid.
fn jail_pid_of(name: &std::ffi::OsStr) -> Option<i32> {
    name.to_str()
        .and_then(|n| n.rsplit_once('-'))
        .filter(|(base, pid)| {
            !base.is_empty()
                && !pid.is_empty()
                && !pid.starts_with('0')
                && pid.bytes().all(|b| b.is_ascii_digit())
        })
        .and_then(|(_, pid)| pid.parse::<i32>().ok())
        .filter(|&pid| pid > 0)
}

/// The longest worker name [`worker_group_name`] writes devices into; a
/// longer one names none (and reads as "unknown", which holds every
/// device).
const MAX_GROUP_NAME: usize = 200;

/// The name a worker's groups get (the jail appends `-<its pid>`):
/// `worker`, then `@` and each device the worker is given, so that a
/// group a previous run left behind says which devices its processes may
/// hold. Names without `@` (too long, or made by anything else) name no
/// devices. `worker` must not contain `@` (ccnode's model names cannot).
pub fn worker_group_name(worker: &str, devices: &[String]) -> String {
    let mut name = worker.to_owned();
    name.push('@');
    name.push_str(&devices.join("@"));
    if name.len() > MAX_GROUP_NAME || worker.contains('@') || name.contains('/') {
        return worker.replace(['@', '/'], "_");
    }
    name
}

/// The devices a worker group's name says its worker was given:
/// `Some(vec![])` for none, `None` when the name does not say.
pub fn group_devices(group_name: &str) -> Option<Vec<String>> {
    let (base, _pid) = group_name.rsplit_once('-')?;
    let (_, devices) = base.split_once('@')?;
    Some(
        devices
            .split('@')
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// The processes of a group (`cgroup.procs`, v1 or v2); empty when it has
/// none or cannot be read.
pub fn procs(group: &Path) -> Vec<i32> {
    std::fs::read_to_string(group.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether a group, or a group below it, still holds a process: v2's
/// `cgroup.events` (`populated`), v1's `cgroup.procs`. A group that is gone
/// holds none; one that cannot be read is taken to hold some.
pub fn populated(group: &Path) -> bool {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    match std::fs::read_to_string(group.join("cgroup.events")) {
        Ok(events) => !events.lines().any(|l| l.trim() == "populated 0"),
        Err(e) if gone(&e) && !group.exists() => false,
        Err(_) => match std::fs::read_to_string(group.join("cgroup.procs")) {
            Ok(procs) => procs.lines().any(|l| !l.trim().is_empty()),
            Err(e) => !gone(&e) || group.exists(),
        },
    }
}

/// Worker groups under `parent` (named `<name>-<pid>`, as jails make
/// them) that still hold processes. Called before this ccnoded starts any
/// worker, every one is a previous run's: a worker that outlived its
/// jail, or survived a crash of ccnoded.
pub fn populated_groups(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            jail_pid_of(&e.file_name()).is_some()
                && e.file_type().is_ok_and(|t| t.is_dir())
                && populated(&e.path())
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Removes the groups under `parent` that jails killed before they could
/// clean up left behind: directories named `<name>-<pid>` whose pid is no
/// live process and which hold no process (the kernel refuses to remove a
/// group in use). Anything else under `parent` is left alone. Returns how
/// many were removed.
pub fn sweep(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(pid) = jail_pid_of(&entry.file_name()) else {
            continue;
        };
        let alive = !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if alive || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if std::fs::remove_dir(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_name_says_which_devices_its_worker_has() {
        let devs = vec!["MIG-1".to_string(), "GPU-2".to_string()];
        let name = worker_group_name("worker-m:1-0", &devs);
        assert_eq!(name, "worker-m:1-0@MIG-1@GPU-2");
        assert_eq!(group_devices(&format!("{name}-4242")), Some(devs.clone()));
        let none = worker_group_name("worker-m-0", &[]);
        assert_eq!(group_devices(&format!("{none}-7")), Some(vec![]));
        // Names that do not say: unknown, not "none".
        assert_eq!(group_devices("worker-m-0-7"), None);
        assert_eq!(group_devices("nonsense"), None);
        let long = vec!["MIG-x".repeat(60)];
        let name = worker_group_name("worker-m-0", &long);
        assert!(!name.contains('@'), "{name}");
        assert_eq!(group_devices(&format!("{name}-7")), None);
        assert!(!worker_group_name("a@b/c", &devs).contains(['@', '/']));
    }

    #[test]
    fn a_group_that_is_gone_is_not_populated_and_an_unreadable_one_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!populated(&dir.path().join("gone")));
        // A directory without the files a group has: cannot tell.
        assert!(populated(dir.path()));
        std::fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(!populated(dir.path()));
        std::fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(populated(dir.path()));
        std::fs::remove_file(dir.path().join("cgroup.events")).unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        assert!(!populated(dir.path()));
        std::fs::write(dir.path().join("cgroup.procs"), "12\n").unwrap();
        assert!(populated(dir.path()));
    }

    #[test]
    fn a_plain_directory_is_no_device_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let reason = devices_unavailable_reason(dir.path()).unwrap();
        assert!(
            reason.contains("not a cgroup v1 devices directory"),
            "{reason}"
        );
        let reason = device_cgroup_kind(dir.path()).unwrap_err();
        assert!(
            reason.contains("neither a cgroup v1 devices directory"),
            "{reason}"
        );
        // Half a v1 directory is still none.
        std::fs::write(dir.path().join("devices.allow"), "").unwrap();
        let reason = device_cgroup_kind(dir.path()).unwrap_err();
        assert!(reason.contains("no devices.deny"), "{reason}");
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("not a cgroup v2 directory"), "{reason}");
    }

    const MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 24 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
31 26 0:29 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
";

    #[test]
    fn the_own_group_is_found_under_the_cgroup2_mount() {
        let own = own_v2_group_in("0::/system.slice/ccnoded.service\n", MOUNTINFO).unwrap();
        assert_eq!(
            own,
            Path::new("/sys/fs/cgroup/system.slice/ccnoded.service")
        );
        // Hybrid: v1 lines first, v2 mounted at unified; escapes undone.
        let hybrid = "29 26 0:26 / /sys/fs/cgroup/uni\\040fied rw - cgroup2 cgroup2 rw\n";
        let cgroup = "5:devices:/\n4:memory:/x\n0::/ccnode-test\n";
        assert_eq!(
            own_v2_group_in(cgroup, hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/uni fied/ccnode-test")
        );
        // A mount of a subtree shows what lies beneath its root.
        let sub = "40 26 0:24 /system.slice /srv/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_v2_group_in("0::/system.slice/ccnoded.service\n", sub).unwrap(),
            Path::new("/srv/cg/ccnoded.service")
        );
    }

    #[test]
    fn no_delegation_is_taken_from_the_root_v1_or_a_strange_path() {
        let root = own_v2_group_in("0::/\n", MOUNTINFO).unwrap_err();
        assert!(
            root.contains("root cgroup") && root.contains("Delegate=yes"),
            "{root}"
        );
        let v1 = own_v2_group_in("4:memory:/x\n1:name=systemd:/x\n", MOUNTINFO).unwrap_err();
        assert!(v1.contains("no cgroup v2 group"), "{v1}");
        for bad in ["0::/a/../b\n", "0::/a//b\n", "0::relative\n"] {
            let e = own_v2_group_in(bad, MOUNTINFO).unwrap_err();
            assert!(e.contains("not a"), "{bad}: {e}");
        }
        let unmounted =
            own_v2_group_in("0::/x\n", "31 26 0:29 / /d rw - cgroup cgroup rw\n").unwrap_err();
        assert!(unmounted.contains("no cgroup2 mount"), "{unmounted}");
        let elsewhere = "40 26 0:24 /other /srv/cg rw - cgroup2 cgroup2 rw\n";
        assert!(own_v2_group_in("0::/system.slice/x\n", elsewhere).is_err());
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let e = take_delegation(dir.path()).unwrap_err();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
        assert!(!dir.path().join("ccnoded").exists());
    }

    #[test]
    fn missing_controllers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io memory\n").unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("pids controller"), "{reason}");
        std::fs::write(dir.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "memory\n").unwrap();
        let reason = unavailable_reason(dir.path()).unwrap();
        assert!(reason.contains("not enabled for children"), "{reason}");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "memory pids\n").unwrap();
        assert_eq!(unavailable_reason(dir.path()), None);
    }
}
