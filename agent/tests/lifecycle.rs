//! ccnoded's life under a service manager: start-up, readiness, status
//! lines, the watchdog, clean shutdown, and the start-up failures with
//! their exit codes.

use std::process::Command;

use ccnode_testkit::TestNode;

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");

/// Runs ccnoded to its exit on a config of its own in `dir`, with the given
/// admin socket and metrics address.
fn run_once(dir: &std::path::Path, socket: &std::path::Path, listen: &str) -> std::process::Output {
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nstate_dir = \"{}/state\"\n[log]\nformat = \"json\"\n[admin]\nsocket = \"{}\"\ngroup = 0\n[http]\nlisten = \"{listen}\"\n[gpu]\nbackend = \"none\"\n[attestation]\nenabled = false\n",
            dir.display(),
            socket.display()
        ),
    )
    .unwrap();
    Command::new(CCNODED)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap()
}

#[test]
fn ready_status_and_stopping_are_sent_to_systemd() {
    let mut node = TestNode::new(CCNODED).start();
    let ready = node.notifications().wait_for("READY=1").unwrap();
    assert!(ready.contains("STATUS="), "{ready}");
    assert!(
        ready.contains(&node.socket().display().to_string()),
        "the status line says where the admin socket is: {ready}"
    );
    // READY=1 is sent only once the socket and the endpoint answer: the
    // harness already used both. STATUS follows the node.
    node.request(r#"{"v":1,"cmd":"drain","reason":"status line test"}"#);
    let status = node.notifications().wait_for("status line test").unwrap();
    assert!(status.contains("drained"), "{status}");
    let exit = node.stop();
    assert_eq!(exit.code(), Some(0));
    assert!(node.notifications().wait_for("STOPPING=1").is_some());
    assert!(!node.socket().exists(), "socket removed on exit");
}

#[test]
fn the_watchdog_is_pinged_when_systemd_asks() {
    let node = TestNode::new(CCNODED)
        .with_env("WATCHDOG_USEC", "200000")
        .start();
    let deadline = std::time::Instant::now() + ccnode_testkit::PATIENCE;
    while node
        .notifications()
        .all()
        .iter()
        .filter(|m| m.as_str() == "WATCHDOG=1")
        .count()
        < 3
    {
        assert!(std::time::Instant::now() < deadline, "no watchdog pings");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_bad_config_exits_78_and_names_the_key() {
    let mut node = TestNode::new(CCNODED).with_admin("mode = \"0777x\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("admin.mode"), "{log}");

    let mut node = TestNode::new(CCNODED).with_admin("group = \"no-such-group-for-ccnode\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("admin.group"), "{log}");
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[admin]\ngroup = 0\n").unwrap();
    let out = Command::new(CCNODED)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[http]\nlisten = \"somewhere\"\n").unwrap();
    let out = Command::new(CCNODED)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.listen"));

    let missing = dir.path().join("missing.toml");
    let out = Command::new(CCNODED)
        .args(["check-config", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused_before_touching_it() {
    let first = TestNode::new(CCNODED).start();
    // An unfinished write of the first daemon's, as it would look mid-write.
    let tmp = first.state_dir().join("state.json.tmp");
    std::fs::write(&tmp, b"{").unwrap();
    let out = Command::new(CCNODED)
        .arg("--config")
        .arg(first.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another ccnoded"),
        "{out:?}"
    );
    assert!(tmp.exists(), "the second daemon touched nothing");
    assert_eq!(first.request(r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let first = TestNode::new(CCNODED).start();
    // Its own state directory, the first one's socket.
    let dir = tempfile::tempdir().unwrap();
    let out = run_once(dir.path(), &first.socket(), "127.0.0.1:0");
    assert_eq!(out.status.code(), Some(71), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first is unharmed.
    assert_eq!(first.request(r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn a_stale_socket_from_a_crash_is_replaced() {
    let mut node = TestNode::new(CCNODED).start();
    node.signal(libc::SIGKILL);
    let _ = node.wait();
    assert!(node.socket().exists(), "SIGKILL leaves the socket file");
    node.spawn().expect("starts over a stale socket");
    assert_eq!(node.request(r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn a_busy_metrics_port_exits_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = run_once(
        dir.path(),
        &dir.path().join("admin.sock"),
        &format!("127.0.0.1:{port}"),
    );
    assert_eq!(out.status.code(), Some(71), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&port.to_string()));
}

#[test]
fn groups_left_by_dead_jails_are_swept_at_start() {
    let root = std::path::Path::new("/sys/fs/cgroup/devices");
    if let Some(why) = ccnode_sandbox::cgroup::devices_unavailable_reason(root) {
        eprintln!("SKIPPED: no cgroup v1 devices controller here: {why}");
        return;
    }
    let parent = root.join(format!("ccnode-test-start-sweep-{}", std::process::id()));
    std::fs::create_dir(&parent).unwrap();
    let mut c = Command::new("/bin/true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let left = parent.join(format!("worker-m-0-{dead}"));
    let other = parent.join("not-a-worker");
    std::fs::create_dir(&left).unwrap();
    std::fs::create_dir(&other).unwrap();
    let node = TestNode::new(CCNODED)
        .with_toml(&format!(
            "[sandbox]\ndevice_cgroup_parent = \"{}\"\n",
            parent.display()
        ))
        .start();
    let gone = !left.exists();
    let kept = other.exists();
    drop(node);
    std::fs::remove_dir(&other).ok();
    std::fs::remove_dir(&left).ok();
    std::fs::remove_dir(&parent).unwrap();
    assert!(gone, "the dead jail's group is still there");
    assert!(kept, "a group not named after a jail was removed");
}
