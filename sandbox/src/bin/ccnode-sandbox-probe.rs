//! ccnode-sandbox-probe: a hostile worker. Run it under the worker profile
//! (`ccnoded sandbox-exec -- ccnode-sandbox-probe`) and it tries to escape,
//! reporting each attempt as a JSON line:
//!
//! `{"probe": NAME, "outcome": "allowed" | "blocked", "detail": ...}`
//!
//! and each fact it reads about itself as `{"fact": NAME, "value": ...}`.
//! Every attempt runs in a forked child, so a forbidden system call (which
//! kills the caller with SIGSYS) ends only that attempt. Some attempts are
//! controls that a working sandbox allows (writing its own /tmp, using its
//! assigned device), so a broken probe cannot pass for a tight sandbox.
//!
//! Options: `--passed N` (fds handed over: the first is read, a second is
//! taken for a socket made outside the jail), `--device PATH` (assigned),
//! `--forbidden-device PATH`, `--outside-pid PID` (a process outside),
//! `--abstract NAME` (an abstract socket outside), `--socket PATH` (a
//! Unix socket outside, e.g. ccnoded's admin socket).

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[derive(Default)]
struct Args {
    passed: i32,
    devices: Vec<String>,
    forbidden_devices: Vec<String>,
    outside_pid: Option<i32>,
    abstract_name: Option<String>,
    sockets: Vec<String>,
}

fn parse_args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage(&flag));
        match flag.as_str() {
            "--passed" => a.passed = val().parse().unwrap_or_else(|_| usage("--passed")),
            "--device" => a.devices.push(val()),
            "--forbidden-device" => a.forbidden_devices.push(val()),
            "--outside-pid" => {
                a.outside_pid = Some(val().parse().unwrap_or_else(|_| usage("--outside-pid")))
            }
            "--abstract" => a.abstract_name = Some(val()),
            "--socket" => a.sockets.push(val()),
            _ => usage(&flag),
        }
    }
    a
}

fn usage(flag: &str) -> ! {
    eprintln!("ccnode-sandbox-probe: bad argument {flag:?}; see the source's header for options");
    std::process::exit(2)
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Runs `attempt` in a child: `Ok(detail)` means the action succeeded.
fn probe(name: &str, attempt: impl FnOnce() -> Result<String, String>) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        emit(serde_json::json!({"probe": name, "outcome": "error", "detail": errno()}));
        return;
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the probe is single-threaded; the child only runs the attempt
    // and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        emit(serde_json::json!({"probe": name, "outcome": "error", "detail": errno()}));
        return;
    }
    if pid == 0 {
        drop(r);
        let mut out = std::fs::File::from(w);
        let (code, detail) = match attempt() {
            Ok(d) => (0, d),
            Err(d) => (1, d),
        };
        let _ = out.write_all(detail.as_bytes());
        drop(out);
        // SAFETY: _exit ends the child without running the parent's
        // destructors twice.
        unsafe { libc::_exit(code) };
    }
    drop(w);
    let mut detail = String::new();
    let _ = std::fs::File::from(r)
        .take(4096)
        .read_to_string(&mut detail);
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing into a live int.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let (outcome, detail) = if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        ("allowed", detail)
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let how = if sig == libc::SIGSYS {
            "killed by seccomp (SIGSYS)".to_owned()
        } else {
            format!("killed by signal {sig}")
        };
        ("blocked", how)
    } else {
        ("blocked", detail)
    };
    emit(serde_json::json!({"probe": name, "outcome": outcome, "detail": detail}));
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in probe paths")
}

