//! The jail: a small single-threaded process between ccnoded and a worker.
//!
//! ccnoded is multi-threaded, and after `fork` in a multi-threaded process
//! only async-signal-safe calls are allowed; building a Landlock ruleset or
//! a seccomp program allocates. So ccnoded starts this process (its own
//! executable with `__jail`, or the `ccnode-jail` binary), which can take
//! its time:
//!
//! 1. moves the fds ccnoded left above 99 to 3, 4, ... ([`FDS_ENV`]),
//!    reads the [`Profile`] from fd 3, `unshare`s mount, PID, network, IPC
//!    and UTS namespaces, compiles the seccomp filters, opens every path it
//!    will bind (before anything is mounted over them);
//! 2. forks: the child is PID 1 of the new PID namespace, so when it exits
//!    every process it started dies with it;
//! 3. the child builds a fresh root (tmpfs; read-only binds of the program
//!    and its libraries; a minimal `/dev` with the assigned device nodes; a
//!    new `/proc`; a private size-limited `/tmp`), pivots into it, sets the
//!    hostname, brings loopback up, sets rlimits, joins its cgroup (placed
//!    by the parent), drops to the worker uid/gid with no groups and no
//!    capabilities (bounding, ambient and inheritable sets cleared), sets
//!    `no_new_privs` and the parent-death signal, moves the passed fds to
//!    3, 4, ... and marks every other fd close-on-exec, applies Landlock,
//!    then seccomp, then `execve`s the worker with the profile's
//!    environment only;
//! 4. the confined child is the namespace's init (PID 1 ignores signals it
//!    has no handler for, so the worker must not be PID 1): it forks the
//!    worker as PID 2, makes itself non-dumpable, forwards signals, reaps
//!    orphans and reports how the worker ended; its exit kills everything
//!    left in the namespace;
//! 5. the jail forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to that init, waits,
//!    and exits the way the worker did (same code, or killed by the same
//!    signal), so ccnoded sees a SIGSYS as a SIGSYS. [`KILL_SIGNAL`]
//!    (SIGUSR1) asks it to SIGKILL the init instead: the kernel ends every
//!    other process of the namespace before the init can be reaped, so
//!    when the jail exits (killed by SIGKILL, as it reports) the worker is
//!    gone, its device files closed, and its cgroups removed. A SIGKILL
//!    to the jail itself leaves the init to its parent-death signal,
//!    asynchronously, and the cgroups behind.
//!
//! Progress and failures are reported as JSON lines on fd 4.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};
use serde_json::{json, Value};

use crate::profile::{DeviceCgroupKind, Profile, MAX_PROFILE_BYTES};

/// The jail reads its profile from this fd.
pub const PROFILE_FD: RawFd = 3;
/// The jail writes JSON-line reports to this fd.
pub const REPORT_FD: RawFd = 4;
/// Fds for the worker arrive here, and reach the worker at 3, 4, ...
pub const FIRST_PASSED_FD: RawFd = 5;

/// The environment variable that tells the jail where [`crate::spawn`]
/// left its descriptors: their numbers, comma-separated, in the order
/// profile, report pipe, passed fds. The jail moves them to
/// [`PROFILE_FD`], [`REPORT_FD`], [`FIRST_PASSED_FD`], ... before anything
/// else (a multi-threaded parent cannot safely do it between fork and
/// exec). Without it the descriptors are expected at those numbers already.
pub const FDS_ENV: &str = "CCNODE_JAIL_FDS";

/// At most this many descriptors in [`FDS_ENV`]: the profile, the report
/// pipe and the most a profile may pass.
const MAX_ADOPTED: usize = 2 + crate::profile::MAX_PASSED_FDS as usize;

/// Exit code of the jail when the worker could not be started.
pub const EXIT_SETUP_FAILED: i32 = 125;

/// Removes the worker's cgroup (limits or devices) on every way out of the
/// parent once the worker was placed in it (best effort: see
/// `Group::remove`).
struct RemoveOnDrop(crate::cgroup::Group);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Device nodes every worker gets (read and write, no ioctl).
const BASIC_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Where the new root is assembled, inside the jail's own mount namespace.
const NEW_ROOT: &str = "/tmp";

/// A failed step of the setup.
#[derive(Debug)]
struct SetupError {
    stage: &'static str,
    message: String,
}

fn fail<E: std::fmt::Display>(stage: &'static str) -> impl Fn(E) -> SetupError {
    move |e| SetupError {
        stage,
        message: e.to_string(),
    }
}

/// Writes report lines to fd 4, or to stderr if fd 4 is not open.
struct Reporter {
    out: Option<File>,
}

