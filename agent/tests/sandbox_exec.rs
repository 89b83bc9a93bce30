//! `ccnoded sandbox-exec`: any command under exactly the worker profile,
//! through the real jail (ccnoded re-executed as `__jail`).

use std::process::{Command, Output};

use ccnode_testkit::TestNode;

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");

fn sandbox_exec(config: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(CCNODED)
        .arg("sandbox-exec")
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .unwrap()
}

const NOBODY: &str = "[sandbox]\nworker_user = \"nobody\"\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn commands_run_as_the_worker_user_with_their_exit_code() {
    let out = sandbox_exec(NOBODY, &["--", "id", "-u"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "65534");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("landlock fully_enforced"), "{stderr}");
    assert!(stderr.contains("no cgroup limits"), "{stderr}");

    let out = sandbox_exec(NOBODY, &["--", "false"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_forbidden_system_call_kills_with_sigsys_and_says_so() {
    let out = sandbox_exec(NOBODY, &["--", "unshare", "--mount", "true"]);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS));
    assert!(text(&out.stderr).contains("SIGSYS (a forbidden system call: seccomp)"));
}

#[test]
fn the_host_is_out_of_reach() {
    // /etc is not in the worker's view at all.
    let out = sandbox_exec(NOBODY, &["--", "cat", "/etc/hostname"]);
    assert_ne!(out.status.code(), Some(0));
    let out = sandbox_exec(NOBODY, &["--", "hostname"]);
    assert_eq!(text(&out.stdout).trim(), "ccnode-worker");
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    let out = sandbox_exec(
        "[sandbox]\nworker_user = \"no-such-user-ccnode\"\n",
        &["--", "id"],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("sandbox.worker_user"));

    // GPUs come from the configured backend (NVML by default): none here,
    // and never a fallback.
    let out = sandbox_exec(NOBODY, &["--gpu", "7", "--", "id"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot open the GPU backend: NVML is not available"),
        "{}",
        text(&out.stderr)
    );

    let out = sandbox_exec(NOBODY, &["--", "no-such-command-ccnode"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("not found"));

    // A policy the kernel cannot meet: nothing starts.
    let out = sandbox_exec(
        "[sandbox]\nworker_user = \"nobody\"\nlandlock_min_abi = 60\n",
        &["--", "id"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("setup failed at landlock"));
}

#[test]
fn the_daemon_reports_sandbox_support_in_metrics() {
    let node = TestNode::new(CCNODED).start();
    let (_, body) = node.http_get("/metrics");
    let value = |feature: &str| -> i64 {
        let key = format!("ccnode_sandbox_support{{feature=\"{feature}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {key} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(value("landlock_abi") >= 1);
    assert_eq!(value("landlock_required_abi"), 6);
    assert_eq!(value("cgroup_limits"), 0, "no cgroup_parent configured");
    assert!(node.log().contains("without cgroup memory and pids limits"));
}

/// Prints the sandboxed shell's /proc/self/cgroup (cat calls fadvise64,
/// which the worker's seccomp allow-list refuses).
const READ_CGROUPS: &str = "while read -r l; do echo \"$l\"; done < /proc/self/cgroup";

#[test]
fn a_device_cgroup_holds_the_worker_where_the_host_has_one() {
    let root = std::path::Path::new("/sys/fs/cgroup/devices");
    if let Some(why) = ccnode_sandbox::cgroup::devices_unavailable_reason(root) {
        eprintln!("SKIPPED: no cgroup v1 devices controller here: {why}");
        return;
    }
    let config = format!("{NOBODY}device_cgroup_parent = \"{}\"\n", root.display());
    let out = sandbox_exec(&config, &["--", "sh", "-c", READ_CGROUPS]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let group = stdout
        .lines()
        .find_map(|l| l.split_once(":devices:").map(|(_, g)| g.to_owned()))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(group.starts_with("/sandbox-exec-"), "{group}");
    assert!(
        !root.join(group.trim_start_matches('/')).exists(),
        "left behind"
    );
    assert!(!text(&out.stderr).contains("no device cgroup"));

    // Asked for, but not a devices directory: nothing runs without it.
    let out = sandbox_exec(
        &format!("{NOBODY}device_cgroup_parent = \"/tmp\"\n"),
        &["--", "true"],
    );
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sandbox.device_cgroup_parent")
            && stderr.contains("neither a cgroup v1 devices directory"),
        "{stderr}"
    );
}

#[test]
fn a_delegated_cgroup_is_the_daemons_alone() {
    let out = sandbox_exec(
        &format!("{NOBODY}cgroup_delegated = true\n"),
        &["--", "true"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sandbox.cgroup_delegated is taken by the daemon only"),
        "{stderr}"
    );
    assert!(stderr.contains("no cgroup limits"), "{stderr}");
}

#[test]
fn on_cgroup_v2_a_device_program_holds_the_worker() {
    let Some(root) = ccnode_testkit::cgroup2_mount() else {
        eprintln!("SKIPPED: no cgroup v2 mount here");
        return;
    };
    let config = format!("{NOBODY}device_cgroup_parent = \"{}\"\n", root.display());
    // Its own group, and no device outside the allow-list: the jail's /dev
    // holds only the basic nodes, so a node it makes itself (in its tmp)
    // is what it could reach otherwise; it has no CAP_MKNOD either, and
    // the program refuses mknod on its own (sandbox/tests/device_cgroup.rs).
    let script = format!("{READ_CGROUPS}; if (: > /dev/null); then echo null-ok; fi");
    let out = sandbox_exec(&config, &["--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let group = stdout
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(group.starts_with("/sandbox-exec-"), "{group}");
    assert!(stdout.lines().any(|l| l == "null-ok"), "{stdout}");
    assert!(
        !root.join(group.trim_start_matches('/')).exists(),
        "left behind"
    );
    assert!(!text(&out.stderr).contains("no device cgroup"));

    // v2 limits elsewhere than the device group (a directory that reads as
    // a delegated v2 subtree): a worker has one v2 group, so nothing runs.
    let limits = tempfile::tempdir().unwrap();
    for f in ["cgroup.controllers", "cgroup.subtree_control"] {
        std::fs::write(limits.path().join(f), "memory pids\n").unwrap();
    }
    let out = sandbox_exec(
        &format!(
            "{NOBODY}device_cgroup_parent = \"{}\"\ncgroup_parent = \"{}\"\n",
            root.display(),
            limits.path().display()
        ),
        &["--", "true"],
    );
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sandbox.device_cgroup_parent")
            && stderr.contains("set both to the same directory"),
        "{stderr}"
    );
}

/// A simulated host: its GPUs and their device tree ([`SimGpus`]).
struct SimHost {
    _gpus: ccnode_testkit::SimGpus,
    sim: std::path::PathBuf,
    devtree: std::path::PathBuf,
}

impl SimHost {
    fn new() -> SimHost {
        let gpus = ccnode_testkit::SimGpus::new();
        SimHost {
            sim: gpus.sim.clone(),
            devtree: gpus.devtree.clone(),
            _gpus: gpus,
        }
    }

    /// With its own state directory: `--gpu` takes that directory's lock,
    /// and tests run at once must not share one.
    fn config(&self) -> String {
        format!(
            "{NOBODY}[node]\nstate_dir = \"{}\"\n[gpu]\nbackend = \"sim\"\nsim_file = \"{}\"\n",
            self.sim.with_file_name("state").display(),
            self.sim.display()
        )
    }

    fn inventory(&self) -> ccnode_gpu::Inventory {
        use ccnode_gpu::GpuBackend as _;
        ccnode_gpu::sim::SimBackend::open(&self.sim)
            .unwrap()
            .inventory()
            .unwrap()
    }
}

#[test]
fn a_mig_device_is_all_a_worker_sees_of_the_gpus() {
    let host = SimHost::new();
    let inv = host.inventory();
    let mig = &inv.gpus[1].mig_devices[1];
    let out = sandbox_exec(&host.config(), &["--gpu", &mig.uuid, "--", "env"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let env = text(&out.stdout);
    assert!(
        env.lines()
            .any(|l| l == format!("CUDA_VISIBLE_DEVICES={}", mig.uuid)),
        "{env}"
    );
    // Inside, the parent GPU's node, this device's two capabilities and
    // the shared nodes open; GPU 0's and the siblings' capabilities are not
    // there at all (and Landlock would refuse them).
    let table =
        std::fs::read_to_string(host.devtree.join("proc/driver/nvidia-caps/mig-minors")).unwrap();
    let cap = |key: &str| {
        let minor = table
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("{key} not in {table}"));
        format!(
            "{}/dev/nvidia-caps/nvidia-cap{minor}",
            host.devtree.display()
        )
    };
    let node = |n: &str| format!("{}/dev/{n}", host.devtree.display());
    let gi = mig.gpu_instance_id;
    let granted = [
        node("nvidia1"),
        cap(&format!("gpu1/gi{gi}/access")),
        cap(&format!("gpu1/gi{gi}/ci0/access")),
        node("nvidiactl"),
        node("nvidia-uvm"),
        node("nvidia-uvm-tools"),
    ];
    let mut args = vec!["--gpu", &mig.uuid, "--", "head", "-c", "1"];
    args.extend(granted.iter().map(String::as_str));
    let out = sandbox_exec(&host.config(), &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sibling = &inv.gpus[1].mig_devices[0];
    assert_ne!(sibling.gpu_instance_id, gi);
    for other in [
        node("nvidia0"),
        cap(&format!("gpu1/gi{}/access", sibling.gpu_instance_id)),
        cap(&format!("gpu1/gi{}/ci0/access", sibling.gpu_instance_id)),
    ] {
        assert!(
            std::path::Path::new(&other).exists(),
            "{other} exists on the host"
        );
        let out = sandbox_exec(
            &host.config(),
            &["--gpu", &mig.uuid, "--", "head", "-c", "1", &other],
        );
        assert_ne!(out.status.code(), Some(0), "{other} is reachable");
        assert!(
            text(&out.stderr).contains("No such file"),
            "{other}: {}",
            text(&out.stderr)
        );
    }
    // The whole GPU 0 (MIG off): its own node, no capability.
    let out = sandbox_exec(&host.config(), &["--gpu", "0", "--", "env"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("CUDA_VISIBLE_DEVICES={}", inv.gpus[0].uuid)));
}

#[test]
fn gpus_that_cannot_be_assigned_are_refused_by_name() {
    let host = SimHost::new();
    let inv = host.inventory();
    let out = sandbox_exec(&host.config(), &["--gpu", "MIG-no-such-device", "--", "id"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        text(&out.stderr).contains("cannot assign MIG-no-such-device: no GPU or MIG device"),
        "{}",
        text(&out.stderr)
    );
    // GPU 1 has MIG on: one of its MIG devices, not the whole GPU.
    let out = sandbox_exec(&host.config(), &["--gpu", &inv.gpus[1].uuid, "--", "id"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        text(&out.stderr).contains("has MIG enabled"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn gpus_are_not_granted_while_a_daemon_owns_them() {
    // The daemon's ledger, scrubs and audit cover every device it grants:
    // a device given out beside it would escape all three.
    let host = SimHost::new();
    let mut node = TestNode::new(CCNODED)
        .with_gpu(&format!(
            "backend = \"sim\"\nsim_file = \"{}\"",
            host.sim.display()
        ))
        .start();
    let config = format!(
        "{NOBODY}[node]\nstate_dir = \"{}\"\n[gpu]\nbackend = \"sim\"\nsim_file = \"{}\"\n",
        node.state_dir().display(),
        host.sim.display()
    );
    let out = sandbox_exec(&config, &["--gpu", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("GPUs are granted by the running ccnoded only")
            && text(&out.stderr).contains("in use by another ccnoded"),
        "{}",
        text(&out.stderr)
    );
    // Without a GPU the command runs beside the daemon.
    let out = sandbox_exec(&config, &["--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // With the daemon stopped the same command gets the GPU.
    node.stop();
    let out = sandbox_exec(&config, &["--gpu", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A lock that cannot be taken for another reason is said as it is.
    let unusable = format!(
        "{NOBODY}[node]\nstate_dir = \"{}\"\n[gpu]\nbackend = \"sim\"\nsim_file = \"{}\"\n",
        host.sim.join("not-a-directory").display(),
        host.sim.display()
    );
    let out = sandbox_exec(&unusable, &["--gpu", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(74), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot take the state directory lock"),
        "{}",
        text(&out.stderr)
    );
}