fn open_flags(path: &str, flags: libc::c_int) -> Result<String, String> {
    // SAFETY: open(2) with a NUL-terminated path.
    let fd = unsafe { libc::open(cstr(path).as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        Err(format!("{path}: {}", errno()))
    } else {
        // SAFETY: `fd` was just opened and is owned here.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(format!("opened {path}"))
    }
}

fn syscall_result(name: &str, rc: libc::c_long) -> Result<String, String> {
    if rc < 0 {
        Err(format!("{name}: {}", errno()))
    } else {
        Ok(format!("{name} returned {rc}"))
    }
}

fn exec(path: &str) -> Result<String, String> {
    let p = cstr(path);
    let argv = [p.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: path, argv and envp are NUL-terminated and null-terminated.
    unsafe { libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(format!("execve {path}: {}", errno()))
}

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

fn facts(args: &Args) {
    for name in [
        "NoNewPrivs",
        "Seccomp",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "Uid",
        "Gid",
        "Groups",
    ] {
        emit(serde_json::json!({"fact": name, "value": status_field(name)}));
    }
    // SAFETY: getpid has no preconditions.
    emit(serde_json::json!({"fact": "pid", "value": unsafe { libc::getpid() }}));
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    emit(serde_json::json!({"fact": "hostname", "value": hostname.trim()}));
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect();
    emit(serde_json::json!({"fact": "interfaces", "value": interfaces}));
    // Every mount point of the view, with its per-mount options.
    let mounts: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                Some((f.get(4)?.to_string(), (*f.get(5)?).into()))
            })
            .collect();
    emit(serde_json::json!({"fact": "mounts", "value": mounts}));
    let argv0 = std::env::args_os().next().unwrap_or_default();
    emit(serde_json::json!({"fact": "argv0", "value": argv0.to_string_lossy()}));
    let mut pids: Vec<i64> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    emit(serde_json::json!({"fact": "visible_pids", "value": pids}));
    // Open fds, as listed by the kernel; the listing's own fd is left out.
    let dir = std::fs::read_dir("/proc/self/fd");
    let mut fds: Vec<i32> = dir
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    let expected: Vec<i32> = (0..3 + args.passed).collect();
    let extra: Vec<i32> = fds
        .iter()
        .copied()
        .filter(|fd| !expected.contains(fd))
        .filter(|fd| {
            // The directory handle read_dir used: gone by now.
            std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok()
        })
        .collect();
    emit(serde_json::json!({"fact": "fds", "value": fds, "unexpected": extra}));
}

fn main() {
    let args = parse_args();
    facts(&args);

    // Files.
    probe("read_etc_shadow", || {
        open_flags("/etc/shadow", libc::O_RDONLY)
    });
    probe("list_root_home", || {
        std::fs::read_dir("/root")
            .map(|_| "listed /root".into())
            .map_err(|e| e.to_string())
    });
    probe("write_outside_tmp", || {
        open_flags("/ccnode-probe", libc::O_WRONLY | libc::O_CREAT)
    });
    probe("write_library_dir", || {
        open_flags("/usr/lib/ccnode-probe", libc::O_WRONLY | libc::O_CREAT)
    });
    probe("write_through_symlink", || {
        let _ = std::fs::remove_file("/tmp/ccnode-link");
        std::os::unix::fs::symlink("/usr/lib/ccnode-probe", "/tmp/ccnode-link")
            .map_err(|e| format!("symlink: {e}"))?;
        open_flags("/tmp/ccnode-link", libc::O_WRONLY | libc::O_CREAT)
    });
    probe("control_write_own_tmp", || {
        std::fs::write("/tmp/ccnode-probe-ok", b"ok")
            .map(|()| "wrote /tmp/ccnode-probe-ok".into())
            .map_err(|e| e.to_string())
    });
    probe("control_read_proc_global", || {
        // /proc/driver/nvidia is not bound in (a bind under /proc would
        // shadow the jail's own procfs): the new procfs carries /proc's
        // global entries. /proc/sys stands for it on a host without the
        // driver.
        std::fs::read_to_string("/proc/sys/kernel/ostype")
            .map(|s| s.trim().to_string())
            .map_err(|e| e.to_string())
    });
    probe("exec_bin_sh", || exec("/bin/sh"));
    probe("exec_from_tmp", || {
        // The copy is created executable (no chmod: seccomp forbids it), so
        // this reaches execve and tests the noexec /tmp and Landlock.
        use std::os::unix::fs::OpenOptionsExt;
        let me = std::fs::read("/proc/self/exe").map_err(|e| format!("read self: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open("/tmp/ccnode-copy")
            .map_err(|e| format!("create: {e}"))?;
        f.write_all(&me).map_err(|e| format!("copy: {e}"))?;
        drop(f);
        exec("/tmp/ccnode-copy")
    });

    // Network.
    probe("tcp_socket", || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        syscall_result("socket(AF_INET, SOCK_STREAM)", fd.into())
    });
    probe("udp_socket", || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) };
        syscall_result("socket(AF_INET6, SOCK_DGRAM)", fd.into())
    });
    for path in &args.sockets {
        probe("connect_unix_socket_outside", || {
            std::os::unix::net::UnixStream::connect(path)
                .map(|_| format!("connected to {path}"))
                .map_err(|e| format!("{path}: {e}"))
        });
    }
    if let Some(name) = &args.abstract_name {
        probe("connect_abstract_socket_outside", || {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| e.to_string())?;
            std::os::unix::net::UnixStream::connect_addr(&addr)
                .map(|_| format!("connected to @{name}"))
                .map_err(|e| format!("@{name}: {e}"))
        });
    }

    // Other processes.
    let outside = args.outside_pid.unwrap_or(1);
    probe("ptrace_attach", || {
        // SAFETY: ptrace with integer arguments.
        let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, outside, 0, 0) };
        syscall_result("ptrace(PTRACE_ATTACH)", rc)
    });
    probe("signal_outside", || {
        // SAFETY: kill(2) with integer arguments.
        let rc = unsafe { libc::kill(outside, 0) };
        syscall_result("kill(outside, 0)", rc.into())
    });
    probe("process_vm_readv_outside", || {
        let mut buf = [0u8; 8];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: 0x400000 as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: process_vm_readv writes at most 8 bytes into `buf`.
        let rc = unsafe { libc::process_vm_readv(outside, &local, 1, &remote, 1, 0) };
        syscall_result("process_vm_readv", rc as libc::c_long)
    });
    probe("read_init_environ", || {
        // PID 1 here is the jail's init, which is not dumpable: its /proc
        // entries belong to root. The host's init is not visible at all.
        std::fs::read("/proc/1/environ")
            .map(|b| format!("read {} bytes", b.len()))
            .map_err(|e| e.to_string())
    });

    // Kernel interfaces a worker must never reach.
    let p = |c: &'static std::ffi::CStr| c.as_ptr() as libc::c_long;
    let raw: [(&str, libc::c_long, [libc::c_long; 5]); 14] = [
        (
            "mount",
            libc::SYS_mount,
            [p(c"none"), p(c"/tmp"), p(c"tmpfs"), 0, 0],
        ),
        (
            "unshare",
            libc::SYS_unshare,
            [libc::CLONE_NEWNS as libc::c_long, 0, 0, 0, 0],
        ),
        (
            "user_namespace",
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as libc::c_long, 0, 0, 0, 0],
        ),
        (
            "clone_new_user",
            libc::SYS_clone,
            [
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_long,
                0,
                0,
                0,
                0,
            ],
        ),
        ("setns", libc::SYS_setns, [0, 0, 0, 0, 0]),
        ("bpf", libc::SYS_bpf, [0, 0, 0, 0, 0]),
        (
            "perf_event_open",
            libc::SYS_perf_event_open,
            [0, 0, -1, -1, 0],
        ),
        ("userfaultfd", libc::SYS_userfaultfd, [0, 0, 0, 0, 0]),
        ("io_uring_setup", libc::SYS_io_uring_setup, [1, 0, 0, 0, 0]),
        ("keyctl", libc::SYS_keyctl, [0, 0, 0, 0, 0]),
        ("setuid_root", libc::SYS_setuid, [0, 0, 0, 0, 0]),
        ("chroot", libc::SYS_chroot, [p(c"/tmp"), 0, 0, 0, 0]),
        ("init_module", libc::SYS_init_module, [0, 0, 0, 0, 0]),
        ("kexec_load", libc::SYS_kexec_load, [0, 0, 0, 0, 0]),
    ];
    for (name, nr, a) in raw {
        probe(name, || syscall_result(name, sys(nr, a)));
    }
    probe("raise_capability", || {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                21, // CAP_SYS_ADMIN
                0,
                0,
            )
        };
        syscall_result("prctl(PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN)", rc.into())
    });

    // Devices.
    for d in &args.devices {
        probe("control_open_assigned_device", || {
            open_flags(d, libc::O_RDWR)
        });
    }
    for d in &args.forbidden_devices {
        probe("open_unassigned_device", || open_flags(d, libc::O_RDWR));
    }

    // Limits.
    probe("exceed_file_size", || {
        // SAFETY: ignoring SIGXFSZ makes the write fail with EFBIG instead.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let mut f = std::fs::File::create("/tmp/ccnode-big").map_err(|e| e.to_string())?;
        let chunk = vec![0u8; 1 << 20];
        for mib in 0..4096 {
            f.write_all(&chunk)
                .map_err(|e| format!("after {mib} MiB: {e}"))?;
        }
        Ok("wrote 4 GiB".into())
    });
    probe("exceed_open_files", || {
        let mut files = Vec::new();
        for n in 0..100_000 {
            match std::fs::File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) => return Err(format!("after {n} opens: {e}")),
            }
        }
        Ok("opened 100000 files".into())
    });
    // Read the first passed fd, a control for the hand-over.
    if args.passed > 0 {
        probe("control_read_passed_fd", || {
            // SAFETY: fd 3 is the first passed fd; the child owns its copy.
            let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(3) });
            let mut s = String::new();
            f.read_to_string(&mut s).map_err(|e| e.to_string())?;
            Ok(s)
        });
    }
    // The second passed fd, when given, is a socket made in the host's
    // network namespace: socket ioctls on it would list the host's
    // interfaces, whatever namespace the jail is in.
    if args.passed > 1 {
        probe("socket_ioctl_host_netns", || interfaces_by_ioctl(4));
    }
    // On a socket of its own the same ioctls are refused too (the filter
    // cannot tell sockets apart).
    probe("socket_ioctl_own", || {
        let s = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
        interfaces_by_ioctl(s.as_raw_fd())
    });
}

