//! What a jailed worker gets: the profile ccnoded hands to the jail.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The most fds a profile may have handed to its worker.
pub const MAX_PASSED_FDS: u32 = 64;

/// Largest profile the jail reads.
pub const MAX_PROFILE_BYTES: usize = 256 * 1024;

/// The Landlock ABI the default profile needs: ABI 6 scopes abstract Unix
/// sockets and signals; ABI 5 adds ioctl control on device files; ABI 4 TCP.
pub const DEFAULT_LANDLOCK_ABI: u8 = 6;

/// The directories the jail makes itself in a worker's root (a new procfs,
/// a private /tmp, a /dev of the granted devices): nothing is bound under
/// them.
pub const JAIL_MADE: [&str; 3] = ["/proc", "/tmp", "/dev"];

/// Resource limits set with `setrlimit` before the worker starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC. Counts every process of the worker uid on the host.
    pub processes: u64,
    /// RLIMIT_FSIZE, bytes.
    pub file_size: u64,
    /// RLIMIT_MEMLOCK, bytes.
    pub locked_memory: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            open_files: 256,
            processes: 256,
            file_size: 64 * 1024 * 1024,
            locked_memory: 64 * 1024 * 1024,
        }
    }
}

/// cgroup v2 limits, applied when a delegated cgroup v2 subtree exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// The delegated directory under which the worker's cgroup is created.
    pub parent: PathBuf,
    /// Name of the worker's cgroup under `parent`.
    pub name: String,
    /// `memory.max`, bytes.
    pub memory_max: u64,
    /// `pids.max`.
    pub pids_max: u64,
}

/// A device group for the worker: every device node is denied except the
/// ones the worker was given (its GPU or MIG slice and the basic nodes),
/// whatever file system path reaches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCgroup {
    /// The directory under which the worker's group is created: one of the
    /// v1 `devices` hierarchy (it holds `devices.allow`), or a cgroup v2
    /// directory.
    pub parent: PathBuf,
    /// Name of the worker's group under `parent`.
    pub name: String,
    /// How the allow-list is enforced.
    #[serde(default)]
    pub kind: DeviceCgroupKind,
}

/// The two ways the kernel filters devices per cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCgroupKind {
    /// The cgroup v1 `devices` controller: `devices.deny` and
    /// `devices.allow` in a group of that hierarchy.
    #[default]
    V1,
    /// cgroup v2: a device BPF program ([`crate::bpf`]) attached to the
    /// worker's v2 group. When the profile also has v2 limits
    /// ([`Profile::cgroup`]), both must name the same parent: a process has
    /// one v2 group, which then carries the limits and the program.
    V2,
}

/// Everything the jail needs to start one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The program to run, an absolute path.
    pub program: PathBuf,
    /// argv, including argv[0].
    pub args: Vec<String>,
    /// The whole environment of the worker (already filtered).
    pub env: Vec<(String, String)>,
    /// Unprivileged identity; never 0.
    pub uid: u32,
    pub gid: u32,
    /// Directories and files bound read-only (and executable) into the
    /// worker's root at the same paths: the program's libraries.
    pub read_only: Vec<PathBuf>,
    /// Device nodes bound into `/dev` at the same paths, with read, write
    /// and ioctl access: the GPU or MIG slice assigned to this worker.
    pub devices: Vec<PathBuf>,
    /// Paths bound read-only if they exist (driver files outside `/proc`,
    /// `/tmp` and `/dev`, which the jail mounts itself).
    #[serde(default)]
    pub optional_read_only: Vec<PathBuf>,
    /// Size of the private `/tmp`, bytes.
    pub tmp_size: u64,
    pub rlimits: Rlimits,
    /// The Landlock ABI the policy requires.
    pub landlock_min_abi: u8,
    /// Start anyway, best effort, on a kernel below `landlock_min_abi`; the
    /// jail reports the degradation.
    pub landlock_allow_degraded: bool,
    pub cgroup: Option<CgroupLimits>,
    /// The device allow-list in the v1 `devices` controller, when there is
    /// one (cgroup v1 or hybrid hosts).
    #[serde(default)]
    pub device_cgroup: Option<DeviceCgroup>,
    /// How many fds ccnoded hands over (at most [`MAX_PASSED_FDS`]); they arrive in the jail at
    /// [`crate::jail::FIRST_PASSED_FD`] and reach the worker at 3, 4, ...
    pub passed_fds: u32,
    pub hostname: String,
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox profile: {0}")]
pub struct ProfileError(pub String);

impl Profile {
    /// A profile for `program` with the defaults: libraries from the usual
    /// directories, `/dev/null` and friends, no GPU.
    pub fn new(program: PathBuf, uid: u32, gid: u32) -> Profile {
        let argv0 = program.display().to_string();
        Profile {
            program,
            args: vec![argv0],
            env: Vec::new(),
            uid,
            gid,
            read_only: default_library_dirs(),
            devices: Vec::new(),
            optional_read_only: Vec::new(),
            tmp_size: 64 * 1024 * 1024,
            rlimits: Rlimits::default(),
            landlock_min_abi: DEFAULT_LANDLOCK_ABI,
            landlock_allow_degraded: false,
            cgroup: None,
            device_cgroup: None,
            passed_fds: 0,
            hostname: "ccnode-worker".to_owned(),
        }
    }

