//! GPU monitoring end to end: the real ccnoded on the `sim` backend, driven
//! by rewriting its simulation file and appending to its events file, as a
//! driver update, a MIG change, an XID or a GPU falling off the bus would
//! change a real host. Each scenario checks the metrics, the node state and
//! the audit log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ccnode_testkit::prometheus::{promtool_check_metrics, Prometheus};
use ccnode_testkit::{TestNode, PATIENCE};
use serde_json::Value;

const DRIVER: &str = "550.127.05";

/// A simulation: `n` H100s, the first `mig_gpus` of them in `mig`.
fn spec(driver: &str, n: u32, mig_gpus: u32, mig: &str, lost_gpu: Option<u32>) -> String {
    let mut s = format!(
        "driver_version = \"{driver}\"\ncuda_driver_version = \"12.4\"\n\
         scrub_on_free = true\nevents_file = \"events.jsonl\"\n"
    );
    for i in 0..n {
        let mig = if i < mig_gpus { mig } else { "" };
        let lost = lost_gpu == Some(i);
        s.push_str(&format!(
            "\n[[gpus]]\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_gib = 80\n\
             vbios_version = \"96.00.99.00.01\"\ninforom_version = \"G520.0200.00.05\"\n\
             gsp_firmware_version = \"{driver}\"\ncc_mode = \"on\"\nmig = {{ {mig} }}\nlost = {lost}\n"
        ));
    }
    s
}

fn sim_path(node: &TestNode) -> PathBuf {
    node.dir().join("gpus.sim.toml")
}

/// Replaces the simulation file the way an atomic config update would.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn inject(node: &TestNode, lines: &[&str]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.dir().join("events.jsonl"))
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// A node on simulated GPUs polled every 200ms, with `gpu` keys and
/// `tables` added to its config.
fn sim_node(sim: &str, gpu: &str, tables: &str) -> TestNode {
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    std::fs::write(sim_path(&node), sim).unwrap();
    let keys = format!(
        "backend = \"sim\"\nsim_file = \"{}\"\npoll_interval = \"200ms\"\n{gpu}",
        sim_path(&node).display()
    );
    node.with_gpu(&keys).with_toml(tables).start()
}

fn scrape(node: &TestNode) -> String {
    let (code, text) = node.http_get("/metrics");
    assert_eq!(code, 200);
    text
}