impl Reporter {
    fn new() -> Reporter {
        // SAFETY: F_GETFD only queries the descriptor table.
        let open = unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } != -1;
        let out = open.then(|| {
            // SAFETY: REPORT_FD is open (checked above) and handed to us by
            // our parent for this purpose; nothing else in this process owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(REPORT_FD) };
            let _ = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            File::from(fd)
        });
        Reporter { out }
    }

    fn send(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        match &mut self.out {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => eprint!("ccnode-jail: {line}"),
        }
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

/// Writes one report line with a single write(2): lines stay whole, and a
/// line costs one system call, not one per token.
fn send_line(out: &mut File, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// The signal that asks a running jail to end its worker now: it SIGKILLs
/// the namespace's init, waits for it (and so for every process of the
/// namespace), removes the worker's cgroups and exits killed by SIGKILL.
/// Before the jail has forked the init, the signal's default action ends
/// the jail, which then holds no cgroup.
pub const KILL_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR1;

extern "C" fn kill_init(_: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Whether the child has its own handlers (the jail: init said `running`;
/// init: the worker is exec'd). Until then a forwarded signal would be
/// lost (a namespace's init gets only signals it handles), so the last one
/// waits in [`PENDING`].
static RUNNING: AtomicBool = AtomicBool::new(false);
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    if !RUNNING.load(Ordering::SeqCst) {
        PENDING.store(sig, Ordering::SeqCst);
        return;
    }
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// From now on signals are forwarded at once; one that came before is
/// forwarded now. A signal during the swap is forwarded by its handler,
/// or swapped here: either way once.
fn start_forwarding() {
    RUNNING.store(true, Ordering::SeqCst);
    let sig = PENDING.swap(0, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::Relaxed);
    if sig != 0 && pid > 0 {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Moves the descriptors named in [`FDS_ENV`] to 3, 4, ...: all are
/// checked before any is moved, so on an error nothing has moved.
fn adopt_fds() -> Result<(), SetupError> {
    let Some(list) = std::env::var_os(FDS_ENV) else {
        return Ok(());
    };
    let bad = |message: String| SetupError {
        stage: "fds",
        message,
    };
    let list = list
        .to_str()
        .ok_or_else(|| bad(format!("{FDS_ENV} is not UTF-8")))?;
    let fds: Vec<RawFd> = list
        .split(',')
        .map(|n| n.parse::<RawFd>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad(format!("{FDS_ENV}={list:?} is not a list of fd numbers")))?;
    if fds.len() > MAX_ADOPTED {
        return Err(bad(format!("{FDS_ENV} names more than {MAX_ADOPTED} fds")));
    }
    let first_free = PROFILE_FD + fds.len() as RawFd;
    for (i, &fd) in fds.iter().enumerate() {
        if fd < first_free || fds[..i].contains(&fd) {
            return Err(bad(format!(
                "{FDS_ENV}={list:?}: each fd must be distinct and at least {first_free}"
            )));
        }
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(bad(format!("{FDS_ENV}: fd {fd} is not open")));
        }
    }
    for (i, &fd) in fds.iter().enumerate() {
        let to = PROFILE_FD + i as RawFd;
        // SAFETY: dup2 and close on descriptor numbers handed to the jail
        // for this; every source is above every target (checked), so no
        // source is overwritten before it is moved. dup2 leaves `to`
        // inheritable, as the setup expects.
        if unsafe { libc::dup2(fd, to) } < 0 || unsafe { libc::close(fd) } < 0 {
            return Err(bad(format!(
                "moving fd {fd} to {to}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The jail's entry point. Never returns.
pub fn main() -> ! {
    // Before anything that could open a descriptor.
    let adopted = adopt_fds();
    let mut report = Reporter::new();
    if let Err(e) = adopted {
        report.send(&json!({"event": "error", "stage": e.stage, "message": e.message}));
        std::process::exit(EXIT_SETUP_FAILED);
    }
    let code = match run(&mut report) {
        Ok(code) => code,
        Err(e) => {
            report.send(&json!({"event": "error", "stage": e.stage, "message": e.message}));
            EXIT_SETUP_FAILED
        }
    };
    std::process::exit(code)
}

fn read_profile() -> Result<Profile, SetupError> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(PROFILE_FD, libc::F_GETFD) } == -1 {
        return Err(SetupError {
            stage: "profile",
            message: "no profile on fd 3: ccnode-jail is started by ccnoded, not by hand \
                      (use `ccnoded sandbox-exec`)"
                .into(),
        });
    }
    // SAFETY: fd 3 is open (checked) and is ours to consume: the parent
    // passed it for exactly this.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(PROFILE_FD) });
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(fail("profile"))?;
    if bytes.len() > MAX_PROFILE_BYTES {
        return Err(SetupError {
            stage: "profile",
            message: format!("profile larger than {MAX_PROFILE_BYTES} bytes"),
        });
    }
    let profile: Profile = serde_json::from_slice(&bytes).map_err(fail("profile"))?;
    profile.validate().map_err(fail("profile"))?;
    Ok(profile)
}

/// The kernel's Landlock ABI version (0 when Landlock is unavailable).
pub fn kernel_landlock_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with a NULL attribute, size 0 and the
    // VERSION flag only returns the ABI version; it touches no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

/// Where the worker finds its program: at its own path, unless that is
/// under a directory the jail makes itself (`/proc`, `/tmp`, `/dev`; a
/// build tree in /tmp, say), where a bind would be hidden or land in the
/// worker's own writable /tmp. Then at [`PROGRAM_DIR`]`/<file name>`.
pub(crate) fn program_in_jail(program: &Path) -> PathBuf {
    if crate::profile::JAIL_MADE
        .iter()
        .any(|top| program.starts_with(top))
    {
        let name = program
            .file_name()
            .map_or_else(|| "program".into(), |n| n.to_os_string());
        Path::new(PROGRAM_DIR).join(name)
    } else {
        program.to_path_buf()
    }
}

/// The directory a program from under `/proc`, `/tmp` or `/dev` is bound
/// in, inside the worker.
pub(crate) const PROGRAM_DIR: &str = "/.ccnode-program";

/// What the child needs, prepared before the fork.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// (path inside the worker, O_PATH fd of the source, is_dir)
    binds: Vec<(PathBuf, OwnedFd, bool)>,
    devices: Vec<(PathBuf, OwnedFd)>,
    /// `devices.allow` lines for those nodes, from the opened fds (what is
    /// bound is what is allowed, whatever the paths point at later).
    device_rules: Vec<crate::cgroup::DeviceRule>,
    filters: Vec<seccompiler::BpfProgram>,
    landlock_abi: ABI,
    landlock_kernel: i32,
}

fn cstring(s: &[u8], what: &'static str) -> Result<CString, SetupError> {
    CString::new(s).map_err(fail(what))
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(p)?;
    Ok(f.into())
}

fn prepare(profile: &Profile, report: &mut Reporter) -> Result<Prepared, SetupError> {
    let kernel = kernel_landlock_abi();
    let required = i32::from(profile.landlock_min_abi);
    if kernel < required {
        if !profile.landlock_allow_degraded {
            return Err(SetupError {
                stage: "landlock",
                message: format!(
                    "the kernel offers Landlock ABI {kernel}, the policy requires {required}"
                ),
            });
        }
        report.send(
            &json!({"event": "landlock_degraded", "kernel_abi": kernel, "required_abi": required}),
        );
    }
    // Enforce everything the kernel offers (up to what this build knows),
    // not just the policy's minimum; below the minimum, degraded mode asks
    // for the minimum and takes what the kernel gives.
    let target = if kernel >= required {
        kernel.min(7)
    } else {
        required
    };
    let landlock_abi = match target.max(1) {
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        _ => ABI::V7,
    };
    let mut binds = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let program_dir_bound = profile
        .read_only
        .iter()
        .any(|d| profile.program.starts_with(d));
    let mut ro: Vec<(PathBuf, bool)> = profile
        .read_only
        .iter()
        .map(|p| (p.clone(), true))
        .collect();
    let program = program_in_jail(&profile.program);
    if program != profile.program {
        // Under a directory the jail makes itself: bound elsewhere.
        let fd = open_path(&profile.program).map_err(|e| SetupError {
            stage: "paths",
            message: format!("{}: {e}", profile.program.display()),
        })?;
        seen.insert(program.clone());
        binds.push((program.clone(), fd, false));
    } else if !program_dir_bound {
        ro.push((profile.program.clone(), true));
    }
    for p in &profile.optional_read_only {
        ro.push((p.clone(), false));
    }
    for (path, required) in ro {
        if !seen.insert(path.clone()) {
            continue;
        }
        match open_path(&path) {
            Ok(fd) => {
                let is_dir = nix::sys::stat::fstat(fd.as_raw_fd())
                    .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                    .unwrap_or(false);
                binds.push((path, fd, is_dir));
            }
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SetupError {
                    stage: "paths",
                    message: format!("{}: {e}", path.display()),
                })
            }
        }
    }
    let mut devices = Vec::new();
    for d in BASIC_DEVICES
        .iter()
        .map(PathBuf::from)
        .chain(profile.devices.iter().cloned())
    {
        let fd = open_path(&d).map_err(|e| SetupError {
            stage: "devices",
            message: format!("{}: {e}", d.display()),
        })?;
        devices.push((d, fd));
    }
    let mut device_rules = Vec::new();
    for (d, fd) in &devices {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SetupError {
            stage: "devices",
            message: format!("{}: {e}", d.display()),
        })?;
        device_rules.extend(crate::cgroup::DeviceRule::of(&st));
    }
    // argv[0] left at the host path (the profile's default) follows the
    // program to where the worker finds it: a path the worker cannot
    // resolve would mislead whatever reads it (a re-exec, an error message).
    let argv0 = (program != profile.program
        && profile.args.first().map(String::as_bytes)
            == Some(profile.program.as_os_str().as_bytes()))
    .then(|| program.as_os_str().as_bytes());
    Ok(Prepared {
        program: cstring(program.as_os_str().as_bytes(), "program")?,
        argv: profile
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| match argv0 {
                Some(jail_path) if i == 0 => cstring(jail_path, "args"),
                _ => cstring(a.as_bytes(), "args"),
            })
            .collect::<Result<_, _>>()?,
        envp: profile
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "env"))
            .collect::<Result<_, _>>()?,
        binds,
        devices,
        device_rules,
        filters: crate::seccomp::worker_filters().map_err(fail("seccomp"))?,
        landlock_abi,
        landlock_kernel: kernel,
    })
}

fn run(report: &mut Reporter) -> Result<i32, SetupError> {
    let profile = read_profile()?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(|e| SetupError {
        stage: "namespaces",
        message: if e == nix::errno::Errno::EPERM {
            format!(
                "{e}: building a sandbox needs CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, \
                 CAP_SETPCAP and CAP_NET_ADMIN (under systemd: install \
                 ccnoded.service.d/workers.conf, docs/operations.md)"
            )
        } else {
            e.to_string()
        },
    })?;
    // Paths are opened in the new mount namespace: a bind mount's source
    // must belong to the namespace it is mounted in.
    let prepared = prepare(&profile, report)?;
    let device_rules = prepared.device_rules.clone();
    // go: parent -> child once the cgroup is set; status: child -> parent,
    // closed by the worker's execve.
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("pipes"))?;
    let (st_r, st_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("pipes"))?;
    // Keep them clear of the fds the worker will get at 3, 4, ...
    let go_r = high_fd(go_r)?;
    let st_w = high_fd(st_w)?;
    // SAFETY: this process is single-threaded (the jail never starts a
    // thread), so the child may do anything the parent could.
    match unsafe { fork() }.map_err(fail("fork"))? {
        ForkResult::Child => {
            drop(go_w);
            drop(st_r);
            let mut status = File::from(st_w);
            let mut go = File::from(go_r);
            let mut byte = [0u8; 1];
            if go.read_exact(&mut byte).is_err() {
                // The parent gave up (cgroup failure) or died.
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(EXIT_SETUP_FAILED) };
            }
            drop(go);
            let err = match child(&profile, prepared, &mut status) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let line = json!({"event": "error", "stage": err.stage, "message": err.message});
            let _ = send_line(&mut status, &line);
            // SAFETY: _exit is always safe to call; no destructors must run
            // in this half-set-up child.
            unsafe { libc::_exit(EXIT_SETUP_FAILED) }
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            drop(st_w);
            parent(&profile, &device_rules, child, go_w, st_r, report)
        }
    }
}

