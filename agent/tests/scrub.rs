//! VRAM scrubbing end to end on the sim backend, where a device's VRAM is
//! a file the worker's sandbox is granted: a tenant's worker plants a
//! secret, ccnoded scrubs the device with the real `ccnode-scrub` when the
//! worker is gone, and the next tenant's worker, reading all of its VRAM
//! from inside its own sandbox, finds no trace. Failed scrubs (a crash, a
//! hang, a report that does not add up, too little coverage) keep the
//! device from every worker and follow the policy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ccnode_testkit::{api, SimGpus, TestNode, PATIENCE};
use serde_json::{json, Value};

mod common;
use common::{metric, Model};

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");
/// What ccnode-test-worker's `plant` mode writes.
const SECRET: &[u8] = b"CCNODE-TENANT-SECRET-";

fn model(name: &str, seed: u64) -> Model {
    common::make_model(name, &ccnode_worker::testmodel::Shape::tiny(), seed)
}

fn entry(name: &str, m: &Model, device: &str) -> Value {
    json!({"name": name, "dir": m.dir, "signature": m.sig, "trust_policy": m.policy, "gpus": [device]})
}

/// The sim's MIG devices of GPU 1.
fn migs(gpus: &SimGpus) -> Vec<String> {
    let sim = ccnode_gpu::sim::SimBackend::open(&gpus.sim).unwrap();
    let inv = ccnode_gpu::GpuBackend::inventory(&sim).unwrap();
    inv.gpus[1]
        .mig_devices
        .iter()
        .map(|m| m.uuid.clone())
        .collect()
}

fn vram(gpus: &SimGpus, device: &str) -> PathBuf {
    gpus.devtree.join("sim-vram").join(device)
}

/// ccnoded on `gpus` with ccnode-test-worker planting secrets as every
/// model's worker, and `scrub` in `[gpu.scrub]`.
fn node(gpus: &SimGpus, scrub: &str) -> TestNode {
    let worker = api::workspace_bin("ccnode-test-worker");
    TestNode::new(CCNODED)
        .with_gpu(&gpus.gpu_toml())
        .with_env(
            "CCNODE_TEST_WORKER_MODE",
            &format!("plant {}", gpus.devtree.join("sim-vram").display()),
        )
        .with_toml(&format!(
            "[gpu.scrub]\n{scrub}\n\n[sandbox]\nworker_user = \"nobody\"\n\
             env_allow = [\"CCNODE_TEST_WORKER_MODE\"]\n\n\
             [inference]\nworker_binary = \"{}\"\nload_timeout = \"20s\"\n",
            worker.display()
        ))
        .start()
}

