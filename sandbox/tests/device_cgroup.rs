//! The per-worker device allow-list, for real, both ways the kernel has:
//! the cgroup v1 `devices` controller and, on cgroup v2, a device BPF
//! program. A process placed in a group that allows /dev/null alone cannot
//! open /dev/full (nor create a node), and a jailed worker runs inside its
//! own group, which is gone once it exits. Needs root, the v1 devices
//! hierarchy at /sys/fs/cgroup/devices and a cgroup v2 mount (this
//! project's machines are hybrid and have both; a host without one says
//! so and skips that half).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ccnode_sandbox::cgroup::DeviceRule;
use ccnode_sandbox::profile::{DeviceCgroup, DeviceCgroupKind};
use ccnode_sandbox::{cgroup, spawn, Profile};
use serde_json::Value;

const JAIL: &str = env!("CARGO_BIN_EXE_ccnode-jail");
const ROOT: &str = "/sys/fs/cgroup/devices";

fn hierarchy() -> Option<PathBuf> {
    match cgroup::devices_unavailable_reason(Path::new(ROOT)) {
        None => Some(PathBuf::from(ROOT)),
        Some(why) => {
            eprintln!("SKIPPED: no cgroup v1 devices controller here: {why}");
            None
        }
    }
}

#[test]
fn a_device_group_allows_exactly_its_nodes() {
    let Some(root) = hierarchy() else { return };
    let dc = DeviceCgroup {
        parent: root,
        name: format!("ccnode-test-allow-{}", std::process::id()),
        kind: DeviceCgroupKind::V1,
    };
    // The child waits for a line, then tries both devices.
    let child = waiting(
        "if (: > /dev/null); then echo null-ok; fi; if (: > /dev/full) 2>/dev/null; then echo full-ok; else echo full-denied; fi",
    );
    let null = line("/dev/null");
    let group = cgroup::place_devices(&dc, child.id() as i32, &[null], None).unwrap();
    let list = std::fs::read_to_string(group.path.join("devices.list")).unwrap();
    assert_eq!(list.trim(), "c 1:3 rw", "{list}");
    let out = release(child);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["null-ok", "full-denied"],
        "{out}"
    );
    group.remove();
    assert!(!group.path.exists());

    // A group is never shared: a second placement under the same name
    // while the first is in use is refused, and the first keeps its list.
    // (No /dev/null in this one: the group allows /dev/full alone.)
    let child = waiting("if (: > /dev/full); then echo full-ok; else echo full-denied; fi");
    let full = line("/dev/full");
    let group = cgroup::place_devices(&dc, child.id() as i32, &[full], None).unwrap();
    assert!(cgroup::place_devices(&dc, std::process::id() as i32, &[null], None).is_err());
    let out = release(child);
    assert_eq!(out.trim(), "full-ok");
    let list = std::fs::read_to_string(group.path.join("devices.list")).unwrap();
    assert_eq!(list.trim(), "c 1:7 rw", "{list}");
    group.remove();
    assert!(!group.path.exists());
}

