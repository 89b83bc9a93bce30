//! The hostile-worker suite: ccnode-sandbox-probe runs as a worker inside
//! the real jail (namespaces, Landlock, seccomp, no capabilities, rlimits)
//! and tries to escape; every attempt must be blocked, every control must
//! work. Also: setup failures, exit and signal mirroring, the death of the
//! jail taking the worker with it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ccnode_sandbox::{spawn, Profile};
use serde_json::Value;

const JAIL: &str = env!("CARGO_BIN_EXE_ccnode-jail");
const PROBE: &str = env!("CARGO_BIN_EXE_ccnode-sandbox-probe");
const NOBODY: u32 = 65534;
const PATIENCE: Duration = Duration::from_secs(60);

/// Fake GPU device nodes (char 1:3, like /dev/null) under /dev, removed on drop.
struct FakeDevices {
    paths: Vec<PathBuf>,
}

impl FakeDevices {
    fn new(n: usize) -> FakeDevices {
        let paths: Vec<PathBuf> = (0..n)
            .map(|i| PathBuf::from(format!("/dev/ccnode-test-{}-gpu{i}", std::process::id())))
            .collect();
        for p in &paths {
            let _ = std::fs::remove_file(p);
            nix::sys::stat::mknod(
                p,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .expect("mknod a fake device (tests run as root)");
            // mknod honours the umask; GPU nodes are usually 0666.
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .unwrap();
            assert!(std::fs::metadata(p).unwrap().file_type().is_char_device());
        }
        FakeDevices { paths }
    }
}

impl Drop for FakeDevices {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn profile(program: &str, args: &[&str]) -> Profile {
    let mut p = Profile::new(PathBuf::from(program), NOBODY, NOBODY);
    p.args = std::iter::once(program)
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect();
    p.rlimits.file_size = 8 * 1024 * 1024;
    p.rlimits.open_files = 64;
    p
}

struct Run {
    status: ExitStatus,
    stdout: String,
    events: Vec<Value>,
}

fn run(profile: &Profile, passed: &[std::os::fd::BorrowedFd<'_>]) -> Run {
    let mut jailed = spawn(
        Path::new(JAIL),
        &[],
        profile,
        passed,
        Stdio::piped(),
        Stdio::inherit(),
    )
    .expect("spawn the jail");
    let mut stdout = String::new();
    jailed
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = wait(&mut jailed.child);
    let mut rest = String::new();
    jailed.reports.read_to_string(&mut rest).unwrap();
    let events = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Run {
        status,
        stdout,
        events,
    }
}

/// Starts `p` in the jail with no stdout, reports readable.
fn start(p: &Profile) -> ccnode_sandbox::Jailed {
    spawn(
        Path::new(JAIL),
        &[],
        p,
        &[],
        Stdio::null(),
        Stdio::inherit(),
    )
    .expect("spawn the jail")
}

fn wait(child: &mut std::process::Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the jail did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_escape_is_blocked_and_every_control_works() {
    let devices = FakeDevices::new(2);
    let outside = tempfile::tempdir().unwrap();
    let sock_path = outside.path().join("outside.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    let abstract_name = format!("ccnode-probe-{}", std::process::id());
    let _abstract = {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    let (passed_r, mut passed_w) = std::io::pipe().unwrap();
    passed_w.write_all(b"handed-over").unwrap();
    drop(passed_w);
    // A socket of the host's network namespace, as the worker's control
    // socket is: its socket ioctls would see the host's interfaces.
    let (host_sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();

    let pid = std::process::id().to_string();
    let dev0 = devices.paths[0].display().to_string();
    let dev1 = devices.paths[1].display().to_string();
    let sock = sock_path.display().to_string();
    let mut p = profile(
        PROBE,
        &[
            "--passed",
            "2",
            "--device",
            &dev0,
            "--forbidden-device",
            &dev1,
            "--outside-pid",
            &pid,
            "--abstract",
            &abstract_name,
            "--socket",
            &sock,
        ],
    );
    p.devices = vec![devices.paths[0].clone()];
    p.passed_fds = 2;
    p.env = vec![("CCNODE_PROBE".into(), "1".into())];
    let r = run(&p, &[passed_r.as_fd(), host_sock.as_fd()]);
    assert!(
        r.status.success(),
        "{:?}\n{}\n{:?}",
        r.status,
        r.stdout,
        r.events
    );

    let mut facts = BTreeMap::new();
    let mut probes: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for line in r.stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(f) = v["fact"].as_str() {
            facts.insert(f.to_owned(), v.clone());
        } else {
            probes
                .entry(v["probe"].as_str().unwrap().to_owned())
                .or_default()
                .push((
                    v["outcome"].as_str().unwrap().to_owned(),
                    v["detail"].as_str().unwrap_or_default().to_owned(),
                ));
        }
    }
    let fact = |k: &str| facts[k]["value"].clone();
    assert_eq!(fact("NoNewPrivs"), "1");
    assert_eq!(fact("Seccomp"), "2");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(fact(cap), "0000000000000000", "{cap}");
    }
    assert_eq!(fact("Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(fact("Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(fact("Groups"), "");
    assert_eq!(
        fact("pid"),
        2,
        "PID 2 of its own namespace, under the jail's init"
    );
    assert_eq!(fact("hostname"), "ccnode-worker");
    assert_eq!(fact("interfaces"), serde_json::json!(["lo"]));
    assert_eq!(
        fact("visible_pids"),
        serde_json::json!([1, 2]),
        "only the namespace's init and itself"
    );
    assert_eq!(
        facts["fds"]["unexpected"],
        serde_json::json!([]),
        "fds: {}",
        facts["fds"]
    );

    let controls = [
        "control_write_own_tmp",
        "control_open_assigned_device",
        "control_read_passed_fd",
        "control_read_proc_global",
    ];
    let expected_blocked = [
        "read_etc_shadow",
        "list_root_home",
        "write_outside_tmp",
        "write_library_dir",
        "write_through_symlink",
        "exec_bin_sh",
        "exec_from_tmp",
        "tcp_socket",
        "udp_socket",
        "connect_unix_socket_outside",
        "connect_abstract_socket_outside",
        "ptrace_attach",
        "signal_outside",
        "process_vm_readv_outside",
        "read_init_environ",
        "mount",
        "unshare",
        "user_namespace",
        "clone_new_user",
        "setns",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "keyctl",
        "setuid_root",
        "chroot",
        "init_module",
        "kexec_load",
        "raise_capability",
        "open_unassigned_device",
        "exceed_file_size",
        "exceed_open_files",
        "socket_ioctl_host_netns",
        "socket_ioctl_own",
    ];
    for name in controls {
        let got = probes
            .get(name)
            .unwrap_or_else(|| panic!("probe {name} did not run"));
        assert!(got.iter().all(|(o, _)| o == "allowed"), "{name}: {got:?}");
    }
    assert_eq!(probes["control_read_passed_fd"][0].1, "handed-over");
    assert_eq!(probes["control_read_proc_global"][0].1, "Linux");
    for name in expected_blocked {
        let got = probes
            .get(name)
            .unwrap_or_else(|| panic!("probe {name} did not run"));
        assert!(got.iter().all(|(o, _)| o == "blocked"), "{name}: {got:?}");
    }
    // Every probe the binary ran is accounted for above.
    for name in probes.keys() {
        assert!(
            controls.contains(&name.as_str()) || expected_blocked.contains(&name.as_str()),
            "unclassified probe {name}"
        );
    }
    // Seccomp, not chance, stops the kernel interfaces.
    for name in [
        "mount",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "tcp_socket",
        "ptrace_attach",
    ] {
        assert!(
            probes[name][0].1.contains("SIGSYS"),
            "{name}: {:?}",
            probes[name]
        );
    }
    // Reaching execve and being refused there, not killed on the way.
    assert!(
        probes["exec_from_tmp"][0]
            .1
            .contains("execve /tmp/ccnode-copy"),
        "{:?}",
        probes["exec_from_tmp"]
    );
    // The seccomp filter refuses socket ioctls (EPERM) rather than the
    // jail's namespace hiding interfaces: the host's socket would show
    // them. The PID namespace, not a permission check, hides the pid
    // outside.
    for name in ["socket_ioctl_host_netns", "socket_ioctl_own"] {
        assert!(
            probes[name][0].1.contains("Operation not permitted"),
            "{name}: {:?}",
            probes[name]
        );
    }
    assert!(
        probes["signal_outside"][0].1.contains("No such process"),
        "{:?}",
        probes["signal_outside"]
    );
    // The limits are the profile's.
    assert!(
        probes["exceed_file_size"][0].1.contains("after 8 MiB"),
        "{:?}",
        probes["exceed_file_size"]
    );
    assert!(probes["exceed_open_files"][0]
        .1
        .contains("Too many open files"));
    let landlock = r.events.iter().find(|e| e["event"] == "landlock").unwrap();
    assert_eq!(landlock["status"], "fully_enforced", "{landlock}");
    let exited = r.events.last().unwrap();
    assert_eq!(
        (&exited["event"], &exited["code"]),
        (&"exited".into(), &0.into())
    );
}

#[test]
fn the_jail_reports_landlock_and_start() {
    let p = profile("/usr/bin/true", &[]);
    let mut jailed = start(&p);
    let events = jailed.wait_started().expect("started");
    let ll = events
        .iter()
        .find(|e| e["event"] == "landlock")
        .expect("landlock event");
    assert_eq!(ll["status"], "fully_enforced", "{ll}");
    assert!(events.last().unwrap()["pid"].as_i64().unwrap() > 1);
    assert!(wait(&mut jailed.child).success());
}

#[test]
fn exit_codes_and_seccomp_kills_are_mirrored() {
    use std::os::unix::process::ExitStatusExt;
    let r = run(&profile("/usr/bin/false", &[]), &[]);
    assert_eq!(r.status.code(), Some(1));
    // `unshare` is forbidden: the worker dies of SIGSYS, so does the jail.
    let r = run(
        &profile("/usr/bin/unshare", &["--mount", "/usr/bin/true"]),
        &[],
    );
    assert_eq!(r.status.signal(), Some(libc::SIGSYS), "{:?}", r.events);
    let exited = r.events.iter().find(|e| e["event"] == "exited").unwrap();
    assert_eq!(exited["signal_name"], "SIGSYS");
}

#[test]
fn setup_failures_are_reported_not_started() {
    let r = run(&profile("/nonexistent/worker", &[]), &[]);
    assert_eq!(r.status.code(), Some(125));
    let err = r
        .events
        .iter()
        .find(|e| e["event"] == "error")
        .expect("an error event");
    assert_eq!(err["stage"], "paths", "{err}");

    let mut p = profile("/usr/bin/true", &[]);
    p.landlock_min_abi = 60;
    let r = run(&p, &[]);
    assert_eq!(r.status.code(), Some(125));
    let err = r.events.iter().find(|e| e["event"] == "error").unwrap();
    assert_eq!(err["stage"], "landlock", "{err}");
    assert!(err["message"].as_str().unwrap().contains("requires 60"));

    // Degraded mode is a policy decision, and it is reported.
    p.landlock_allow_degraded = true;
    let r = run(&p, &[]);
    assert!(r.status.success(), "{:?}", r.events);
    assert!(r.events.iter().any(|e| e["event"] == "landlock_degraded"));
}

/// A jail started with a bad fd list (or by hand, without one) reports
/// why and starts nothing.
#[test]
fn a_jail_given_bad_fds_refuses_to_start() {
    use std::os::unix::process::CommandExt;
    let null = std::fs::File::open("/dev/null").unwrap();
    for (list, says) in [
        (Some("x"), "not a list of fd numbers"),
        (Some(""), "not a list of fd numbers"),
        // Below the numbers the fds are moved to.
        (Some("3,200"), "at least 5"),
        (Some("201,201"), "distinct"),
        (Some("200"), "fd 200 is not open"),
        (None, "no profile on fd 3"),
    ] {
        let mut cmd = std::process::Command::new(JAIL);
        cmd.env_clear().stderr(Stdio::piped()).stdout(Stdio::null());
        if let Some(list) = list {
            cmd.env(ccnode_sandbox::jail::FDS_ENV, list);
        }
        // fd 201 open in the jail: only named fds count.
        let raw = std::os::fd::AsRawFd::as_raw_fd(&null);
        // SAFETY: dup2 between fork and exec is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 201) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{list:?}: {stderr}");
        assert!(stderr.contains(says), "{list:?}: {stderr}");
        assert!(!stderr.contains("\"started\""), "{list:?}: {stderr}");
    }
}

#[test]
fn the_kill_signal_ends_the_whole_namespace_before_the_jail_exits() {
    use std::os::unix::process::ExitStatusExt;
    // A worker that ignores SIGTERM, and a child of its own: all of the
    // namespace must be gone by the time the jail is.
    let p = profile("/usr/bin/sleep", &["600"]);
    let mut jailed = start(&p);
    let events = jailed.wait_started().expect("started");
    let init = events.last().unwrap()["pid"].as_i64().unwrap() as i32;
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
    let worker: i32 = children.trim().parse().expect("one worker under init");
    let start_time = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(19)
                    .map(str::to_owned)
            })
    };
    let (init_started, worker_started) = (start_time(init), start_time(worker));
    assert!(init_started.is_some() && worker_started.is_some());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(jailed.child.id() as i32),
        ccnode_sandbox::jail::KILL_SIGNAL,
    )
    .unwrap();
    assert_eq!(wait(&mut jailed.child).signal(), Some(libc::SIGKILL));
    // Not dying, not a zombie: reaped (or its pid now another process's,
    // which started later).
    assert_ne!(start_time(init), init_started, "init outlived its jail");
    assert_ne!(
        start_time(worker),
        worker_started,
        "the worker outlived its jail"
    );
    let mut rest = String::new();
    jailed.reports.read_to_string(&mut rest).unwrap();
    assert!(
        rest.lines()
            .any(|l| l.contains(r#""event":"exited""#) && l.contains("SIGKILL")),
        "{rest}"
    );
}

#[test]
fn a_signal_during_setup_reaches_the_worker_once_it_runs() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let p = profile("/usr/bin/sleep", &["600"]);
    let mut jailed = start(&p);
    // The jail has forked init and forwards signals from here on; init is
    // still setting up, with no handler of its own yet (a namespace's init
    // gets only signals it handles).
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            jailed.reports.read_line(&mut line).unwrap() > 0,
            "no cgroup event"
        );
        if line.contains(r#""event":"cgroup""#) {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(jailed.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Held until the worker runs, then given to it: not lost, so sleep
    // does not sleep on.
    assert_eq!(wait(&mut jailed.child).signal(), Some(libc::SIGTERM));
    let mut rest = String::new();
    jailed.reports.read_to_string(&mut rest).unwrap();
    assert!(rest.contains(r#""event":"started""#), "{rest}");
}

/// The probe's `mounts` fact (mount point → options) from a run of `p`,
/// which must succeed.
fn mounts_fact(p: &Profile) -> Value {
    facts(p, &["mounts"]).remove(0)
}

/// The probe's facts `names`, in that order, from one run.
fn facts(p: &Profile, names: &[&str]) -> Vec<Value> {
    let r = run(p, &[]);
    assert!(r.status.success(), "{:?}", r.events);
    let all: Vec<Value> = r
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|v| v["fact"] == *name)
                .unwrap_or_else(|| panic!("no {name} fact"))["value"]
                .clone()
        })
        .collect()
}

#[test]
fn mounts_below_a_read_only_bind_are_read_only_too() {
    // A library directory with a writable mount below it, as a host may
    // have: the bind brings it along (MS_REC), and it must not stay
    // writable, suid or device-bearing in the jail.
    let lib = tempfile::tempdir_in("/var/tmp").unwrap();
    let sub = lib.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(sub.clone());
    let mut p = profile(PROBE, &[]);
    p.read_only.push(lib.path().to_owned());
    let mounts = mounts_fact(&p);
    for at in [lib.path(), sub.as_path()] {
        let opts = mounts[at.to_str().unwrap()]
            .as_str()
            .unwrap_or_else(|| panic!("{} not mounted in {mounts}", at.display()));
        let opts: Vec<&str> = opts.split(',').collect();
        for want in ["ro", "nosuid", "nodev"] {
            assert!(opts.contains(&want), "{}: {opts:?}", at.display());
        }
    }
}

#[test]
fn signals_reach_the_worker_and_a_killed_jail_takes_it_along() {
    use std::os::unix::process::ExitStatusExt;
    let p = profile("/usr/bin/sleep", &["600"]);
    let mut jailed = start(&p);
    jailed.wait_started().expect("started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(jailed.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(wait(&mut jailed.child).signal(), Some(libc::SIGTERM));

    let mut jailed = start(&p);
    let events = jailed.wait_started().expect("started");
    let worker = events.last().unwrap()["pid"].as_i64().unwrap() as i32;
    assert!(Path::new(&format!("/proc/{worker}")).exists());
    jailed.child.kill().unwrap();
    wait(&mut jailed.child);
    let deadline = Instant::now() + PATIENCE;
    while Path::new(&format!("/proc/{worker}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break; // dead, waiting for its reaper
        }
        assert!(Instant::now() < deadline, "the worker outlived its jail");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_program_under_tmp_runs_bound_outside_the_workers_tmp() {
    // A build tree under /tmp (a CI checkout, say): the jail makes its own
    // /tmp, so the program is bound read-only at its own directory instead.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let copy = dir.path().join("probe");
    std::fs::copy(PROBE, &copy).unwrap();
    let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir.path(), perms).unwrap();
    let mut p = profile(copy.to_str().unwrap(), &[]);
    let [mounts, argv0] = <[Value; 2]>::try_from(facts(&p, &["mounts", "argv0"])).unwrap();
    // argv[0], left at the host path, follows the program.
    assert_eq!(argv0, "/.ccnode-program/probe");
    let opts = mounts["/.ccnode-program/probe"]
        .as_str()
        .unwrap_or_else(|| panic!("program not bound: {mounts}"));
    assert!(opts.split(',').any(|o| o == "ro"), "{opts}");
    assert!(
        mounts.get(copy.to_str().unwrap()).is_none(),
        "bound at its host path too: {mounts}"
    );
    // An argv[0] the caller chose is left alone.
    p.args[0] = "worker-7".into();
    assert_eq!(facts(&p, &["argv0"])[0], "worker-7");
}