    /// Checks what the types do not.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let err = |m: String| Err(ProfileError(m));
        if self.uid == 0 || self.gid == 0 {
            return err("workers never run as root (uid or gid 0)".into());
        }
        if !self.program.is_absolute() {
            return err(format!(
                "program {} is not absolute",
                self.program.display()
            ));
        }
        if self.args.is_empty() {
            return err("args must hold at least argv[0]".into());
        }
        for p in self
            .read_only
            .iter()
            .chain(&self.devices)
            .chain(&self.optional_read_only)
            .chain(std::iter::once(&self.program))
        {
            if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return err(format!("path {} must be absolute, without ..", p.display()));
            }
            if p == std::path::Path::new("/") {
                return err("the host root may not be bound into a worker".into());
            }
        }
        // The jail makes these itself (a new procfs, a private /tmp, a /dev
        // of the listed devices); a bind under one would be made first and
        // then fail or be hidden. /proc's global entries (/proc/driver/...)
        // are in the new procfs anyway.
        // The program is not a bind of its directory: one from under these
        // is bound elsewhere (`jail::program_in_jail`).
        for p in self.read_only.iter().chain(&self.optional_read_only) {
            if let Some(top) = JAIL_MADE.into_iter().find(|top| p.starts_with(top)) {
                return err(format!(
                    "path {} is under {top}, which the jail mounts itself",
                    p.display()
                ));
            }
        }
        for d in &self.devices {
            if !d.starts_with("/dev") {
                return err(format!("device {} is not under /dev", d.display()));
            }
        }
        if self
            .env
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
        {
            return err("environment names must be non-empty, without '=' or NUL".into());
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return err("arguments must not contain NUL".into());
        }
        if !(1..=64).contains(&self.landlock_min_abi) {
            return err("landlock_min_abi must be between 1 and 64".into());
        }
        if self.passed_fds > MAX_PASSED_FDS {
            return err(format!(
                "at most {MAX_PASSED_FDS} fds are passed to a worker"
            ));
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return err("hostname must be 1 to 64 bytes".into());
        }
        if let (Some(cg), Some(dc)) = (&self.cgroup, &self.device_cgroup) {
            if dc.kind == DeviceCgroupKind::V2 && cg.parent != dc.parent {
                return err(format!(
                    "a process has one cgroup v2 group: the device group's parent {} must be \
                     the limits' parent {}",
                    dc.parent.display(),
                    cg.parent.display()
                ));
            }
        }
        let names = self
            .cgroup
            .as_ref()
            .map(|c| &c.name)
            .into_iter()
            .chain(self.device_cgroup.as_ref().map(|c| &c.name));
        for name in names {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return err(format!("cgroup name {name:?} is not a plain name"));
            }
        }
        Ok(())
    }
}

/// The directories a dynamically linked program's libraries live in, as
/// far as they exist here.
pub fn default_library_dirs() -> Vec<PathBuf> {
    ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_valid_and_refuses_root() {
        let p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.validate().unwrap();
        assert!(Profile::new("/usr/bin/true".into(), 0, 1000)
            .validate()
            .is_err());
        assert!(Profile::new("/usr/bin/true".into(), 1000, 0)
            .validate()
            .is_err());
        assert!(Profile::new("true".into(), 1000, 1000).validate().is_err());
    }

    #[test]
    fn a_v2_device_group_shares_the_limits_parent() {
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.cgroup = Some(CgroupLimits {
            parent: "/sys/fs/cgroup/ccnode".into(),
            name: "w".into(),
            memory_max: 1 << 30,
            pids_max: 64,
        });
        p.device_cgroup = Some(DeviceCgroup {
            parent: "/sys/fs/cgroup/other".into(),
            name: "w".into(),
            kind: DeviceCgroupKind::V2,
        });
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("one cgroup v2 group"), "{e}");
        // v1 groups live in another hierarchy: any parent.
        p.device_cgroup.as_mut().unwrap().kind = DeviceCgroupKind::V1;
        assert!(p.validate().is_ok());
        let dc = p.device_cgroup.as_mut().unwrap();
        dc.kind = DeviceCgroupKind::V2;
        dc.parent = "/sys/fs/cgroup/ccnode".into();
        assert!(p.validate().is_ok());
    }

    #[test]
    fn paths_are_checked() {
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.read_only.push("/".into());
        assert!(p.validate().is_err());
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.devices.push("/etc/shadow".into());
        assert!(p.validate().is_err());
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.read_only.push("/usr/../etc".into());
        assert!(p.validate().is_err());
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.env.push(("A=B".into(), "x".into()));
        assert!(p.validate().is_err());
        // What the jail mounts itself cannot take a bind: it would be made
        // before the jail's own mount and fail it (EEXIST) or be hidden.
        for (path, top) in [
            ("/proc/driver/nvidia", "/proc"),
            ("/tmp/model", "/tmp"),
            ("/dev/shm", "/dev"),
        ] {
            let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
            p.optional_read_only.push(path.into());
            let e = p.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("under {top}, which the jail mounts")),
                "{e}"
            );
            let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
            p.read_only.push(path.into());
            assert!(p.validate().is_err());
        }
        let mut p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        p.optional_read_only.push("/procfs-not".into());
        p.validate().unwrap();
        // The program may be anywhere (it is bound elsewhere if need be),
        // but not with `..`.
        for program in ["/tmp/worker", "/dev/shm/worker"] {
            Profile::new(program.into(), 1000, 1000).validate().unwrap();
        }
        let p = Profile::new("/usr/../tmp/worker".into(), 1000, 1000);
        assert!(p.validate().is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let p = Profile::new("/usr/bin/true".into(), 1000, 1000);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), p);
    }
}