/// The value of the series starting with `series` (name and labels, up to
/// the closing brace or the space).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until a scrape satisfies `pred`; returns that scrape.
fn wait_scrape(node: &TestNode, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(node);
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; last scrape:\n{text}\nlog:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(node: &TestNode) -> Value {
    node.request(r#"{"v":1,"cmd":"status"}"#)["result"].clone()
}

fn wait_state(node: &TestNode, state: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = status(node);
        if s["state"] == state {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "never {state}: {s}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit(node: &TestNode) -> Vec<Value> {
    let r = node.request(r#"{"v":1,"cmd":"audit","limit":1000}"#);
    r["result"]["records"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn audited(node: &TestNode, command: &str) -> Vec<Value> {
    audit(node)
        .into_iter()
        .filter(|r| r["command"] == command)
        .collect()
}

/// Waits for at least one `command` record.
fn wait_audit(node: &TestNode, command: &str) -> Vec<Value> {
    wait_audit_n(node, command, 1)
}

/// Waits for at least `n` `command` records: findings are audited one by
/// one after the scrape that shows them.
fn wait_audit_n(node: &TestNode, command: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = audited(node, command);
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {command} audit record: {:?}",
            audit(node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn drift_at_start_quarantines_before_ready_when_the_policy_says_so() {
    let node = sim_node(
        &spec("560.35.03", 2, 0, "", None),
        "",
        &format!(
            "[gpu.baseline]\ndriver_version = \"{DRIVER}\"\n\
             [gpu.drift_action]\ndriver_version = \"quarantine\"\n"
        ),
    );
    // Already in effect when READY=1 arrived: no wait.
    let s = status(&node);
    assert_eq!(s["state"], "quarantined", "{s}");
    assert!(
        s["reason"].as_str().unwrap().contains("driver_version"),
        "{s}"
    );
    assert_eq!(s["by"]["component"], "gpu");

    let text = scrape(&node);
    let series = format!(
        "ccnode_gpu_drift{{field=\"driver_version\",gpu=\"\",uuid=\"\",expected=\"{DRIVER}\",found=\"560.35.03\",action=\"quarantine\"}} 1"
    );
    assert!(text.contains(&series), "{text}");
    assert_eq!(value(&text, "ccnode_gpu_drift_fields"), Some(1.0));
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(1.0));

    let drift = audited(&node, "gpu_drift");
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["result"], "quarantine");
    assert_eq!(drift[0]["actor"]["component"], "gpu");
    let q = audited(&node, "quarantine");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["to"], "quarantined");

    let out = ccnodectl(&node, &["drift"]);
    assert!(out.contains("driver_version"), "{out}");
    assert!(
        out.contains("560.35.03") && out.contains("quarantine"),
        "{out}"
    );
}

#[test]
fn drift_at_run_time_blocks_workers_and_clears_when_the_driver_is_back() {
    let node = sim_node(
        &spec(DRIVER, 2, 0, "", None),
        "",
        &format!(
            "[gpu.baseline]\ndriver_version = \"{DRIVER}\"\ngsp_firmware_version = \"{DRIVER}\"\n\
             [gpu.drift_action]\ndriver_version = \"block\"\n"
        ),
    );
    let text = scrape(&node);
    assert_eq!(value(&text, "ccnode_gpu_drift_fields"), Some(0.0));
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));
    assert!(audited(&node, "gpu_drift").is_empty());
    assert!(ccnodectl(&node, &["drift"]).contains("no drift"));

    // The driver is upgraded under the running daemon.
    rewrite(&sim_path(&node), &spec("560.35.03", 2, 0, "", None));
    let text = wait_scrape(&node, "drift", |t| {
        value(t, "ccnode_gpu_drift_fields") == Some(3.0)
    });
    assert!(text.contains("field=\"driver_version\",gpu=\"\""), "{text}");
    // GSP firmware drifts per GPU; its action is the default, alert.
    assert!(
        text.contains("field=\"gsp_firmware_version\",gpu=\"1\""),
        "{text}"
    );
    assert!(text.contains("action=\"alert\""), "{text}");
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(1.0));
    let records = wait_audit_n(&node, "gpu_drift", 3);
    assert_eq!(records.len(), 3, "{records:?}");
    let results: Vec<_> = records.iter().map(|r| r["result"].clone()).collect();
    assert!(results.contains(&"block".into()) && results.contains(&"alert".into()));
    assert_eq!(
        status(&node)["state"],
        "active",
        "block does not quarantine"
    );
    let gpus = node.request(r#"{"v":1,"cmd":"gpus"}"#)["result"].clone();
    assert_eq!(gpus["workers_blocked"], true, "{gpus}");

    rewrite(&sim_path(&node), &spec(DRIVER, 2, 0, "", None));
    let text = wait_scrape(&node, "drift cleared", |t| {
        value(t, "ccnode_gpu_drift_fields") == Some(0.0)
    });
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));
    assert_eq!(wait_audit_n(&node, "gpu_drift_cleared", 3).len(), 3);
}

#[test]
fn a_failed_poll_blocks_workers_until_one_succeeds() {
    let node = sim_node(&spec(DRIVER, 2, 0, "", None), "", "");
    let text = scrape(&node);
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));
    // The backend stops answering: health and layout are not known now.
    rewrite(&sim_path(&node), "not a simulation file");
    let text = wait_scrape(&node, "blocked by a failed poll", |t| {
        value(t, "ccnode_gpu_workers_blocked") == Some(1.0)
    });
    assert!(
        text.contains("ccnode_gpu_polls_total{result=\"error\"}"),
        "{text}"
    );
    let gpus = node.request(r#"{"v":1,"cmd":"gpus"}"#)["result"].clone();
    assert_eq!(gpus["workers_blocked"], true, "{gpus}");
    let reasons = gpus["blocked_reasons"].to_string();
    assert!(reasons.contains("the last GPU poll failed"), "{reasons}");
    assert!(gpus["last_error"].is_string(), "{gpus}");
    // The last good inventory is still shown, and says when it was taken.
    assert_eq!(gpus["inventory"]["gpus"].as_array().map(Vec::len), Some(2));
    assert!(gpus["last_poll"].is_string());

    rewrite(&sim_path(&node), &spec(DRIVER, 2, 0, "", None));
    let text = wait_scrape(&node, "a good poll again", |t| {
        value(t, "ccnode_gpu_workers_blocked") == Some(0.0)
    });
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));
    let gpus = node.request(r#"{"v":1,"cmd":"gpus"}"#)["result"].clone();
    assert!(gpus["last_error"].is_null(), "{gpus}");
}