fn high_fd(fd: OwnedFd) -> Result<OwnedFd, SetupError> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200))
        .map_err(fail("pipes"))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn parent(
    profile: &Profile,
    device_rules: &[crate::cgroup::DeviceRule],
    child: Pid,
    go_w: OwnedFd,
    st_r: OwnedFd,
    report: &mut Reporter,
) -> Result<i32, SetupError> {
    CHILD.store(child.as_raw(), Ordering::Relaxed);
    // Read now, while the child waits for `go`: once it pivots, this
    // process's root is the new one too, whose procfs is the worker's.
    let init_start = crate::remains::start_time(child.as_raw());
    for sig in FORWARDED {
        // SAFETY: the handler only calls kill(2), which is async-signal-safe.
        unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
    }
    // SAFETY: as above.
    unsafe {
        libc::signal(
            KILL_SIGNAL as libc::c_int,
            kill_init as *const () as libc::sighandler_t,
        )
    };
    let kill_child = || {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        reap(child);
    };
    // On cgroup v2 the allow-list is a program, loaded here (after the fork:
    // the child never holds its fd) and attached before the child enters
    // the group. With v2 limits too, the limits' group carries it.
    let program = match &profile.device_cgroup {
        Some(dc) if dc.kind == DeviceCgroupKind::V2 => {
            match crate::bpf::device_program(device_rules).and_then(|p| crate::bpf::load(&p)) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    kill_child();
                    return Err(SetupError {
                        stage: "device_cgroup",
                        message: e.to_string(),
                    });
                }
            }
        }
        _ => None,
    };
    let shared = program.is_some() && profile.cgroup.is_some();
    let cgroup = match &profile.cgroup {
        Some(cg) => match crate::cgroup::place(
            cg,
            child.as_raw(),
            program.as_ref().filter(|_| shared).map(|p| p.as_fd()),
        ) {
            Ok(group) => {
                report.send(&json!({"event": "cgroup", "path": group.path}));
                Some(RemoveOnDrop(group))
            }
            Err(e) => {
                kill_child();
                return Err(SetupError {
                    stage: "cgroup",
                    message: e.to_string(),
                });
            }
        },
        None => {
            report.send(&json!({"event": "cgroup", "path": null}));
            None
        }
    };
    let device_cgroup = match &profile.device_cgroup {
        Some(_) if shared => {
            let path = cgroup.as_ref().map(|g| &g.0.path);
            report.send(&json!({"event": "device_cgroup", "path": path}));
            None
        }
        Some(dc) => match crate::cgroup::place_devices(
            dc,
            child.as_raw(),
            device_rules,
            program.as_ref().map(|p| p.as_fd()),
        ) {
            Ok(group) => {
                report.send(&json!({"event": "device_cgroup", "path": group.path}));
                Some(RemoveOnDrop(group))
            }
            Err(e) => {
                kill_child();
                return Err(SetupError {
                    stage: "device_cgroup",
                    message: e.to_string(),
                });
            }
        },
        None => {
            report.send(&json!({"event": "device_cgroup", "path": null}));
            None
        }
    };
    let mut go = File::from(go_w);
    if go.write_all(&[1]).is_err() {
        kill_child();
        return Err(SetupError {
            stage: "start",
            message: "the worker died during setup".into(),
        });
    }
    drop(go);
    // The namespace init reports setup progress, `running` once the worker
    // has been exec'd, and finally how the worker ended.
    let mut lines = std::io::BufReader::new(File::from(st_r).take(1024 * 1024)).lines();
    let mut ended: Option<Value> = None;
    let mut started = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or(json!({"event": "error", "stage": "report", "message": line}));
        match v["event"].as_str() {
            Some("running") => {
                started = true;
                start_forwarding();
                // The start time lets ccnoded tell this init from a later
                // process with its pid (crate::remains).
                report.send(&json!({
                    "event": "started",
                    "pid": child.as_raw(),
                    "start_time": init_start,
                }));
                continue;
            }
            Some("exited") => {
                ended = Some(v.clone());
            }
            Some("error") if !started => {
                report.send(&v);
                kill_child();
                return Ok(EXIT_SETUP_FAILED);
            }
            _ => {}
        }
        report.send(&v);
    }
    reap_with(child).map_err(fail("wait"))?;
    // Before any exit below (some do not return).
    drop(device_cgroup);
    drop(cgroup);
    let Some(ended) = ended else {
        // The init died without a word: killed from outside, or setup
        // failed before it could say so.
        if !started {
            return Ok(EXIT_SETUP_FAILED);
        }
        report.send(&json!({"event": "exited", "signal": 9, "signal_name": "SIGKILL"}));
        die_like(libc::SIGKILL);
    };
    if let Some(sig) = ended["signal"].as_i64() {
        die_like(sig as i32);
    }
    Ok(ended["code"]
        .as_i64()
        .unwrap_or(i64::from(EXIT_SETUP_FAILED)) as i32)
}

