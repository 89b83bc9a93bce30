//! Node state across restarts and crashes, against the real ccnoded.
//!
//! Crashes are real: a debug build of ccnoded aborts at a named point of
//! its state write when `CCNODE_TEST_CRASH_AT` says so.

use ccnode_testkit::TestNode;
use serde_json::Value;

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");

fn status(node: &TestNode) -> Value {
    let resp = node.request(r#"{"v":1,"cmd":"status"}"#);
    assert_eq!(resp["ok"], true, "{resp}");
    resp["result"].clone()
}

#[test]
fn quarantine_survives_a_restart_with_its_reason() {
    let mut node = TestNode::new(CCNODED).start();
    let resp = node.request(r#"{"v":1,"cmd":"quarantine","reason":"ECC storm on gpu 2"}"#);
    assert_eq!(resp["result"]["to"], "quarantined", "{resp}");
    let before = status(&node);
    node.restart();
    let after = status(&node);
    for key in ["state", "reason", "by", "since", "seq"] {
        assert_eq!(before[key], after[key], "{key}");
    }
    assert_eq!(after["state"], "quarantined");
    assert_eq!(after["reason"], "ECC storm on gpu 2");
    // The audit history came back too.
    let audit = node.request(r#"{"v":1,"cmd":"audit"}"#);
    let records = audit["result"]["records"].as_array().unwrap();
    assert_eq!(records.last().unwrap()["reason"], "ECC storm on gpu 2");
    // And the node is refused work-wise until released.
    assert_eq!(node.http_get("/readyz").0, 503);
    let resp = node.request(r#"{"v":1,"cmd":"release","reason":"gpu 2 replaced"}"#);
    assert_eq!(resp["result"]["to"], "active");
    node.restart();
    assert_eq!(status(&node)["state"], "active");
}

#[test]
fn drained_state_survives_sigint_too() {
    let mut node = TestNode::new(CCNODED).start();
    node.request(r#"{"v":1,"cmd":"drain","reason":"kernel update"}"#);
    node.signal(libc::SIGINT);
    assert!(node.wait().success());
    node.restart();
    assert_eq!(status(&node)["state"], "drained");
}

#[test]
fn a_crash_before_the_rename_loses_nothing_that_was_acknowledged() {
    let mut node = TestNode::new(CCNODED).start();
    let resp = node.request(r#"{"v":1,"cmd":"quarantine","reason":"acknowledged"}"#);
    assert_eq!(resp["ok"], true);
    let acknowledged = status(&node);
    let status_code = node.stop();
    assert!(status_code.success());

    // Next run crashes while writing the release: after the temporary file
    // is complete and synced, before it replaces state.json.
    let mut node = node.with_env("CCNODE_TEST_CRASH_AT", "state-before-rename");
    node.spawn()
        .expect("restored state needs no write at start");
    let mut s = node.connect();
    use std::io::Write;
    s.write_all(b"{\"v\":1,\"cmd\":\"release\",\"reason\":\"never acknowledged\"}\n")
        .unwrap();
    assert!(
        ccnode_testkit::read_response(&mut s).is_none(),
        "the daemon died before answering"
    );
    let died = node.wait();
    assert!(!died.success(), "aborted: {died}");
    assert!(node.state_dir().join("state.json.tmp").exists());

    let mut node = TestNode::restart_clean(node);
    let now = status(&node);
    for key in ["state", "reason", "by", "since", "seq"] {
        assert_eq!(acknowledged[key], now[key], "{key}");
    }
    assert!(!node.state_dir().join("state.json.tmp").exists());
    assert!(node.log().contains("discarding an unfinished state write"));
    // Nothing that was not acknowledged is in the audit log either.
    let audit = node.request(r#"{"v":1,"cmd":"audit"}"#);
    let reasons: Vec<&str> = audit["result"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(!reasons.contains(&"never acknowledged"), "{reasons:?}");
    assert_eq!(node.stop().code(), Some(0));
}

#[test]
fn a_crash_after_the_rename_keeps_the_new_state() {
    let mut node = TestNode::new(CCNODED).start();
    node.request(r#"{"v":1,"cmd":"quarantine","reason":"first"}"#);
    assert!(node.stop().success());
    let mut node = node.with_env("CCNODE_TEST_CRASH_AT", "state-after-rename");
    node.spawn().unwrap();
    let mut s = node.connect();
    use std::io::Write;
    s.write_all(b"{\"v\":1,\"cmd\":\"release\",\"reason\":\"landed\"}\n")
        .unwrap();
    assert!(ccnode_testkit::read_response(&mut s).is_none());
    assert!(!node.wait().success());
    let node = TestNode::restart_clean(node);
    let now = status(&node);
    assert_eq!(now["state"], "active");
    assert_eq!(now["reason"], "landed");
}

#[test]
fn a_corrupt_state_file_starts_the_node_quarantined() {
    for (name, bytes) in [
        ("truncated", &br#"{"format":"ccnode-node-state","version":1,"record":{"state":"act"#[..]),
        ("garbage", &b"\x7fELF\x02\x01\x01\x00"[..]),
        ("empty", &b""[..]),
        ("unknown state", &br#"{"format":"ccnode-node-state","version":1,"record":{"state":"happy","reason":"x","by":{"kind":"system","component":"x"},"since":"2026-01-01T00:00:00Z","seq":1}}"#[..]),
    ] {
        let mut node = TestNode::new(CCNODED).start();
        assert!(node.stop().success());
        std::fs::write(node.state_dir().join("state.json"), bytes).unwrap();
        node.spawn().unwrap();
        let s = status(&node);
        assert_eq!(s["state"], "quarantined", "{name}");
        assert!(
            s["reason"].as_str().unwrap().contains("state file"),
            "{name}: {s}"
        );
        assert_eq!(s["by"]["kind"], "system");
        let kept = std::fs::read_dir(node.state_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("state.json.corrupt-"));
        assert!(kept, "{name}: the bad file is kept for examination");
        // The recovery is audited, and an admin can release the node.
        let audit = node.request(r#"{"v":1,"cmd":"audit"}"#);
        let last = audit["result"]["records"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["command"], "recover", "{name}");
        let resp = node.request(r#"{"v":1,"cmd":"release","reason":"checked the disk"}"#);
        assert_eq!(resp["result"]["to"], "active", "{name}");
        // And it stays quarantined across a restart until then.
    }
}

#[test]
fn a_missing_state_file_with_history_is_not_a_first_start() {
    let mut node = TestNode::new(CCNODED).start();
    node.request(r#"{"v":1,"cmd":"quarantine","reason":"something"}"#);
    assert!(node.stop().success());
    std::fs::remove_file(node.state_dir().join("state.json")).unwrap();
    node.spawn().unwrap();
    let s = status(&node);
    assert_eq!(s["state"], "quarantined");
    assert!(s["reason"].as_str().unwrap().contains("missing"), "{s}");
}