#[test]
fn a_mig_layout_that_drifts_from_the_policy_blocks_workers_or_quarantines() {
    let policy =
        "[gpu.baseline.mig_layout]\n\"NVIDIA H100 80GB HBM3\" = { \"1g.10gb\" = 7 }\n\"1\" = {}\n";
    let node = sim_node(&spec(DRIVER, 2, 1, "\"1g.10gb\" = 7", None), "", policy);
    let text = scrape(&node);
    assert_eq!(value(&text, "ccnode_gpu_drift_fields"), Some(0.0), "{text}");
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));

    // GPU 0 repartitioned, GPU 1 put into MIG mode: both differ from the
    // policy; the default action for the layout is block.
    rewrite(
        &sim_path(&node),
        &spec(DRIVER, 2, 2, "\"3g.40gb\" = 2", None),
    );
    let text = wait_scrape(&node, "layout drift", |t| {
        value(t, "ccnode_gpu_drift_fields") == Some(2.0)
    });
    assert!(text.contains("field=\"mig_layout\",gpu=\"0\""), "{text}");
    assert!(text.contains("action=\"block\""), "{text}");
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(1.0));
    let records = wait_audit_n(&node, "gpu_drift", 2);
    let reasons: Vec<_> = records.iter().map(|r| r["reason"].to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("expected 1g.10gb x7, found 3g.40gb x2")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("expected off, found 3g.40gb x2")),
        "{reasons:?}"
    );
    assert_eq!(
        status(&node)["state"],
        "active",
        "block does not quarantine"
    );
    assert!(ccnodectl(&node, &["drift"]).contains("mig_layout"));

    // Back as declared: the drift clears.
    rewrite(
        &sim_path(&node),
        &spec(DRIVER, 2, 1, "\"1g.10gb\" = 7", None),
    );
    let text = wait_scrape(&node, "layout drift cleared", |t| {
        value(t, "ccnode_gpu_drift_fields") == Some(0.0)
    });
    assert_eq!(value(&text, "ccnode_gpu_workers_blocked"), Some(0.0));

    // With quarantine as the action, the node is fenced.
    let node = sim_node(
        &spec(DRIVER, 2, 1, "\"1g.10gb\" = 7", None),
        "",
        &format!("{policy}[gpu.drift_action]\nmig_layout = \"quarantine\"\n"),
    );
    assert_eq!(status(&node)["state"], "active");
    rewrite(
        &sim_path(&node),
        &spec(DRIVER, 2, 1, "\"1g.10gb\" = 6", None),
    );
    let st = wait_state(&node, "quarantined");
    assert!(
        st["reason"].as_str().unwrap().contains("mig_layout"),
        "{st}"
    );
}