/// A shell that runs `script` once it reads a line (so it can be placed in
/// a group first).
fn waiting(script: &str) -> Child {
    Command::new("/bin/sh")
        .args(["-c", &format!("read _; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Lets a [`waiting`] shell go; returns what it printed.
fn release(mut child: Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    out
}

fn line(path: &str) -> DeviceRule {
    cgroup::DeviceRule::of(&nix::sys::stat::stat(path).unwrap()).unwrap()
}

/// Runs a jailed shell in a device group of `kind` under `root`; returns
/// what it printed (its /proc/self/cgroup, then `null-ok` if it could
/// write /dev/null) and the group's path from the jail's report.
fn jailed_in_group(root: &Path, kind: DeviceCgroupKind, tag: &str) -> (String, PathBuf) {
    let name = format!("ccnode-test-jail-{tag}-{}", std::process::id());
    let program = "/usr/bin/dash";
    let mut p = Profile::new(PathBuf::from(program), 65534, 65534);
    p.args = [
        program,
        "-c",
        "while read -r l; do echo \"$l\"; done < /proc/self/cgroup; if (: > /dev/null); then echo null-ok; fi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    p.device_cgroup = Some(DeviceCgroup {
        parent: root.to_path_buf(),
        name: name.clone(),
        kind,
    });
    let mut jailed = spawn(
        Path::new(JAIL),
        &[],
        &p,
        &[],
        Stdio::piped(),
        Stdio::inherit(),
    )
    .expect("spawn the jail");
    let mut out = String::new();
    jailed
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(jailed.child.wait().unwrap().success(), "{out}");
    let events: Vec<Value> = BufReader::new(&mut jailed.reports)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    let placed = events
        .iter()
        .find(|e| e["event"] == "device_cgroup")
        .expect("a device_cgroup event");
    let path = PathBuf::from(placed["path"].as_str().unwrap());
    let group = path.file_name().unwrap().to_str().unwrap();
    assert!(
        path.starts_with(root) && group.starts_with(&format!("{name}-")),
        "{path:?}"
    );
    assert!(out.lines().any(|l| l == "null-ok"), "{out}");
    assert!(!path.exists(), "the group outlived its worker");
    (out, path)
}

#[test]
fn a_jailed_worker_runs_in_its_own_device_group() {
    let Some(root) = hierarchy() else { return };
    let (out, path) = jailed_in_group(&root, DeviceCgroupKind::V1, "v1");
    let group = path.file_name().unwrap().to_str().unwrap();
    assert!(
        out.lines()
            .any(|l| l.ends_with(&format!(":devices:/{group}"))),
        "the worker is not in its group: {out}"
    );
}

// --- cgroup v2: a device program ---------------------------------------------

/// The cgroup v2 mount, if there is one, checked usable for device
/// programs.
fn v2_root() -> Option<PathBuf> {
    let root = ccnode_testkit::cgroup2_mount();
    match root {
        Some(r) => match cgroup::device_cgroup_kind(&r) {
            Ok(DeviceCgroupKind::V2) => Some(r),
            other => panic!("{} is cgroup v2 but not usable: {other:?}", r.display()),
        },
        None => {
            eprintln!("SKIPPED: no cgroup v2 mount here");
            None
        }
    }
}

/// Tries /dev/null (write), /dev/full (write), /dev/zero (read) and
/// creating a node for /dev/null's numbers; prints one word each.
const TRY_DEVICES: &str = "d=$(mktemp -d); \
    if (: > /dev/null) 2>/dev/null; then echo null-ok; else echo null-denied; fi; \
    if (: > /dev/full) 2>/dev/null; then echo full-ok; else echo full-denied; fi; \
    if head -c1 /dev/zero >/dev/null 2>&1; then echo zero-ok; else echo zero-denied; fi; \
    if mknod \"$d/n\" c 1 3 2>/dev/null; then echo mknod-ok; else echo mknod-denied; fi; \
    rm -rf \"$d\"";

fn v2_group(root: &Path, tag: &str) -> DeviceCgroup {
    DeviceCgroup {
        parent: root.to_path_buf(),
        name: format!("ccnode-test-{tag}-{}", std::process::id()),
        kind: DeviceCgroupKind::V2,
    }
}

fn program(rules: &[DeviceRule]) -> std::os::fd::OwnedFd {
    let p = ccnode_sandbox::bpf::device_program(rules).unwrap();
    ccnode_sandbox::bpf::load(&p).unwrap()
}

#[test]
fn a_device_program_allows_exactly_its_nodes() {
    use std::os::fd::AsFd;
    let Some(root) = v2_root() else { return };
    // Outside any device group (this test runs as root), everything works:
    // what the groups below refuse is their program's doing.
    let out = release(waiting(TRY_DEVICES));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["null-ok", "full-ok", "zero-ok", "mknod-ok"],
        "{out}"
    );

    let dc = v2_group(&root, "v2-allow");
    let rules = [line("/dev/null")];
    let child = waiting(TRY_DEVICES);
    let prog = program(&rules);
    let group = cgroup::place_devices(&dc, child.id() as i32, &rules, Some(prog.as_fd())).unwrap();
    drop(prog); // the group holds the program
    let procs = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    let group_name = group.path.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        procs.lines().any(|l| l == format!("0::/{group_name}")),
        "{procs}"
    );
    let out = release(child);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["null-ok", "full-denied", "zero-denied", "mknod-denied"],
        "{out}"
    );
    group.remove();
    assert!(!group.path.exists());

    // No rules: not even /dev/null.
    let child = waiting(TRY_DEVICES);
    let prog = program(&[]);
    let group = cgroup::place_devices(&dc, child.id() as i32, &[], Some(prog.as_fd())).unwrap();
    let out = release(child);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["null-denied", "full-denied", "zero-denied", "mknod-denied"],
        "{out}"
    );
    group.remove();

    // A v2 group without its program is refused, not left open.
    let child = waiting("true");
    let err = cgroup::place_devices(&dc, child.id() as i32, &rules, None).unwrap_err();
    assert!(
        err.to_string().contains("needs its device program"),
        "{err}"
    );
    release(child);
    assert!(!group.path.exists());
}

#[test]
fn a_jailed_worker_runs_in_its_own_v2_device_group() {
    let Some(root) = v2_root() else { return };
    let (out, path) = jailed_in_group(&root, DeviceCgroupKind::V2, "v2");
    let rel = path.strip_prefix(&root).unwrap();
    assert!(
        out.lines().any(|l| l == format!("0::/{}", rel.display())),
        "the worker is not in its v2 group: {out}"
    );
}

#[test]
fn a_sweep_removes_only_empty_groups_of_dead_jails() {
    let Some(root) = hierarchy() else { return };
    // A parent of our own, so the sweep sees nothing but this test's groups.
    let parent = root.join(format!("ccnode-test-sweep-{}", std::process::id()));
    std::fs::create_dir(&parent).unwrap();
    let dead = || {
        let mut c = Command::new("/bin/true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let gone = parent.join(format!("worker-a-0-{}", dead()));
    let live = parent.join(format!("worker-a-1-{}", std::process::id()));
    let plain = parent.join("keep");
    let busy = parent.join(format!("worker-b-0-{}", dead()));
    for d in [&gone, &live, &plain, &busy] {
        std::fs::create_dir(d).unwrap();
    }
    // A dead jail's name, but a process still inside: the kernel keeps it.
    let child = waiting("true");
    std::fs::write(busy.join("cgroup.procs"), child.id().to_string()).unwrap();

    assert_eq!(cgroup::sweep(&parent), 1);
    assert!(!gone.exists());
    assert!(live.exists() && plain.exists() && busy.exists());

    release(child);
    // Its last process gone, the busy one goes in the next sweep.
    let mut swept = 0;
    for _ in 0..100 {
        swept += cgroup::sweep(&parent);
        if !busy.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(swept, 1);
    assert!(!busy.exists() && live.exists() && plain.exists());
    for d in [&live, &plain, &parent] {
        std::fs::remove_dir(d).unwrap();
    }
}
