//! The workers' seccomp policy: deny by default, kill the process (SIGSYS)
//! on anything not listed. Every allowed call is listed with why a worker
//! (a Rust program loading weights and running CUDA) needs it.
//!
//! Three filters are installed; the kernel applies the strictest verdict:
//! 1. `clone3` answered with `ENOSYS`, so libc falls back to `clone`, whose
//!    flags filter 3 can inspect (clone3 passes its flags in memory, which
//!    seccomp cannot read);
//! 2. socket ioctls (type bytes 0x89, `SIOC*`, and 0x8B, wireless
//!    extensions) answered with `EPERM`: they act on the socket's network
//!    namespace, and a socket made outside the jail (the control socket
//!    ccnoded hands over) would list and query the host's interfaces;
//! 3. the allow-list, default action `KILL_PROCESS`, installed last because
//!    it forbids `seccomp(2)` itself.
//!
//! Deliberately absent (each kills the worker): ptrace, process_vm_readv,
//! process_vm_writev, bpf, perf_event_open, userfaultfd, io_uring_setup,
//! io_uring_enter, io_uring_register, keyctl, add_key, request_key, mount,
//! umount2, pivot_root, chroot, fsopen, fsconfig, fsmount, fspick,
//! move_mount, open_tree, mount_setattr, unshare, setns, kexec_load,
//! kexec_file_load, init_module, finit_module, delete_module, setuid,
//! setgid, setreuid, setregid, setresuid, setresgid, setgroups, setfsuid,
//! setfsgid, capset, personality, acct, swapon, swapoff, reboot, quotactl,
//! syslog, iopl, ioperm, name_to_handle_at, open_by_handle_at, socket for
//! anything but AF_UNIX, and clone with any namespace flag.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building the filters.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter")]
pub struct SeccompError(#[source] seccompiler::BackendError);

/// A syscall a worker may make, and why.
struct Allowed {
    nr: libc::c_long,
    why: &'static str,
}

macro_rules! allow {
    ($($name:ident: $why:literal),* $(,)?) => {
        &[$(Allowed { nr: libc::$name, why: $why }),*]
    };
}

/// The unconditional part of the allow-list.
const ALLOWED: &[Allowed] = allow![
    // Memory: the allocator, CUDA's mappings of device memory, weights.
    SYS_brk: "heap",
    SYS_mmap: "allocator, file and device mappings (CUDA maps the device)",
    SYS_munmap: "releasing mappings",
    SYS_mremap: "growing allocations",
    SYS_mprotect: "thread stack guards; the dynamic loader",
    SYS_madvise: "allocator hints, releasing memory",
    SYS_mlock: "CUDA pins host memory (bounded by RLIMIT_MEMLOCK)",
    SYS_munlock: "unpinning host memory",
    SYS_mincore: "allocator and CUDA probe page residency",
    SYS_membarrier: "runtime memory barriers",
    // Files: reading weights from passed fds, its private /tmp, /proc/self.
    SYS_read: "reading fds",
    SYS_write: "writing fds",
    SYS_pread64: "positioned reads of weights",
    SYS_pwrite64: "positioned writes",
    SYS_readv: "vectored reads",
    SYS_writev: "vectored writes (logging)",
    SYS_openat: "opening files Landlock allows",
    SYS_close: "closing fds",
    SYS_close_range: "closing fds in bulk",
    SYS_lseek: "seeking",
    SYS_fstat: "file metadata",
    SYS_newfstatat: "file metadata",
    SYS_statx: "file metadata",
    SYS_fstatfs: "filesystem metadata (glibc, CUDA)",
    SYS_statfs: "filesystem metadata",
    SYS_getdents64: "listing /proc/self/fd and its tmp",
    SYS_readlink: "resolving /proc/self/exe",
    SYS_readlinkat: "resolving /proc/self/exe",
    SYS_access: "probing files",
    SYS_faccessat: "probing files",
    SYS_faccessat2: "probing files",
    SYS_fcntl: "fd flags, seals on received memfds",
    SYS_dup: "duplicating fds",
    SYS_dup2: "duplicating fds",
    SYS_dup3: "duplicating fds",
    SYS_ftruncate: "sizing files in its tmp",
    SYS_fallocate: "sizing files in its tmp",
    SYS_fsync: "syncing its files",
    SYS_fdatasync: "syncing its files",
    SYS_unlink: "cleaning its tmp",
    SYS_unlinkat: "cleaning its tmp",
    SYS_mkdir: "creating dirs in its tmp",
    SYS_mkdirat: "creating dirs in its tmp",
    SYS_rename: "renaming in its tmp",
    SYS_renameat: "renaming in its tmp",
    SYS_renameat2: "renaming in its tmp",
    SYS_getcwd: "runtime path handling",
    SYS_chdir: "runtime path handling",
    SYS_umask: "file creation",
    SYS_memfd_create: "anonymous buffers (CUDA, allocators)",
    SYS_pipe2: "internal pipes",
    SYS_eventfd2: "event notification (tokio, CUDA)",
    SYS_ioctl: "the GPU driver's interface; Landlock limits it to assigned devices, filter 2 refuses socket ioctls",
    SYS_flock: "advisory locks in its tmp",
    // Time.
    SYS_clock_gettime: "time",
    SYS_clock_getres: "time",
    SYS_clock_nanosleep: "sleeping",
    SYS_nanosleep: "sleeping",
    SYS_gettimeofday: "time",
    SYS_timerfd_create: "timers",
    SYS_timerfd_settime: "timers",
    SYS_timerfd_gettime: "timers",
    // Threads and synchronisation.
    SYS_futex: "locks and condition variables",
    SYS_set_robust_list: "thread start",
    SYS_get_robust_list: "thread start",
    SYS_set_tid_address: "thread start",
    SYS_rseq: "glibc restartable sequences",
    SYS_sched_yield: "spinning locks",
    SYS_sched_getaffinity: "counting usable cores",
    SYS_sched_setaffinity: "pinning its own threads",
    SYS_getpriority: "thread priority queries",
    SYS_arch_prctl: "thread-local storage",
    SYS_prctl: "thread names; nothing it allows can raise privileges under no_new_privs",
    SYS_sigaltstack: "stack overflow detection",
    SYS_rt_sigaction: "signal handlers",
    SYS_rt_sigprocmask: "signal masks",
    SYS_rt_sigreturn: "returning from handlers",
    SYS_rt_sigtimedwait: "waiting for signals",
    SYS_restart_syscall: "interrupted calls",
    SYS_tgkill: "signalling its own threads (Landlock scopes signals)",
    SYS_kill: "signalling its own children (Landlock scopes signals)",
    SYS_wait4: "reaping its children",
    SYS_waitid: "reaping its children",
    SYS_exit: "thread exit",
    SYS_exit_group: "process exit",
    SYS_execve: "starting the worker; Landlock and the mount view limit what can run",
    SYS_fork: "subprocesses (bounded by RLIMIT_NPROC and pids.max)",
    SYS_vfork: "subprocesses",
    // Polling.
    SYS_poll: "std checks fds 0-2 at start; polling",
    SYS_ppoll: "polling",
    SYS_select: "polling",
    SYS_pselect6: "polling",
    SYS_epoll_create1: "event loops",
    SYS_epoll_ctl: "event loops",
    SYS_epoll_wait: "event loops",
    SYS_epoll_pwait: "event loops",
    SYS_epoll_pwait2: "event loops",
    // Sockets: the inherited control socketpair only (socket() is AF_UNIX only).
    SYS_connect: "AF_UNIX only (socket() allows nothing else): glibc NSS, driver daemons; \
                  abstract sockets are Landlock-scoped and in another network namespace",
    SYS_sendmsg: "control socket; receiving fds",
    SYS_recvmsg: "control socket; receiving fds",
    SYS_sendto: "control socket",
    SYS_recvfrom: "control socket",
    SYS_shutdown: "control socket",
    SYS_getsockopt: "control socket",
    SYS_setsockopt: "control socket buffers",
    SYS_getsockname: "control socket",
    SYS_getpeername: "control socket",
    // Identity and limits, read-only.
    SYS_getpid: "identity",
    SYS_getppid: "identity",
    SYS_gettid: "identity",
    SYS_getuid: "identity",
    SYS_geteuid: "identity",
    SYS_getgid: "identity",
    SYS_getegid: "identity",
    SYS_getresuid: "identity",
    SYS_getresgid: "identity",
    SYS_getgroups: "identity",
    SYS_getpgid: "identity",
    SYS_getsid: "identity",
    SYS_setsid: "detaching its own children",
    SYS_getrlimit: "limits (raising hard limits needs a capability it lacks)",
    SYS_prlimit64: "limits (raising hard limits needs a capability it lacks)",
    SYS_getrusage: "resource usage",
    SYS_times: "resource usage",
    SYS_uname: "kernel version checks (glibc, CUDA)",
    SYS_sysinfo: "memory size",
    SYS_getrandom: "randomness (sampling seeds, hash maps)",
    SYS_getcpu: "NUMA placement",
];

fn flags_rule(arg: u8, forbidden: u64) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(forbidden),
        0,
    )
    .map_err(SeccompError)?])
    .map_err(SeccompError)
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// Namespace flags a worker's `clone` may not carry.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME) as u64;