fn wait_metric(node: &TestNode, series: &str, at_least: f64) {
    let deadline = Instant::now() + PATIENCE * 2;
    while metric(node, series) < at_least {
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}:\n{}\n{}",
            node.http_get("/metrics").1,
            node.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn scrub_state(node: &TestNode, device: &str) -> Value {
    let g = node.request(r#"{"v":1,"cmd":"gpus"}"#);
    g["result"]["scrub"]
        .as_array()
        .unwrap_or_else(|| panic!("no scrub states: {g}"))
        .iter()
        .find(|d| d["device"] == device)
        .cloned()
        .unwrap_or_else(|| panic!("{device} not in {g}"))
}

/// The model's one worker: `(state, last_exit)`.
fn worker(node: &TestNode, name: &str) -> Option<(String, Option<String>)> {
    let r = node.request(r#"{"v":1,"cmd":"models"}"#);
    let m = r["result"]["models"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?
        .clone();
    let w = &m["workers"][0];
    Some((
        w["state"].as_str()?.to_owned(),
        w["last_exit"].as_str().map(str::to_owned),
    ))
}

fn wait_worker(node: &TestNode, name: &str, f: impl Fn(&str, Option<&str>) -> bool) {
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        if let Some((s, e)) = worker(node, name) {
            if f(&s, e.as_deref()) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {:?}\n{}",
            worker(node, name),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn holds_secret(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

/// ccnoded on `gpus` after its start scrub, with model `tenant-a` (from
/// `seed`) ready on GPU 1's MIG device `which`: the node, the device, and
/// the device's passing-scrub series.
fn serving(gpus: &SimGpus, which: usize, seed: u64) -> (TestNode, String, String) {
    let dev = migs(gpus)[which].clone();
    let node = node(gpus, "");
    let ok = format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"ok\"}}");
    wait_metric(&node, &ok, 1.0);
    let a = model("tenant-a", seed);
    assert_eq!(load(&node, entry("tenant-a", &a, &dev))["ok"], true);
    wait_worker(&node, "tenant-a", |s, _| s == "ready");
    (node, dev, ok)
}

fn load(node: &TestNode, e: Value) -> Value {
    node.request(&json!({"v": 1, "cmd": "model_load", "model": e}).to_string())
}

#[test]
fn a_tenant_s_secret_is_scrubbed_before_the_next_tenant_gets_the_device() {
    let gpus = SimGpus::new();
    let dev = migs(&gpus)[0].clone();
    let node = node(&gpus, "");
    // At start every device is scrubbed, by the real ccnode-scrub.
    wait_metric(
        &node,
        &format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"ok\"}}"),
        1.0,
    );
    assert_eq!(scrub_state(&node, &dev)["state"], "free");

    let a = model("tenant-a", 1);
    assert_eq!(load(&node, entry("tenant-a", &a, &dev))["ok"], true);
    wait_worker(&node, "tenant-a", |s, _| s == "ready");
    assert!(
        holds_secret(&vram(&gpus, &dev)),
        "the worker planted nothing"
    );
    assert_eq!(scrub_state(&node, &dev)["state"], "claimed");

    // The tenant leaves: the device is scrubbed before anyone may have it.
    let r = node.request(r#"{"v":1,"cmd":"model_unload","name":"tenant-a"}"#);
    assert_eq!(r["ok"], true, "{r}");
    wait_metric(
        &node,
        &format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"ok\"}}"),
        2.0,
    );
    let bytes = std::fs::read(vram(&gpus, &dev)).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "VRAM not zero after the scrub"
    );
    let s = scrub_state(&node, &dev);
    assert_eq!(s["state"], "free", "{s}");
    assert_eq!(s["last_scrub"]["trigger"], "release", "{s}");
    assert_eq!(s["last_scrub"]["report"]["coverage"], 1.0, "{s}");
    assert_eq!(
        s["last_scrub"]["report"]["bytes_scrubbed"].as_u64(),
        Some(bytes.len() as u64),
        "{s}"
    );
    assert_eq!(
        metric(
            &node,
            &format!("ccnode_scrub_coverage_ratio{{device=\"{dev}\"}}")
        ),
        1.0
    );
    assert!(
        metric(
            &node,
            &format!("ccnode_scrub_bytes_total{{device=\"{dev}\"}}")
        ) >= 2.0 * bytes.len() as f64
    );

    // The next tenant's worker reads all of its VRAM first: no trace (it
    // would exit 66 on one), so it plants its own and becomes ready.
    let b = model("tenant-b", 2);
    assert_eq!(load(&node, entry("tenant-b", &b, &dev))["ok"], true);
    wait_worker(&node, "tenant-b", |s, _| s == "ready");
}

#[test]
fn without_scrubbing_the_next_tenant_finds_the_secret() {
    // The control: the same sequence with scrubbing off shows what the
    // scrub prevents (and that the next tenant's check can fail).
    let gpus = SimGpus::new();
    let dev = migs(&gpus)[1].clone();
    let node = node(&gpus, "enabled = false");
    assert_eq!(metric(&node, "ccnode_scrub_enabled"), 0.0);
    let a = model("tenant-a", 3);
    assert_eq!(load(&node, entry("tenant-a", &a, &dev))["ok"], true);
    wait_worker(&node, "tenant-a", |s, _| s == "ready");
    node.request(r#"{"v":1,"cmd":"model_unload","name":"tenant-a"}"#);
    let b = model("tenant-b", 4);
    // The device is free at once, unscrubbed.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = load(&node, entry("tenant-b", &b, &dev));
        if r["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(25));
    }
    wait_worker(&node, "tenant-b", |_, e| {
        e.is_some_and(|e| e.contains("66"))
    });
    assert!(holds_secret(&vram(&gpus, &dev)));
}

#[test]
fn a_worker_killed_by_quarantine_still_gets_its_device_scrubbed() {
    let gpus = SimGpus::new();
    let (node, dev, ok) = serving(&gpus, 2, 5);
    assert!(holds_secret(&vram(&gpus, &dev)));
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["ok"], true, "{r}");
    // Killed, released, scrubbed; the other devices are scrubbed again too.
    wait_metric(&node, &ok, 2.0);
    assert!(std::fs::read(vram(&gpus, &dev))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    let other = &migs(&gpus)[0];
    wait_metric(
        &node,
        &format!("ccnode_scrubs_total{{device=\"{other}\",result=\"ok\"}}"),
        2.0,
    );
    let s = scrub_state(&node, other);
    assert_eq!(s["last_scrub"]["trigger"], "quarantine", "{s}");
}

/// A scrub program that is a shell script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn failed_scrubs_keep_the_device_from_every_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let nonsense = r#"echo '{"version":1,"device":"'"$2"'","backend":"cuda","bytes_total":100,"bytes_free":100,"bytes_scrubbed":200,"coverage":2.0,"chunks":1,"nonzero_bytes":0,"sampled_bytes":0,"sampled_nonzero":0,"duration_ms":1.0,"throughput_bytes_per_s":1.0}'"#;
    // Consistent in itself, but not the device's size: a scrub that did
    // a few KiB and says that was all.
    let liar = r#"echo '{"version":1,"device":"'"$2"'","backend":"sim","bytes_total":4096,"bytes_free":4096,"bytes_scrubbed":4096,"coverage":1.0,"chunks":1,"nonzero_bytes":0,"sampled_bytes":4096,"sampled_nonzero":0,"duration_ms":1.0,"throughput_bytes_per_s":4096000.0}'"#;
    let cases = [
        ("bad_report", script(tmp.path(), "liar", liar), ""),
        ("crashed", script(tmp.path(), "crash", "kill -SEGV $$"), ""),
        (
            "timeout",
            script(tmp.path(), "hang", "sleep 600"),
            "timeout = \"1s\"\n",
        ),
        ("bad_report", script(tmp.path(), "nonsense", nonsense), ""),
        (
            "child_error",
            script(
                tmp.path(),
                "refuse",
                r#"echo '{"version":1,"device":"x","error":"no_driver","message":"no libcuda"}'; exit 1"#,
            ),
            "",
        ),
        ("low_coverage", PathBuf::new(), ""),
    ];
    for (result, binary, extra) in cases {
        let gpus = SimGpus::new();
        let dev = migs(&gpus)[0].clone();
        let scrub = if binary.as_os_str().is_empty() {
            // The real scrub, on a device whose "driver" keeps most of it.
            std::fs::create_dir_all(gpus.devtree.join("sim-vram")).unwrap();
            std::fs::write(
                gpus.devtree
                    .join("sim-vram")
                    .join(format!("{dev}.reserved")),
                "1000000000",
            )
            .unwrap();
            String::new()
        } else {
            format!("binary = \"{}\"\n{extra}", binary.display())
        };
        let node = node(&gpus, &scrub);
        wait_metric(
            &node,
            &format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"{result}\"}}"),
            1.0,
        );
        assert_eq!(
            metric(
                &node,
                &format!("ccnode_scrub_device_out_of_service{{device=\"{dev}\"}}")
            ),
            1.0,
            "{result}"
        );
        assert_eq!(
            scrub_state(&node, &dev)["state"],
            "out_of_service",
            "{result}"
        );
        let m = model("tenant", 6);
        let r = load(&node, entry("tenant", &m, &dev));
        assert_eq!(
            r["error"]["detail"], "device_out_of_service",
            "{result}: {r}"
        );
        assert!(
            worker(&node, "tenant").is_none(),
            "{result}: a worker was started"
        );
        // Audited; the node stays active under `block`.
        let audit = node.request(r#"{"v":1,"cmd":"audit","limit":200}"#);
        assert!(
            audit["result"]["records"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["command"] == "scrub" && r["result"] == result),
            "{result}: {audit}"
        );
        let s = node.request(r#"{"v":1,"cmd":"status"}"#);
        assert_eq!(s["result"]["state"], "active", "{result}: {s}");
    }
}

#[test]
fn a_failed_scrub_quarantines_the_node_when_the_policy_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let crash = script(tmp.path(), "crash", "kill -SEGV $$");
    let gpus = SimGpus::new();
    let node = node(
        &gpus,
        &format!(
            "binary = \"{}\"\non_failure = \"quarantine\"",
            crash.display()
        ),
    );
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let s = node.request(r#"{"v":1,"cmd":"status"}"#);
        if s["result"]["state"] == "quarantined" {
            assert!(
                s["result"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("VRAM scrub"),
                "{s}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{s}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_mig_layout_change_makes_a_scrubbed_device_unscrubbed_again() {
    // A scrub is good for the layout it ran under: after the GPU is
    // repartitioned, a device's memory may have been another's.
    let gpus = SimGpus::new();
    let dev = migs(&gpus)[0].clone();
    let node = node(&gpus, "");
    let ok = format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"ok\"}}");
    wait_metric(&node, &ok, 1.0);
    let spec = std::fs::read_to_string(&gpus.sim).unwrap();
    let changed = spec.replace("\"1g.10gb\" = 3", "\"1g.10gb\" = 2");
    assert_ne!(spec, changed);
    let tmp = gpus.sim.with_extension("new");
    std::fs::write(&tmp, changed).unwrap();
    std::fs::rename(&tmp, &gpus.sim).unwrap();
    assert_eq!(migs(&gpus)[0], dev, "the first MIG device keeps its UUID");
    let a = model("tenant-a", 7);
    assert_eq!(load(&node, entry("tenant-a", &a, &dev))["ok"], true);
    wait_worker(&node, "tenant-a", |s, _| s == "ready");
    // Scrubbed again before the worker got it.
    assert_eq!(metric(&node, &ok), 2.0);
    let s = scrub_state(&node, &dev);
    assert_eq!(s["last_scrub"]["trigger"], "claim", "{s}");
}

#[test]
fn a_scrub_the_layout_changed_under_does_not_count() {
    // A scrub covers a layout only if it held still throughout: here GPU 1
    // is repartitioned while the start-up scrub of `dev` runs, so the
    // claim scrubs `dev` again under the new layout.
    let gpus = SimGpus::new();
    let dev = migs(&gpus)[0].clone();
    let spec = std::fs::read_to_string(&gpus.sim).unwrap();
    let changed = spec.replace("\"1g.10gb\" = 3", "\"1g.10gb\" = 2");
    assert_ne!(spec, changed);
    let next = gpus.sim.with_extension("next");
    std::fs::write(&next, changed).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = script(
        tmp.path(),
        "repartition",
        &format!(
            "if [ \"$2\" = '{dev}' ] && [ -e '{next}' ]; then mv '{next}' '{sim}'; fi\nexec '{real}' \"$@\"",
            next = next.display(),
            sim = gpus.sim.display(),
            real = api::workspace_bin("ccnode-scrub").display()
        ),
    );
    let node = node(&gpus, &format!("binary = \"{}\"\n", wrapper.display()));
    let ok = format!("ccnode_scrubs_total{{device=\"{dev}\",result=\"ok\"}}");
    wait_metric(&node, &ok, 1.0);
    assert!(!next.exists(), "the wrapper repartitioned the GPU");
    assert_eq!(migs(&gpus)[0], dev, "the first MIG device keeps its UUID");
    let a = model("tenant-a", 8);
    assert_eq!(load(&node, entry("tenant-a", &a, &dev))["ok"], true);
    wait_worker(&node, "tenant-a", |s, _| s == "ready");
    assert_eq!(metric(&node, &ok), 2.0, "scrubbed again before the worker");
    let s = scrub_state(&node, &dev);
    assert_eq!(s["last_scrub"]["trigger"], "claim", "{s}");
}

#[test]
fn a_device_held_for_a_worker_that_outlived_its_jail_is_scrubbed_once_its_namespace_is_gone() {
    // The jail is SIGKILLed from outside: it never says how its worker
    // ended, so the device is held, not scrubbed. Its init follows by its
    // parent-death signal, the kernel empties the namespace, and only then
    // is the device scrubbed and free again.
    let gpus = SimGpus::new();
    let (node, dev, ok) = serving(&gpus, 0, 9);
    let r = node.request(r#"{"v":1,"cmd":"models"}"#);
    let jail = r["result"]["models"][0]["workers"][0]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no jail pid: {r}")) as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(jail),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + PATIENCE * 2;
    let records = loop {
        let audit = node.request(r#"{"v":1,"cmd":"audit","limit":200}"#);
        let records = audit["result"]["records"].as_array().unwrap().clone();
        if records.iter().any(|r| r["command"] == "worker_gone") {
            break records;
        }
        assert!(Instant::now() < deadline, "{audit}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(
        records
            .iter()
            .any(|r| r["command"] == "worker_outlived" && r["result"] == "held"),
        "{records:?}"
    );
    let gone = records
        .iter()
        .find(|r| r["command"] == "worker_gone")
        .unwrap();
    assert_eq!(gone["result"], "released");
    assert!(gone["reason"].as_str().unwrap().contains(&dev), "{gone}");
    wait_metric(&node, &ok, 2.0);
    let s = scrub_state(&node, &dev);
    assert_eq!(s["last_scrub"]["trigger"], "release", "{s}");
    assert_eq!(s["state"], "free", "{s}");
}

#[test]
fn devices_a_previous_runs_workers_may_hold_are_kept_until_their_groups_are_empty() {
    // Workers of an earlier ccnoded, still alive in their groups (stuck in
    // the driver, say, past a crash of ccnoded). One group's name says
    // which device its worker had; the other's does not, so it holds every
    // device. A device is given again only when every group holding it is
    // empty.
    let Some(parent) = ccnode_testkit::scratch_cgroup2("leftover") else {
        return;
    };
    /// Removes the groups, whatever the test did (declared first: dropped
    /// after the node and the old workers).
    struct Groups(PathBuf);
    impl Drop for Groups {
        fn drop(&mut self) {
            for g in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                if g.file_type().is_ok_and(|t| t.is_dir()) {
                    for pid in ccnode_sandbox::cgroup::procs(&g.path()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    // Gone already (its jail removed it) is fine.
                    if g.path().exists() {
                        ccnode_testkit::remove_cgroup(&g.path());
                    }
                }
            }
            ccnode_testkit::remove_cgroup(&self.0);
        }
    }
    let _groups = Groups(parent.clone());
    let gpus = SimGpus::new();
    let devs = migs(&gpus);
    let (dev, other) = (devs[0].clone(), devs[1].clone());
    let mut dead = std::process::Command::new("/bin/true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let old = |name: String| {
        let group = parent.join(format!("{name}-{dead_pid}"));
        std::fs::create_dir(&group).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(group.join("cgroup.procs"), child.id().to_string()).unwrap();
        (group, child)
    };
    let (named, mut named_worker) = old(ccnode_sandbox::cgroup::worker_group_name(
        "worker-tenant-a-0",
        std::slice::from_ref(&dev),
    ));
    let (_unnamed, mut unnamed_worker) = old("worker-tenant-b-0".into());
    let node = TestNode::new(CCNODED)
        .with_gpu(&gpus.gpu_toml())
        .with_env(
            "CCNODE_TEST_WORKER_MODE",
            &format!("plant {}", gpus.devtree.join("sim-vram").display()),
        )
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\ndevice_cgroup_parent = \"{}\"\n\
             env_allow = [\"CCNODE_TEST_WORKER_MODE\"]\n\n\
             [inference]\nworker_binary = \"{}\"\nload_timeout = \"20s\"\n",
            parent.display(),
            api::workspace_bin("ccnode-test-worker").display()
        ))
        .start();
    for d in [&dev, &other] {
        let s = scrub_state(&node, d);
        assert_eq!(s["state"], "held", "{s}");
    }
    assert!(
        scrub_state(&node, &dev)["reason"]
            .as_str()
            .unwrap()
            .contains(named.to_str().unwrap()),
        "the first group to hold it names it"
    );
    let m = model("tenant-c", 10);
    let r = load(&node, entry("tenant-c", &m, &other));
    assert_eq!(r["error"]["detail"], "device_out_of_service", "{r}");
    // The group that held everything ends: every device but the one the
    // other group still holds is scrubbed and free.
    unnamed_worker.kill().unwrap();
    unnamed_worker.wait().unwrap();
    let ok = |d: &str| format!("ccnode_scrubs_total{{device=\"{d}\",result=\"ok\"}}");
    wait_metric(&node, &ok(&other), 1.0);
    assert_eq!(
        scrub_state(&node, &other)["last_scrub"]["trigger"],
        "leftover"
    );
    let s = scrub_state(&node, &dev);
    assert_eq!(s["state"], "held", "{s}");
    assert_eq!(
        metric(&node, &ok(&dev)),
        0.0,
        "not scrubbed under its worker"
    );
    let r = load(&node, entry("tenant-c", &m, &dev));
    assert_eq!(r["error"]["detail"], "device_out_of_service", "{r}");
    // Its own group ends too: scrubbed, then free.
    named_worker.kill().unwrap();
    named_worker.wait().unwrap();
    wait_metric(&node, &ok(&dev), 1.0);
    let s = scrub_state(&node, &dev);
    assert_eq!(s["last_scrub"]["trigger"], "leftover", "{s}");
    assert_eq!(s["state"], "free", "{s}");
    assert_eq!(load(&node, entry("tenant-c", &m, &dev))["ok"], true);
    wait_worker(&node, "tenant-c", |s, _| s == "ready");
}
