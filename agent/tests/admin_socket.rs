//! The admin socket, end to end against the real ccnoded: who may connect,
//! what every kind of bad input gets, limits, and concurrent clients.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};

use ccnode_testkit::{read_response, send_line, tool, TestNode};
use serde_json::Value;

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");
const CCNODECTL: &str = env!("CARGO_BIN_EXE_ccnodectl");

/// The uid and gid tests drop to: `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;

fn code(resp: &Value) -> &str {
    resp["error"]["code"].as_str().unwrap_or("<none>")
}

/// Lets unprivileged users reach the socket: the harness's temp dir is 0700.
fn open_dir_to_all(node: &TestNode) {
    for dir in [node.dir().to_path_buf(), node.dir().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Runs ccnodectl as `nobody` with the given supplementary groups.
fn ctl_as_nobody(node: &TestNode, groups: &[u32], args: &[&str]) -> Output {
    let mut cmd = Command::new(tool("setpriv"));
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg(CCNODECTL)
        .arg("--socket")
        .arg(node.socket())
        .arg("--json")
        .args(args)
        .output()
        .expect("run setpriv")
}

fn metric(node: &TestNode, series: &str) -> f64 {
    let (status, body) = node.http_get("/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
}

/// A connection the daemon has served once, retrying while every slot is
/// taken (slots are released when the daemon notices a client left).
fn served_connection(node: &TestNode) -> std::os::unix::net::UnixStream {
    let deadline = std::time::Instant::now() + ccnode_testkit::PATIENCE;
    loop {
        let mut s = node.connect();
        // A refused connection may be closed before the request is written.
        let _ = s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n");
        let resp = read_response(&mut s).expect("a response");
        if resp["ok"] == true {
            return s;
        }
        assert_eq!(code(&resp), "too_many_connections", "{resp}");
        assert!(std::time::Instant::now() < deadline, "slots never freed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn socket_is_created_with_configured_mode_and_group_and_nothing_left_behind() {
    let node = TestNode::new(CCNODED).start();
    let meta = std::fs::metadata(node.socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    let leftovers: Vec<_> = std::fs::read_dir(node.socket().parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "admin.sock")
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[test]
fn root_gets_status() {
    let node = TestNode::new(CCNODED).start();
    let resp = node.request(r#"{"v":1,"cmd":"status","id":"s1"}"#);
    assert_eq!(resp["ok"], true, "{resp}");
    assert_eq!(resp["v"], 1);
    assert_eq!(resp["id"], "s1");
    let r = &resp["result"];
    assert_eq!(r["state"], "active");
    assert_eq!(r["reason"], "first start");
    assert_eq!(r["node_id"], "test-node");
    assert_eq!(r["by"]["kind"], "system");
    assert_eq!(r["in_flight"], 0);
    assert_eq!(r["admin_socket"], node.socket().display().to_string());
}

#[test]
fn file_permissions_keep_other_users_out() {
    let node = TestNode::new(CCNODED).start();
    open_dir_to_all(&node);
    let out = ctl_as_nobody(&node, &[], &["status"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
}

#[test]
fn peer_credentials_refuse_unauthorised_users_even_with_an_open_socket() {
    // A world-writable socket: only SO_PEERCRED stands in the way.
    let node = TestNode::new(CCNODED).with_admin("mode = \"0666\"").start();
    open_dir_to_all(&node);
    for args in [&["status"][..], &["quarantine", "--reason", "nope"][..]] {
        let out = ctl_as_nobody(&node, &[], args);
        assert_eq!(out.status.code(), Some(4), "{out:?}");
        let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(code(&resp), "permission_denied");
    }
    assert_eq!(
        node.request(r#"{"v":1,"cmd":"status"}"#)["result"]["state"],
        "active"
    );
    assert!(
        metric(
            &node,
            "ccnode_admin_refused_connections_total{reason=\"unauthorized\"}"
        ) >= 2.0
    );
}

#[test]
fn read_only_group_may_read_but_not_act() {
    let node = TestNode::new(CCNODED)
        .with_admin("mode = \"0666\"\nread_only_group = 4242")
        .start();
    open_dir_to_all(&node);
    let out = ctl_as_nobody(&node, &[4242], &["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resp["result"]["state"], "active");

    for args in [&["drain", "-r", "x"][..], &["audit"][..]] {
        let out = ctl_as_nobody(&node, &[4242], args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {out:?}");
        let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(code(&resp), "permission_denied");
    }
    assert_eq!(
        node.request(r#"{"v":1,"cmd":"status"}"#)["result"]["state"],
        "active"
    );
    // The refused drain is in the audit log, with who tried.
    let audit = node.request(r#"{"v":1,"cmd":"audit"}"#);
    let records = audit["result"]["records"].as_array().unwrap();
    let refused: Vec<&str> = records
        .iter()
        .filter(|r| r["result"] == "permission_denied" && r["actor"]["uid"] == NOBODY)
        .map(|r| r["command"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["drain", "audit"]);
}

#[test]
fn admin_group_membership_through_supplementary_groups() {
    let node = TestNode::new(CCNODED)
        .with_admin("mode = \"0666\"\ngroup = 4243")
        .start();
    open_dir_to_all(&node);
    let out = ctl_as_nobody(&node, &[7, 4243], &["drain", "--reason", "by group member"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let status = node.request(r#"{"v":1,"cmd":"status"}"#);
    assert_eq!(status["result"]["state"], "drained");
    assert_eq!(status["result"]["by"]["uid"], NOBODY);
    assert_eq!(status["result"]["by"]["kind"], "admin");
    // Without the group the same user is refused.
    let out = ctl_as_nobody(&node, &[7], &["undrain", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

#[test]
fn malformed_requests_get_stable_codes_and_the_connection_survives() {
    let node = TestNode::new(CCNODED).start();
    let mut s = node.connect();
    for (line, expected) in [
        ("this is not json", "invalid_json"),
        ("[]", "invalid_json"),
        (r#"{"cmd":"status"}"#, "missing_field"),
        (r#"{"v":99,"cmd":"status"}"#, "unsupported_version"),
        (r#"{"v":1}"#, "missing_field"),
        (r#"{"v":1,"cmd":"reboot"}"#, "unknown_command"),
        (r#"{"v":1,"cmd":"drain"}"#, "missing_field"),
        (r#"{"v":1,"cmd":"drain","reason":"   "}"#, "missing_field"),
        (
            r#"{"v":1,"cmd":"drain","reason":"a\u0007b"}"#,
            "invalid_request",
        ),
        (r#"{"v":1,"cmd":"status","bogus":1}"#, "invalid_request"),
        (r#"{"v":1,"cmd":"audit","limit":0}"#, "invalid_request"),
        (
            r#"{"v":1,"cmd":"release","reason":"not quarantined"}"#,
            "invalid_transition",
        ),
        ("", "invalid_json"),
    ] {
        let resp = send_line(&mut s, line);
        assert_eq!(resp["ok"], false, "{line}: {resp}");
        assert_eq!(code(&resp), expected, "{line}: {resp}");
        assert!(!resp["error"]["message"].as_str().unwrap().is_empty());
    }
    // Same connection, still served.
    let resp = send_line(&mut s, r#"{"v":1,"cmd":"status"}"#);
    assert_eq!(resp["ok"], true);
    assert_eq!(resp["result"]["state"], "active");
    assert!(
        metric(
            &node,
            "ccnode_admin_requests_total{command=\"unknown\",result=\"invalid_json\"}"
        ) >= 3.0
    );
}

#[test]
fn requests_are_limited_to_64_kib() {
    let node = TestNode::new(CCNODED).start();
    // Exactly 64 KiB of valid JSON is served.
    let base = r#"{"v":1,"cmd":"status"}"#;
    let exact = format!("{base}{}", " ".repeat(64 * 1024 - base.len()));
    let mut s = node.connect();
    assert_eq!(send_line(&mut s, &exact)["ok"], true);
    // One byte more is refused and the connection closed.
    let over = format!("{exact} ");
    // The daemon answers and closes as soon as it has 64 KiB + 1 bytes, so
    // the rest of this write may fail: that is the point.
    let _ = s.write_all(over.as_bytes());
    let _ = s.write_all(b"\n");
    let resp = read_response(&mut s).expect("an error response");
    assert_eq!(code(&resp), "request_too_large");
    assert!(read_response(&mut s).is_none(), "connection closed");
    // A huge request with no newline at all is cut off too.
    let mut s = node.connect();
    let chunk = vec![b'x'; 1024 * 1024];
    let _ = s.write_all(&chunk); // the server may close mid-write
    let resp = read_response(&mut s).expect("an error response");
    assert_eq!(code(&resp), "request_too_large");
}

#[test]
fn slow_and_idle_clients_time_out() {
    // The harness sets admin.read_timeout = 2s.
    let node = TestNode::new(CCNODED).start();
    let mut idle = node.connect();
    let mut slow = node.connect();
    slow.write_all(br#"{"v":1,"cmd":"sta"#).unwrap();
    for s in [&mut idle, &mut slow] {
        let resp = read_response(s).expect("a timeout response");
        assert_eq!(code(&resp), "timeout");
        assert!(read_response(s).is_none(), "connection closed");
    }
    // The daemon still serves others.
    assert_eq!(node.request(r#"{"v":1,"cmd":"status"}"#)["ok"], true);
}

#[test]
fn connections_beyond_the_cap_are_refused_then_served_again() {
    let node = TestNode::new(CCNODED)
        .with_admin("max_connections = 2\nread_timeout = \"30s\"")
        .start();
    // The harness's own status call may still hold a slot for a moment.
    let held: Vec<_> = (0..2).map(|_| served_connection(&node)).collect();
    let mut third = node.connect();
    let resp = read_response(&mut third).expect("a refusal");
    assert_eq!(code(&resp), "too_many_connections");
    assert!(read_response(&mut third).is_none());
    drop(held);
    // Slots are freed when clients go away.
    drop(served_connection(&node));
    assert!(
        metric(
            &node,
            "ccnode_admin_refused_connections_total{reason=\"connection_limit\"}"
        ) >= 1.0
    );
}

#[test]
fn concurrent_clients_see_consistent_state_and_every_change_is_audited() {
    let node = TestNode::new(CCNODED)
        .with_admin("max_connections = 64")
        .start();
    let node = std::sync::Arc::new(node);
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut s = node.connect();
                let mut changes = 0;
                for j in 0..40 {
                    let line = match (i + j) % 4 {
                        0 => r#"{"v":1,"cmd":"drain","reason":"load test"}"#,
                        1 => r#"{"v":1,"cmd":"undrain","reason":"load test"}"#,
                        _ => r#"{"v":1,"cmd":"status"}"#,
                    };
                    let resp = send_line(&mut s, line);
                    if resp["ok"] == true {
                        if resp["result"]["changed"] == true {
                            changes += 1;
                        }
                    } else {
                        assert_eq!(code(&resp), "invalid_transition", "{resp}");
                    }
                }
                changes
            })
        })
        .collect();
    let changes: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(changes > 0);
    let status = node.request(r#"{"v":1,"cmd":"status"}"#);
    assert_eq!(status["result"]["seq"], changes as u64);
    let audit = node.request(r#"{"v":1,"cmd":"audit","limit":1000}"#);
    let ok_changes = audit["result"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] == "ok")
        .count();
    assert_eq!(ok_changes, changes);
}

#[test]
fn audit_log_records_who_what_why_and_result() {
    let node = TestNode::new(CCNODED).start();
    assert_eq!(
        node.request(r#"{"v":1,"cmd":"quarantine","reason":"xid 79 on gpu 3"}"#)["ok"],
        true
    );
    assert_eq!(
        code(&node.request(r#"{"v":1,"cmd":"drain","reason":"too late"}"#)),
        "invalid_transition"
    );
    let text = std::fs::read_to_string(node.state_dir().join("audit.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    let q = &records[0];
    assert_eq!(q["command"], "quarantine");
    assert_eq!(q["reason"], "xid 79 on gpu 3");
    assert_eq!(q["result"], "ok");
    assert_eq!(q["from"], "active");
    assert_eq!(q["to"], "quarantined");
    assert_eq!(q["actor"]["kind"], "admin");
    assert_eq!(q["actor"]["uid"], 0);
    assert_eq!(q["actor"]["pid"], std::process::id());
    assert_eq!(records[1]["result"], "invalid_transition");
    let mode = std::fs::metadata(node.state_dir().join("audit.jsonl"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn ccnodectl_speaks_for_humans_and_scripts() {
    let node = TestNode::new(CCNODED).start();
    let ctl = |args: &[&str]| {
        Command::new(CCNODECTL)
            .arg("--socket")
            .arg(node.socket())
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state:") && text.contains("active"), "{text}");

    let out = ctl(&["drain", "--reason", "kernel update"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "active -> drained"
    );

    let out = ctl(&["--json", "drain", "--reason", "again"]);
    assert_eq!(out.status.code(), Some(5), "refused: exit 5");
    let resp: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(code(&resp), "invalid_transition");

    let out = ctl(&["drain"]);
    assert_eq!(out.status.code(), Some(2), "usage: a reason is required");

    let out = ctl(&["audit", "-n", "5"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("kernel update"));

    // A reason may hold any non-control character; bidi controls and
    // zero-width characters, which could make a line read as another,
    // are shown escaped.
    let out = ctl(&["quarantine", "--reason", "ok\u{202e}gnp.exe\u{200b}"]);
    assert!(out.status.success(), "{out:?}");
    let out = ctl(&["audit", "-n", "5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok\\u{202e}gnp.exe\\u{200b}"), "{text}");
    assert!(!text.contains(['\u{202e}', '\u{200b}']), "{text}");

    let out = Command::new(CCNODECTL)
        .args(["--socket", "/nonexistent/admin.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "unreachable: exit 3");
}

#[test]
fn a_client_that_hangs_up_mid_request_does_no_harm() {
    let node = TestNode::new(CCNODED).start();
    for _ in 0..20 {
        let mut s = node.connect();
        s.write_all(br#"{"v":1,"cmd":"quar"#).unwrap();
        drop(s);
    }
    let mut s = node.connect();
    s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let resp: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(resp["result"]["state"], "active");
}