/// The compiled filters, in the order they are to be installed.
pub fn worker_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in ALLOWED {
        debug_assert!(!a.why.is_empty());
        rules.insert(a.nr, Vec::new());
    }
    // clone: only without namespace flags.
    rules.insert(libc::SYS_clone, vec![flags_rule(0, CLONE_NAMESPACES)?]);
    // clone3 is passed by this allow-list (filter 2) and answered ENOSYS
    // by filter 1.
    rules.insert(libc::SYS_clone3, Vec::new());
    // socket and socketpair: AF_UNIX only (argument 0, the domain).
    let unix_only = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(SeccompError)?])
    .map_err(SeccompError)?;
    rules.insert(libc::SYS_socket, vec![unix_only.clone()]);
    rules.insert(libc::SYS_socketpair, vec![unix_only]);
    let allow_list = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch(),
    )
    .map_err(SeccompError)?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let clone3_enosys = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch(),
    )
    .map_err(SeccompError)?;
    let mut ioctl = BTreeMap::new();
    ioctl.insert(
        libc::SYS_ioctl,
        SOCKET_IOCTL_TYPES
            .iter()
            .map(|&t| ioctl_type_rule(t))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let socket_ioctls_eperm = SeccompFilter::new(
        ioctl,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch(),
    )
    .map_err(SeccompError)?;
    // The allow-list goes last: it forbids seccomp(2), which installs
    // filters. The kernel applies the strictest verdict of all filters,
    // whatever their order.
    Ok(vec![
        clone3_enosys.try_into().map_err(SeccompError)?,
        socket_ioctls_eperm.try_into().map_err(SeccompError)?,
        allow_list.try_into().map_err(SeccompError)?,
    ])
}