#[test]
fn a_mig_configuration_change_event_compares_the_layout_at_once() {
    // Polled once an hour: only the event can bring the comparison forward.
    let policy = "[gpu.baseline.mig_layout]\n\"0\" = { \"1g.10gb\" = 7 }\n";
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    std::fs::write(sim_path(&node), spec(DRIVER, 1, 1, "\"1g.10gb\" = 7", None)).unwrap();
    let keys = format!(
        "backend = \"sim\"\nsim_file = \"{}\"\npoll_interval = \"1h\"\n",
        sim_path(&node).display()
    );
    let node = node.with_gpu(&keys).with_toml(policy).start();
    let text = scrape(&node);
    assert_eq!(value(&text, "ccnode_gpu_drift_fields"), Some(0.0), "{text}");

    // Repartitioned behind ccnoded's back, and the driver says so.
    rewrite(
        &sim_path(&node),
        &spec(DRIVER, 1, 1, "\"3g.40gb\" = 2", None),
    );
    inject(&node, &[r#"{"gpu":0,"mig_config_change":true}"#]);
    let text = wait_scrape(&node, "layout drift after the event", |t| {
        value(t, "ccnode_gpu_drift_fields") == Some(1.0)
    });
    assert!(text.contains("field=\"mig_layout\",gpu=\"0\""), "{text}");
    assert_eq!(
        value(&text, "ccnode_gpu_events_total{type=\"mig_config_change\"}"),
        Some(1.0)
    );
    assert!(
        node.log().contains("MIG configuration changed"),
        "{}",
        node.log()
    );
}

#[test]
fn an_invalid_mig_layout_is_a_config_error_naming_it() {
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    std::fs::write(sim_path(&node), spec(DRIVER, 1, 0, "", None)).unwrap();
    let sim = sim_path(&node);
    let mut node = node
        .with_gpu(&format!(
            "backend = \"sim\"\nsim_file = \"{}\"",
            sim.display()
        ))
        .with_toml("[gpu.baseline.mig_layout]\n\"0\" = { \"1g.10gb\" = 9 }\n");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("gpu.baseline.mig_layout"), "{log}");
}

#[test]
fn an_xid_burst_is_counted_and_leaves_the_node_alone() {
    let node = sim_node(&spec(DRIVER, 2, 1, "\"1g.10gb\" = 7", None), "", "");
    let burst: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{{\"gpu\": {}, \"xid\": 31, \"gpu_instance\": {}, \"compute_instance\": 0}}",
                i % 2,
                1 + i % 7
            )
        })
        .collect();
    let lines: Vec<&str> = burst.iter().map(String::as_str).collect();
    inject(&node, &lines);
    let text = wait_scrape(&node, "40 XIDs", |t| {
        value(t, "ccnode_gpu_events_total{type=\"xid\"}") == Some(40.0)
    });
    let gpu0 = text
        .lines()
        .find(|l| l.starts_with("ccnode_gpu_xid_errors_total{gpu=\"0\""))
        .unwrap();
    assert!(gpu0.ends_with("xid=\"31\"} 20"), "{gpu0}");
    assert!(text.contains("ccnode_gpu_last_xid{gpu=\"1\""), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ccnode_gpu_health{") && l.ends_with(" 1"))
            .count(),
        2,
        "XID 31 is not critical"
    );
    assert_eq!(status(&node)["state"], "active");
    assert!(audited(&node, "gpu_health").is_empty());
}

#[test]
fn a_critical_xid_quarantines_the_node_with_the_event_as_the_reason() {
    let node = sim_node(&spec(DRIVER, 4, 0, "", None), "", "");
    inject(&node, &[r#"{"gpu": 2, "xid": 79}"#]);
    let s = wait_state(&node, "quarantined");
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains("gpu 2") && reason.contains("critical xid 79"),
        "{s}"
    );
    assert_eq!(s["by"]["component"], "gpu");
    let health = audited(&node, "gpu_health");
    assert_eq!(health.len(), 1, "{health:?}");
    assert_eq!(health[0]["result"], "quarantine");
    let text = scrape(&node);
    let unhealthy: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("ccnode_gpu_health{") && l.ends_with(" 0"))
        .collect();
    assert_eq!(unhealthy.len(), 1, "{unhealthy:?}");
    assert!(unhealthy[0].contains("gpu=\"2\""));
    assert_eq!(
        value(&text, "ccnode_node_state{state=\"quarantined\"}"),
        Some(1.0)
    );

    // The same XID under an `alert` policy: audited, node stays active.
    let node = sim_node(
        &spec(DRIVER, 4, 0, "", None),
        "",
        "[gpu.health]\ncritical_xid_action = \"alert\"\n",
    );
    inject(&node, &[r#"{"gpu": 2, "xid": 79}"#]);
    let health = wait_audit(&node, "gpu_health");
    assert_eq!(health[0]["result"], "alert");
    assert_eq!(status(&node)["state"], "active");
    let gpus = node.request(r#"{"v":1,"cmd":"gpus"}"#)["result"].clone();
    assert_eq!(gpus["health"]["2"]["healthy"], false, "{gpus}");
    assert_eq!(gpus["workers_blocked"], true);
}

#[test]
fn a_gpu_lost_from_the_bus_is_reported_and_quarantines() {
    let node = sim_node(&spec(DRIVER, 3, 0, "", None), "", "");
    rewrite(&sim_path(&node), &spec(DRIVER, 3, 0, "", Some(1)));
    let s = wait_state(&node, "quarantined");
    assert!(
        s["reason"].as_str().unwrap().contains("fallen off the bus"),
        "{s}"
    );
    let text = wait_scrape(&node, "gpu 1 lost", |t| {
        value(t, "ccnode_gpu_lost{gpu=\"1\"") == Some(1.0)
    });
    assert_eq!(value(&text, "ccnode_gpu_lost{gpu=\"0\""), Some(0.0));
    assert_eq!(value(&text, "ccnode_gpu_health{gpu=\"1\""), Some(0.0));
    // No telemetry is made up for a lost GPU; the others keep theirs.
    assert!(text.contains("ccnode_gpu_power_watts{gpu=\"0\""));
    assert!(!text.contains("ccnode_gpu_power_watts{gpu=\"1\""), "{text}");
    // Still in the inventory, marked lost.
    assert!(text.contains("ccnode_gpu_info{gpu=\"1\""));
    assert_eq!(audited(&node, "gpu_health").len(), 1);
}

#[test]
fn uncorrected_ecc_past_the_threshold_fences_the_node() {
    let node = sim_node(
        &spec(DRIVER, 2, 0, "", None),
        "",
        "[gpu.health]\necc_uncorrected_threshold = 3\n",
    );
    inject(&node, &[r#"{"gpu": 0, "ecc": "uncorrected", "count": 2}"#]);
    wait_scrape(&node, "2 uncorrected", |t| {
        value(t, "ccnode_gpu_ecc_errors_total{gpu=\"0\"").is_some()
            && t.contains("type=\"uncorrected\"} 2")
    });
    assert_eq!(status(&node)["state"], "active", "below the threshold");
    inject(&node, &[r#"{"gpu": 0, "ecc": "uncorrected", "count": 1}"#]);
    let s = wait_state(&node, "quarantined");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("3 uncorrected ECC errors"),
        "{s}"
    );
}

#[test]
fn a_mig_layout_change_shows_in_the_series_and_the_audit_log() {
    let node = sim_node(&spec(DRIVER, 2, 2, "\"1g.10gb\" = 7", None), "", "");
    let text = scrape(&node);
    let count = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("ccnode_gpu_mig_info{"))
            .count()
    };
    assert_eq!(count(&text), 14);
    assert!(text.contains("gpu_instance=\"7\",compute_instance=\"0\",profile=\"1g.10gb\""));

    rewrite(
        &sim_path(&node),
        &spec(DRIVER, 2, 1, "\"3g.40gb\" = 2", None),
    );
    let text = wait_scrape(&node, "new MIG layout", |t| count(t) == 2);
    assert!(text.contains("profile=\"3g.40gb\""), "{text}");
    assert!(!text.contains("profile=\"1g.10gb\""));
    let changes = wait_audit_n(&node, "gpu_mig_changed", 2);
    let reasons: Vec<_> = changes
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"gpu 0: 7x1g.10gb -> 2x3g.40gb"),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"gpu 1: 7x1g.10gb -> mig disabled"),
        "{reasons:?}"
    );
    assert_eq!(status(&node)["state"], "active");
    let out = ccnodectl(&node, &["gpus"]);
    assert!(
        out.contains("SIMULATED") && out.contains("3g.40gb"),
        "{out}"
    );
}

#[test]
fn promtool_accepts_eight_gpus_in_seven_mig_instances_each() {
    let node = sim_node(&spec(DRIVER, 8, 8, "\"1g.10gb\" = 7", None), "", "");
    inject(&node, &[r#"{"gpu": 3, "xid": 13}"#]);
    let text = wait_scrape(&node, "the XID", |t| t.contains("xid=\"13\""));
    assert_eq!(value(&text, "ccnode_gpu_devices"), Some(8.0));
    assert_eq!(value(&text, "ccnode_gpu_simulated"), Some(1.0));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("ccnode_gpu_mig_framebuffer_bytes{")
                && l.contains("state=\"used\""))
            .count(),
        56
    );
    let (ok, out) = promtool_check_metrics(&text);
    assert!(ok, "promtool rejected the GPU series:\n{out}\n---\n{text}");
    // And it can fail on them: a label value that breaks the format.
    let broken = text.replacen(
        "model=\"NVIDIA H100 80GB HBM3\"",
        "model=\"NVIDIA \"H100\"",
        1,
    );
    let (ok, _) = promtool_check_metrics(&broken);
    assert!(!ok, "promtool accepted a broken label value");
}

#[test]
fn prometheus_scrapes_the_gpu_series() {
    let node = sim_node(&spec(DRIVER, 2, 1, "\"2g.20gb\" = 3", None), "", "");
    let prom = Prometheus::start(node.http_addr.unwrap());
    let temp = prom.wait_for(r#"ccnode_gpu_temperature_celsius{job="ccnode"}"#);
    assert_eq!(temp.len(), 2, "{temp:?}");
    for s in &temp {
        assert_eq!(s["metric"]["model"], "NVIDIA H100 80GB HBM3");
        assert!(s["metric"]["uuid"].as_str().unwrap().starts_with("GPU-"));
    }
    let mig = prom.wait_for(r#"ccnode_gpu_mig_info{job="ccnode",profile="2g.20gb"}"#);
    assert_eq!(mig.len(), 3, "{mig:?}");
    let sim = prom.wait_for(r#"ccnode_gpu_simulated{job="ccnode"} == 1"#);
    assert_eq!(sim.len(), 1);
    inject(&node, &[r#"{"gpu": 1, "xid": 43}"#]);
    let xid = prom.wait_for(r#"ccnode_gpu_xid_errors_total{job="ccnode",gpu="1",xid="43"} == 1"#);
    assert_eq!(xid.len(), 1);
}

#[test]
fn the_simulation_is_said_in_the_startup_log() {
    let node = sim_node(&spec(DRIVER, 1, 0, "", None), "", "");
    let log = node.log();
    let ready = log
        .lines()
        .find(|l| l.contains("ccnoded ready"))
        .expect("ready line");
    assert!(ready.contains("SIMULATED"), "{ready}");
    assert!(log.contains("GPU backend is SIMULATED"), "{log}");
    // A node without GPUs says nothing of the kind.
    let plain = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).start();
    assert!(!plain.log().contains("SIMULATED"));
    assert!(
        !scrape(&plain).contains("ccnode_gpu_"),
        "no GPU series without a backend"
    );
}

#[test]
fn nvml_on_a_host_without_it_exits_69_and_never_simulates() {
    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).with_gpu("backend = \"nvml\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("libnvidia-ml"), "names what is missing: {log}");
    assert!(!log.contains("ccnoded ready"));
    assert!(
        !node.state_dir().join("state.json").exists(),
        "no state touched"
    );
}

#[test]
fn bad_simulation_config_is_a_config_error() {
    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).with_gpu("backend = \"sim\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("gpu.sim_file"), "{log}");

    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    let path = node.dir().join("bad.sim.toml");
    std::fs::write(&path, "driver_version = 1\n").unwrap();
    let mut node = node.with_gpu(&format!(
        "backend = \"sim\"\nsim_file = \"{}\"",
        path.display()
    ));
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("bad.sim.toml"), "{log}");
}

fn ccnodectl(node: &TestNode, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ccnodectl"))
        .arg("--socket")
        .arg(node.socket())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}