/// Waits for `child` to exit and reaps it, with the signal handlers told
/// first: until it is reaped its pid cannot be another process's, and
/// after that they must not signal it (the jail runs as root in the host's
/// PID namespace). So: wait without reaping, forget the pid, then reap.
fn reap_with(child: Pid) -> Result<(), nix::errno::Errno> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    loop {
        match waitid(Id::Pid(child), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    CHILD.store(0, Ordering::SeqCst);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(()),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn reap(child: Pid) {
    let _ = reap_with(child);
}

/// Ends this process with signal `sig`, as the worker ended.
fn die_like(sig: i32) -> ! {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on this process: no core file, default action
    // for `sig`, unblock it, send it to ourselves.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    std::process::exit(128 + sig)
}

/// Everything after the fork, in the worker-to-be. Returns only on error.
fn child(
    profile: &Profile,
    p: Prepared,
    status: &mut File,
) -> Result<std::convert::Infallible, SetupError> {
    set_pdeathsig()?;
    // A session of its own: no controlling terminal, so inherited stdio
    // cannot be used for terminal ioctls (TIOCSTI) against the admin.
    nix::unistd::setsid().map_err(fail("session"))?;
    build_root(profile, &p)?;
    nix::unistd::sethostname(&profile.hostname).map_err(fail("hostname"))?;
    loopback_up().map_err(fail("network"))?;
    set_rlimits(profile, status)?;
    drop_identity(profile)?;
    // Cleared by the credential change: set it again, then make sure the
    // jail did not die in between (the signal would never come): a write to
    // the status pipe fails once the jail, its only reader, is gone.
    set_pdeathsig()?;
    send_line(
        status,
        &json!({"event": "identity", "uid": profile.uid, "gid": profile.gid}),
    )
    .map_err(|e| SetupError {
        stage: "pdeathsig",
        message: format!("the jail is gone: {e}"),
    })?;
    move_fds(profile, status.as_raw_fd())?;
    let enforced = landlock(profile, &p)?;
    let _ = send_line(
        status,
        &json!({"event": "landlock", "kernel_abi": p.landlock_kernel, "required_abi": profile.landlock_min_abi, "status": enforced}),
    );
    crate::seccomp::install(&p.filters).map_err(fail("seccomp"))?;
    // From here on this process is fully confined: it becomes the
    // namespace's init, the worker its child.
    init(profile, &p, status)
}

/// PID 1 of the worker's namespace, already confined. PID 1 ignores every
/// signal it has no handler for, so the worker runs as PID 2 and this init
/// forwards signals to it, reaps orphans, and reports how it ended.
fn init(
    profile: &Profile,
    p: &Prepared,
    status: &mut File,
) -> Result<std::convert::Infallible, SetupError> {
    let (exec_r, exec_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("pipes"))?;
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = p
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The worker runs as the same uid: keep it from reading this process's
    // memory or /proc entries. (execve makes the worker itself dumpable
    // again, as any process.)
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: this process is single-threaded.
    let worker = match unsafe { fork() }.map_err(fail("fork"))? {
        ForkResult::Child => {
            drop(exec_r);
            // SAFETY: program, argv and envp are NUL-terminated C strings
            // kept alive by `p`, and both arrays end with a null pointer.
            unsafe { libc::execve(p.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            let msg = format!(
                "{}: {}",
                profile.program.display(),
                std::io::Error::last_os_error()
            );
            let _ = File::from(exec_w).write_all(msg.as_bytes());
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(exec_w);
    let mut exec_error = String::new();
    let _ = File::from(exec_r)
        .take(4096)
        .read_to_string(&mut exec_error);
    if !exec_error.is_empty() {
        let _ = waitpid(worker, None);
        return Err(SetupError {
            stage: "exec",
            message: exec_error,
        });
    }
    CHILD.store(worker.as_raw(), Ordering::Relaxed);
    // The worker is exec'd: it has whatever handlers it set up itself, and
    // a signal to it is no longer lost (it is not a namespace's init).
    RUNNING.store(true, Ordering::SeqCst);
    for sig in FORWARDED {
        // SAFETY: the handler only calls kill(2), which is async-signal-safe.
        unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
    }
    let _ = send_line(status, &json!({"event": "running"}));
    let end = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => {
                break json!({"event": "exited", "code": code})
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == worker => {
                break json!({"event": "exited", "signal": sig as i32, "signal_name": sig.as_str()})
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break json!({"event": "error", "stage": "wait", "message": e.to_string()}),
        }
    };
    let _ = send_line(status, &end);
    // Leaving kills whatever the worker left behind in the namespace.
    // SAFETY: _exit is always safe to call.
    unsafe { libc::_exit(0) }
}

/// Signals the jail and the namespace init pass on to the worker.
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

fn set_pdeathsig() -> Result<(), SetupError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(fail("pdeathsig")(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn proc_fd(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn mountpoint(target: &Path, is_dir: bool) -> std::io::Result<()> {
    if is_dir {
        std::fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .map(drop)
    }
}

fn bind(src: &OwnedFd, target: &Path, is_dir: bool, flags: MsFlags) -> Result<(), SetupError> {
    mountpoint(target, is_dir).map_err(|e| SetupError {
        stage: "mounts",
        message: format!("mountpoint {}: {e}", target.display()),
    })?;
    let err = |what: &'static str| {
        move |e: nix::errno::Errno| SetupError {
            stage: "mounts",
            message: format!("{what} {}: {e}", target.display()),
        }
    };
    mount(
        Some(&proc_fd(src)),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("binding"))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(err("remounting"))?;
    // The remount above changes the top mount only: mounts below it in the
    // bound tree keep their own flags (a writable, suid or device-bearing
    // submount). mount_setattr with AT_RECURSIVE sets them on all.
    if is_dir {
        set_recursive(target, flags).map_err(err("remounting submounts of"))?;
    }
    Ok(())
}

/// `struct mount_attr` of linux/mount.h.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The `MOUNT_ATTR_*` bits for the flags `bind` applies.
fn mount_attr_bits(flags: MsFlags) -> u64 {
    [
        (MsFlags::MS_RDONLY, 0x1),
        (MsFlags::MS_NOSUID, 0x2),
        (MsFlags::MS_NODEV, 0x4),
        (MsFlags::MS_NOEXEC, 0x8),
    ]
    .into_iter()
    .filter(|(f, _)| flags.contains(*f))
    .fold(0, |bits, (_, b)| bits | b)
}

/// Sets `flags` on the mount at `target` and every mount below it.
fn set_recursive(target: &Path, flags: MsFlags) -> Result<(), nix::errno::Errno> {
    let path =
        CString::new(target.as_os_str().as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let attr = MountAttr {
        attr_set: mount_attr_bits(flags),
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a NUL-terminated string and `attr` a mount_attr,
    // both alive for the call; the size passed is the struct's.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

fn build_root(profile: &Profile, p: &Prepared) -> Result<(), SetupError> {
    let root = Path::new(NEW_ROOT);
    let m = fail("mounts");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(&m)?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )
    .map_err(&m)?;
    // Private /tmp first, so nothing bound later can be hidden by it.
    let tmp = root.join("tmp");
    std::fs::create_dir(&tmp).map_err(fail("mounts"))?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(
            format!(
                "mode=0700,uid={},gid={},size={}",
                profile.uid, profile.gid, profile.tmp_size
            )
            .as_str(),
        ),
    )
    .map_err(&m)?;
    for (path, fd, is_dir) in &p.binds {
        bind(
            fd,
            &inside(root, path),
            *is_dir,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        )?;
    }
    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(fail("mounts"))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(&m)?;
    for (path, fd) in &p.devices {
        bind(
            fd,
            &inside(root, path),
            false,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        )?;
    }
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(&m)?;
    let proc_dir = root.join("proc");
    std::fs::create_dir(&proc_dir).map_err(fail("mounts"))?;
    // A new procfs: it shows this PID namespace only.
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(&m)?;
    nix::unistd::chdir(root).map_err(&m)?;
    nix::unistd::pivot_root(".", ".").map_err(fail("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(fail("pivot_root"))?;
    nix::unistd::chdir("/").map_err(&m)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(&m)?;
    Ok(())
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `ifr`, a live ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets each limit to the profile's value, or to the limit the jail itself
/// has where that is lower: a worker never gets more than its jail, and the
/// jail needs no CAP_SYS_RESOURCE. Lowered values are reported.
fn set_rlimits(profile: &Profile, status: &mut File) -> Result<(), SetupError> {
    let r = &profile.rlimits;
    for (name, resource, value) in [
        ("core", libc::RLIMIT_CORE, 0),
        ("open_files", libc::RLIMIT_NOFILE, r.open_files),
        ("processes", libc::RLIMIT_NPROC, r.processes),
        ("file_size", libc::RLIMIT_FSIZE, r.file_size),
        ("locked_memory", libc::RLIMIT_MEMLOCK, r.locked_memory),
    ] {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a live rlimit struct.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return Err(fail("rlimits")(std::io::Error::last_os_error()));
        }
        let value = if value > current.rlim_max {
            let _ = send_line(
                status,
                &json!({"event": "rlimit_lowered", "limit": name, "wanted": value, "set": current.rlim_max}),
            );
            current.rlim_max
        } else {
            value
        };
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads a live rlimit struct.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(SetupError {
                stage: "rlimits",
                message: format!("{name}: {}", std::io::Error::last_os_error()),
            });
        }
    }
    Ok(())
}

fn drop_identity(profile: &Profile) -> Result<(), SetupError> {
    use caps::CapSet;
    let c = fail("capabilities");
    for cap in caps::runtime::thread_all_supported() {
        caps::drop(None, CapSet::Bounding, cap).map_err(&c)?;
    }
    let id = fail("identity");
    nix::unistd::setgroups(&[]).map_err(&id)?;
    let gid = Gid::from_raw(profile.gid);
    let uid = Uid::from_raw(profile.uid);
    nix::unistd::setresgid(gid, gid, gid).map_err(&id)?;
    nix::unistd::setresuid(uid, uid, uid).map_err(&id)?;
    caps::clear(None, CapSet::Ambient).map_err(&c)?;
    caps::clear(None, CapSet::Inheritable).map_err(&c)?;
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Bounding] {
        let held = caps::read(None, set).map_err(&c)?;
        if !held.is_empty() {
            return Err(SetupError {
                stage: "capabilities",
                message: format!("{set:?} still holds {held:?}"),
            });
        }
    }
    Ok(())
}

fn move_fds(profile: &Profile, keep_open_until_exec: RawFd) -> Result<(), SetupError> {
    let e = fail("fds");
    for i in 0..profile.passed_fds as RawFd {
        let src = FIRST_PASSED_FD + i;
        let dst = 3 + i;
        // dup2 clears close-on-exec on `dst`. Sources are above their
        // targets, so no source is overwritten before it is moved.
        // SAFETY: dup2 on descriptor numbers; `src` was handed to the jail.
        if unsafe { libc::dup2(src, dst) } < 0 {
            return Err(e(std::io::Error::last_os_error()));
        }
    }
    let first_other = 3 + profile.passed_fds;
    // Everything else closes at exec, including the status pipe, which
    // must stay open until then.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first_other,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(e(std::io::Error::last_os_error()));
    }
    debug_assert!(keep_open_until_exec >= 200);
    Ok(())
}

/// The Landlock rules for the worker's view: bound paths (`true` for a
/// directory), devices, `/proc` and `/tmp`, each with its rights. Every
/// right is one the ruleset for `abi` handles: a rule with a right the
/// ruleset does not handle is refused by the kernel (`IoctlDev` exists from
/// ABI 5, `Truncate` from 3, `Refer` from 2), so a profile asking for an
/// older ABI would otherwise fail to start at all.
fn landlock_rules<'a>(
    abi: ABI,
    binds: impl Iterator<Item = (&'a Path, bool)>,
    devices: impl Iterator<Item = &'a Path>,
) -> Vec<(&'a Path, landlock::BitFlags<AccessFs>)> {
    let handled = AccessFs::from_all(abi);
    let read_exec = AccessFs::from_read(abi);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let basic = AccessFs::ReadFile | AccessFs::WriteFile;
    let tmp = handled & !AccessFs::Execute;
    // Directory-only rights (listing, creating) cannot be granted on files.
    let file_rights = AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::Execute
        | AccessFs::Truncate
        | AccessFs::IoctlDev;
    let mut rules: Vec<(&Path, landlock::BitFlags<AccessFs>)> = Vec::new();
    for (path, is_dir) in binds {
        rules.push((
            path,
            if is_dir {
                read_exec
            } else {
                read_exec & file_rights
            },
        ));
    }
    for path in devices {
        let is_basic = BASIC_DEVICES.iter().any(|b| Path::new(b) == path);
        rules.push((path, if is_basic { basic } else { device }));
    }
    rules.push((Path::new("/proc"), AccessFs::ReadFile | AccessFs::ReadDir));
    rules.push((Path::new("/tmp"), tmp));
    for (_, access) in &mut rules {
        *access &= handled;
    }
    rules
}

fn landlock(profile: &Profile, p: &Prepared) -> Result<&'static str, SetupError> {
    let l = fail("landlock");
    let abi = p.landlock_abi;
    let level = if profile.landlock_allow_degraded {
        CompatLevel::BestEffort
    } else {
        CompatLevel::HardRequirement
    };
    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(abi))
        .map_err(&l)?;
    if abi >= ABI::V4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(&l)?;
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(&l)?;
    }
    let rules = landlock_rules(
        abi,
        p.binds
            .iter()
            .map(|(path, _, is_dir)| (path.as_path(), *is_dir)),
        p.devices.iter().map(|(path, _)| path.as_path()),
    );
    let mut created = ruleset.create().map_err(&l)?;
    for (path, access) in rules {
        let fd = PathFd::new(path).map_err(|e| SetupError {
            stage: "landlock",
            message: format!("{}: {e}", path.display()),
        })?;
        created = created.add_rule(PathBeneath::new(fd, access)).map_err(&l)?;
    }
    let status = created.restrict_self().map_err(&l)?;
    if !status.no_new_privs {
        return Err(SetupError {
            stage: "landlock",
            message: "no_new_privs is not set".into(),
        });
    }
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully_enforced",
        RulesetStatus::PartiallyEnforced if profile.landlock_allow_degraded => "partially_enforced",
        RulesetStatus::NotEnforced if profile.landlock_allow_degraded => "not_enforced",
        other => {
            return Err(SetupError {
                stage: "landlock",
                message: format!("ruleset {other:?} and the policy allows no degraded mode"),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_rules_grant_only_what_the_abi_handles() {
        let abis = [
            ABI::V1,
            ABI::V2,
            ABI::V3,
            ABI::V4,
            ABI::V5,
            ABI::V6,
            ABI::V7,
        ];
        let gpu = Path::new("/dev/nvidia0");
        for abi in abis {
            let handled = AccessFs::from_all(abi);
            let rules = landlock_rules(
                abi,
                [(Path::new("/usr/lib"), true), (Path::new("/worker"), false)].into_iter(),
                [gpu, Path::new("/dev/null")].into_iter(),
            );
            assert_eq!(rules.len(), 6, "{abi:?}");
            for (path, access) in &rules {
                assert!(!access.is_empty(), "{abi:?} {}", path.display());
                assert_eq!(
                    *access & !handled,
                    landlock::BitFlags::empty(),
                    "{abi:?} {}",
                    path.display()
                );
            }
            let of = |p: &str| rules.iter().find(|(q, _)| *q == Path::new(p)).unwrap().1;
            // The GPU keeps its ioctls where the ABI can say so; below 5
            // Landlock does not govern ioctls at all.
            assert_eq!(
                of("/dev/nvidia0").contains(AccessFs::IoctlDev),
                abi >= ABI::V5
            );
            assert!(!of("/dev/null").contains(AccessFs::IoctlDev));
            assert!(!of("/tmp").contains(AccessFs::Execute));
            assert!(of("/usr/lib").contains(AccessFs::Execute));
            assert!(!of("/usr/lib").contains(AccessFs::WriteFile));
            assert!(!of("/worker").contains(AccessFs::ReadDir));
        }
    }

    #[test]
    fn bind_flags_map_to_mount_attributes() {
        let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        assert_eq!(mount_attr_bits(ro), 0x7);
        assert_eq!(
            mount_attr_bits(MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC),
            0xa
        );
        assert_eq!(mount_attr_bits(MsFlags::empty()), 0);
    }
}