/// ioctl type bytes (bits 8 to 15 of the request) of socket ioctls, which
/// act on the socket's network namespace: 0x89 (`SIOC*`: interfaces,
/// routes, ARP, bridges) and 0x8B (wireless extensions). The NVIDIA
/// driver's are type `'F'` (0x46), terminals' 0x54.
const SOCKET_IOCTL_TYPES: [u64; 2] = [0x89, 0x8b];

/// Matches an ioctl whose request (argument 1, 32 bits as the kernel
/// takes it) has type byte `ty`.
fn ioctl_type_rule(ty: u64) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        ty << 8,
    )
    .map_err(SeccompError)?])
    .map_err(SeccompError)
}

/// Installs the filters on the calling thread. `no_new_privs` must be set.
pub fn install(filters: &[BpfProgram]) -> Result<(), seccompiler::Error> {
    for f in filters {
        seccompiler::apply_filter(f)?;
    }
    Ok(())
}

/// The allow-list as (syscall number, reason), for documentation and tests.
pub fn allowed() -> impl Iterator<Item = (libc::c_long, &'static str)> {
    ALLOWED.iter().map(|a| (a.nr, a.why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let f = worker_filters().unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn dangerous_calls_are_not_allowed() {
        let allowed: Vec<_> = allowed().map(|(nr, _)| nr).collect();
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_keyctl,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_open_tree,
            libc::SYS_move_mount,
            libc::SYS_fsopen,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_socket,
            libc::SYS_clone,
        ] {
            assert!(
                !allowed.contains(&nr),
                "syscall {nr} is on the unconditional list"
            );
        }
    }

    #[test]
    fn every_entry_says_why() {
        assert!(allowed().all(|(_, why)| why.len() > 3));
    }
}