/// The IPv4 interfaces the network namespace of socket `fd` has, by
/// SIOCGIFCONF: on a socket made in the host's namespace, the host's.
fn interfaces_by_ioctl(fd: RawFd) -> Result<String, String> {
    // SAFETY: all-zero is a valid ifreq (integers and byte arrays).
    let mut reqs: [libc::ifreq; 64] = unsafe { std::mem::zeroed() };
    let mut conf = libc::ifconf {
        ifc_len: std::mem::size_of_val(&reqs) as libc::c_int,
        ifc_ifcu: libc::__c_anonymous_ifc_ifcu {
            ifcu_req: reqs.as_mut_ptr(),
        },
    };
    // SAFETY: `conf` points at `reqs` and says how large it is; the kernel
    // writes at most that many bytes into it and sets ifc_len.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFCONF, &mut conf) } < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let n = conf.ifc_len as usize / std::mem::size_of::<libc::ifreq>();
    let names: Vec<String> = reqs[..n.min(reqs.len())]
        .iter()
        .map(|r| {
            let bytes: Vec<u8> = r.ifr_name.iter().map(|&c| c as u8).collect();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        })
        .collect();
    Ok(format!("interfaces {names:?}"))
}

/// A raw system call for the probes above. Its arguments are integers,
/// null pointers, or pointers to static C strings; with any of them the
/// kernel reads at most those strings.
fn sys(nr: libc::c_long, a: [libc::c_long; 5]) -> libc::c_long {
    // SAFETY: see the function's doc: no argument points at memory the
    // kernel could write, and every pointer is to a static NUL-terminated
    // string.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) }
}
