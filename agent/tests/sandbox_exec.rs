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

    let out = sandbox_exec(NOBODY, &["--gpu", "7", "--", "id"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("/dev/nvidia7 does not exist"));

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
