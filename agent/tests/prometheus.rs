//! ccnoded's metrics as Prometheus itself sees them: a real server scrapes
//! the daemon, and `promtool check metrics` lints a real scrape.

use ccnode_testkit::prometheus::{promtool_check_metrics, Prometheus};
use ccnode_testkit::TestNode;
use serde_json::Value;

fn node() -> TestNode {
    TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
}

fn admin_ok(node: &TestNode, line: &str) -> Value {
    let resp = node.request(line);
    assert_eq!(resp["ok"], true, "{line} failed: {resp}");
    resp
}

/// The value of the only series in `result` (a `data.result` array).
fn only_value(result: &[Value]) -> f64 {
    assert_eq!(result.len(), 1, "expected one series: {result:?}");
    result[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample value: {result:?}"))
}

#[test]
fn prometheus_scrapes_ccnoded_and_follows_its_state() {
    let node = node().start();
    let prom = Prometheus::start(node.http_addr.unwrap());

    let up = prom.wait_for(r#"up{job="ccnode"} == 1"#);
    assert_eq!(only_value(&up), 1.0);
    assert_eq!(
        up[0]["metric"]["instance"],
        node.http_addr.unwrap().to_string()
    );

    let active = prom.wait_for(r#"ccnode_node_state{job="ccnode",state="active"} == 1"#);
    assert_eq!(only_value(&active), 1.0);
    // The same scrape has the other states at 0.
    let drained = prom.wait_for(r#"ccnode_node_state{job="ccnode",state="drained"}"#);
    assert_eq!(only_value(&drained), 0.0, "not drained yet");

    let build = prom.wait_for(r#"ccnode_build_info{job="ccnode",node="test-node"}"#);
    assert_eq!(only_value(&build), 1.0);
    let version = build[0]["metric"]["version"].as_str().unwrap_or_default();
    assert!(!version.is_empty(), "build_info has a version: {build:?}");
    let rss = prom.wait_for(r#"process_resident_memory_bytes{job="ccnode"}"#);
    assert!(only_value(&rss) > 0.0, "{rss:?}");

    admin_ok(&node, r#"{"v":1,"cmd":"drain","reason":"prometheus test"}"#);
    let drained = prom.wait_for(r#"ccnode_node_state{job="ccnode",state="drained"} == 1"#);
    assert_eq!(only_value(&drained), 1.0);
    // Scraped after the drain: active is now 0.
    let active = prom.wait_for(r#"ccnode_node_state{job="ccnode",state="active"}"#);
    assert_eq!(only_value(&active), 0.0);
    let drains =
        prom.wait_for(r#"ccnode_admin_requests_total{job="ccnode",command="drain",result="ok"}"#);
    assert_eq!(only_value(&drains), 1.0);
}

#[test]
fn promtool_accepts_a_real_scrape_and_rejects_a_broken_one() {
    let node = node().start();
    // Traffic so that labelled counters have series.
    admin_ok(&node, r#"{"v":1,"cmd":"status"}"#);
    admin_ok(&node, r#"{"v":1,"cmd":"drain","reason":"lint"}"#);
    admin_ok(&node, r#"{"v":1,"cmd":"undrain","reason":"lint"}"#);
    let bad = node.request(r#"{"v":1,"cmd":"no-such-command"}"#);
    assert_eq!(bad["ok"], false, "{bad}");
    assert_eq!(node.http_get("/healthz").0, 200);
    assert_eq!(node.http_get("/nope").0, 404);

    let (code, text) = node.http_get("/metrics");
    assert_eq!(code, 200);
    for series in [
        "ccnode_admin_requests_total{command=\"drain\",result=\"ok\"} 1",
        "ccnode_http_requests_total{code=\"404\",handler=\"other\"} 1",
        "ccnode_build_info{",
        "process_resident_memory_bytes ",
    ] {
        assert!(text.contains(series), "missing {series:?} in:\n{text}");
    }
    let (ok, out) = promtool_check_metrics(&text);
    assert!(
        ok,
        "promtool rejected ccnoded's metrics:\n{out}\n---\n{text}"
    );

    // The check can fail: a counter without `_total`…
    let unsuffixed = format!(
        "{text}# HELP ccnode_widgets_made Widgets made.\n# TYPE ccnode_widgets_made counter\n\
         ccnode_widgets_made 3\n"
    );
    let (ok, out) = promtool_check_metrics(&unsuffixed);
    assert!(!ok, "promtool accepted a counter without _total:\n{out}");
    assert!(out.contains("_total"), "{out}");

    // …and a malformed line.
    let malformed = text.replacen("ccnode_build_info{", "ccnode_build_info{node=", 1);
    assert_ne!(malformed, text);
    let (ok, out) = promtool_check_metrics(&malformed);
    assert!(!ok, "promtool accepted a malformed exposition:\n{out}");
    assert!(out.contains("pars"), "a parse error: {out}");
}
