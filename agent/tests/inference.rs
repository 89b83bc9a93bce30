//! Inference end to end on CPU: a generated, signed Llama-shaped model;
//! ccnoded verifies it, starts the sandboxed `ccnode-worker` (the real
//! jail: namespaces, Landlock, seccomp), hands it the sealed bytes, and
//! serves the OpenAI API from it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ccnode_testkit::api::{self, Event, Stream};
use ccnode_testkit::{TestNode, PATIENCE};
use ccnode_worker::testmodel::Shape;
use serde_json::{json, Value};

mod common;
use common::{make_model, metric, Model};

const CCNODED: &str = env!("CARGO_BIN_EXE_ccnoded");

fn small() -> Shape {
    Shape::tiny()
}

/// A shape slow enough (in a debug build) that a long generation is still
/// running when a test acts in the middle of it.
fn slower() -> Shape {
    Shape {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 1024,
        shards: 2,
    }
}

fn model_toml(name: &str, m: &Model, extra: &str) -> String {
    format!(
        "[[inference.models]]\nname = \"{name}\"\ndir = \"{}\"\nsignature = \"{}\"\ntrust_policy = \"{}\"\n{extra}\n",
        m.dir.display(),
        m.sig.display(),
        m.policy.display()
    )
}

fn node_with(models_toml: &str) -> TestNode {
    let worker = api::workspace_bin("ccnode-worker");
    TestNode::new(CCNODED)
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\n\n[api]\nenabled = true\nlisten = \"127.0.0.1:0\"\nmax_tokens_cap = 1000\n\n[inference]\nworker_binary = \"{}\"\n\n{models_toml}",
            worker.display()
        ))
        .start()
}

fn models(node: &TestNode) -> Vec<Value> {
    let r = node.request(r#"{"v":1,"cmd":"models"}"#);
    r["result"]["models"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `name` has `n` ready workers (panics with the log if not).
fn wait_ready(node: &TestNode, name: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE * 4;
    loop {
        let ms = models(node);
        let ready = ms
            .iter()
            .filter(|m| m["name"] == name)
            .flat_map(|m| m["workers"].as_array().cloned().unwrap_or_default())
            .filter(|w| w["state"] == "ready")
            .count();
        if ready >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready: {ms:?}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_state(node: &TestNode, state: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = node.request(r#"{"v":1,"cmd":"status"}"#);
        if s["result"]["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "node never {state}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn completion(node: &TestNode, body: Value) -> api::Reply {
    api::post(node.api_addr(), "/v1/completions", &body)
}

fn stream_text(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Data(v) => v["choices"][0]["text"]
                .as_str()
                .or_else(|| v["choices"][0]["delta"]["content"].as_str())
                .map(str::to_owned),
            Event::Done => None,
        })
        .collect()
}

#[test]
fn greedy_completions_through_the_sandbox_equal_direct_candle() {
    let m = make_model("tiny", &small(), 7);
    let node = node_with(&model_toml("tiny", &m, ""));
    wait_ready(&node, "tiny", 1);

    let direct = ccnode_worker::reference::Direct::load(&m.dir).unwrap();
    for prompt in ["hello", "The quick brown fox", "ünïcödé ✓"] {
        let want = direct.greedy(prompt, 24).unwrap();
        let r = completion(
            &node,
            json!({"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], "tiny");
        assert_eq!(
            v["choices"][0]["text"],
            want.text.as_str(),
            "prompt {prompt:?}"
        );
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64(),
            Some(want.prompt_tokens as u64)
        );
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(n >= want.tokens.len() as u64 && n <= 24, "{v}");

        // The same, streamed: the pieces add up to the same text.
        let mut s = Stream::open(
            node.api_addr(),
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true}),
        );
        assert_eq!(s.status, 200);
        let events = s.rest();
        assert_eq!(events.last(), Some(&Event::Done), "{events:?}");
        assert_eq!(stream_text(&events), want.text);
    }

    // Sampling: a seed makes it repeatable; the worker really samples.
    let sampled = |seed: u64| {
        completion(
            &node,
            json!({"model": "tiny", "prompt": "abc", "max_tokens": 16, "temperature": 1.5, "seed": seed}),
        )
        .json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(sampled(1), sampled(1));
    let distinct: std::collections::HashSet<String> = (1..6).map(sampled).collect();
    assert!(distinct.len() > 1, "sampling gave one text for 5 seeds");

    // A stop string cuts the text before it.
    let full = direct.greedy("hello", 24).unwrap().text;
    if let Some(stop) = full.get(4..6).filter(|s| !s.trim().is_empty()) {
        let r = completion(
            &node,
            json!({"model": "tiny", "prompt": "hello", "max_tokens": 24, "temperature": 0, "stop": [stop]}),
        )
        .json();
        let text = r["choices"][0]["text"].as_str().unwrap();
        assert!(!text.contains(stop), "{text:?} contains {stop:?}");
        assert!(full.starts_with(text), "{text:?} vs {full:?}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // Chat: the rendered prompt, completed.
    let r = api::post(
        node.api_addr(),
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let want = direct.greedy("<|user|>\nhi\n<|assistant|>\n", 8).unwrap();
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        want.text.as_str()
    );

    // /v1/models lists it.
    let v = api::get(node.api_addr(), "/v1/models").json();
    assert_eq!(v["data"][0]["id"], "tiny");

    assert!(metric(&node, "ccnode_model_loads_total{result=\"ok\"}") >= 1.0);
    // Every generation's first token, as the worker timed it: some of
    // the API's time to first token, never more.
    let n = metric(
        &node,
        "ccnode_inference_worker_first_token_seconds_count{model=\"tiny\"}",
    );
    let api_n = metric(
        &node,
        "ccnode_api_time_to_first_token_seconds_count{model=\"tiny\"}",
    );
    assert!(
        n >= 3.0 && n == api_n,
        "{n} worker vs {api_n} API first tokens"
    );
    let worker = metric(
        &node,
        "ccnode_inference_worker_first_token_seconds_sum{model=\"tiny\"}",
    );
    let api = metric(
        &node,
        "ccnode_api_time_to_first_token_seconds_sum{model=\"tiny\"}",
    );
    assert!(
        worker > 0.0 && worker < api,
        "worker {worker} s, API {api} s"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_queue_is_bounded() {
    let m = make_model("tiny", &small(), 3);
    let node = node_with(&model_toml("tiny", &m, "max_queue = 8\n"));
    wait_ready(&node, "tiny", 1);
    let addr = node.api_addr();

    let r = api::request(addr, "POST", "/v1/completions", b"{not json");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");

    let r = completion(&node, json!({"model": "nope", "prompt": "x"}));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    let big = format!(r#"{{"model":"tiny","prompt":"{}"}}"#, "a".repeat(2 << 20));
    let r = api::request(addr, "POST", "/v1/completions", big.as_bytes());
    assert_eq!(r.status, 413);

    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x", "max_tokens": 1_000_000}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "max_tokens_too_large");

    // Prompt plus max_tokens beyond the model's context: the worker says so.
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x".repeat(600), "max_tokens": 1000}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");

    // A prompt that grows sixfold when JSON-escaped still reaches the
    // worker (it does not fit the context); the worker goes on serving.
    let quotes = "\u{1}".repeat(150_000);
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": quotes, "max_tokens": 4}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");

    // 200 at once against one worker and a queue of 8: every answer is a
    // completion or a 429 with Retry-After, nothing else.
    let handles: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                api::post(
                    addr,
                    "/v1/completions",
                    &json!({"model": "tiny", "prompt": format!("n{i}"), "max_tokens": 24, "temperature": 0}),
                )
            })
        })
        .collect();
    let replies: Vec<api::Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        ok + busy.len(),
        200,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(ok >= 1 && !busy.is_empty(), "ok {ok}, 429 {}", busy.len());
    for r in busy {
        assert_eq!(r.json()["error"]["code"], "queue_full");
        assert!(r
            .header("retry-after")
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    }
    // Served afterwards as before.
    assert_eq!(
        completion(
            &node,
            json!({"model": "tiny", "prompt": "x", "max_tokens": 2})
        )
        .status,
        200
    );
}

#[test]
fn a_client_that_leaves_mid_stream_cancels_its_generation() {
    let m = make_model("slow", &slower(), 5);
    let node = node_with(&model_toml("slow", &m, ""));
    wait_ready(&node, "slow", 1);
    let mut s = Stream::open(
        node.api_addr(),
        "/v1/completions",
        &json!({"model": "slow", "prompt": "go", "max_tokens": 900, "temperature": 0, "stream": true}),
    );
    assert_eq!(s.status, 200);
    assert!(matches!(s.next_event(), Some(Event::Data(_))));
    drop(s);
    let series = "ccnode_inference_generations_total{finish=\"cancelled\",model=\"slow\"}";
    let deadline = Instant::now() + PATIENCE;
    while metric(&node, series) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "never cancelled:\n{}",
            node.http_get("/metrics").1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The worker is free: the next request is served.
    assert_eq!(
        completion(
            &node,
            json!({"model": "slow", "prompt": "x", "max_tokens": 2})
        )
        .status,
        200
    );
}

#[test]
fn drain_lets_a_stream_finish_and_refuses_new_requests() {
    let m = make_model("slow", &slower(), 5);
    let node = node_with(&model_toml("slow", &m, ""));
    wait_ready(&node, "slow", 1);
    let mut s = Stream::open(
        node.api_addr(),
        "/v1/completions",
        &json!({"model": "slow", "prompt": "go", "max_tokens": 900, "temperature": 0, "stream": true}),
    );
    assert!(matches!(s.next_event(), Some(Event::Data(_))));
    let r = node.request(r#"{"v":1,"cmd":"drain","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "draining", "{r}");
    let refused = completion(
        &node,
        json!({"model": "slow", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"]["code"], "node_draining");
    let rest = s.rest();
    assert_eq!(
        rest.last(),
        Some(&Event::Done),
        "the stream was cut: {rest:?}"
    );
    wait_state(&node, "drained");
    // Drained: the workers are stopped.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ms = models(&node);
        if ms[0]["workers"][0]["state"] == "exited" {
            break;
        }
        assert!(Instant::now() < deadline, "{ms:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Undrain: served again.
    let r = node.request(r#"{"v":1,"cmd":"undrain","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "active", "{r}");
    wait_ready(&node, "slow", 1);
    let r = completion(
        &node,
        json!({"model": "slow", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(
        r.status,
        200,
        "{} {:?}\n{}",
        r.body,
        models(&node),
        node.log()
    );
}

#[test]
fn quarantine_cuts_a_stream_off_and_kills_the_worker() {
    let m = make_model("slow", &slower(), 5);
    let node = node_with(&model_toml("slow", &m, ""));
    wait_ready(&node, "slow", 1);
    let pid = models(&node)[0]["workers"][0]["pid"].as_i64().unwrap();
    let mut s = Stream::open(
        node.api_addr(),
        "/v1/completions",
        &json!({"model": "slow", "prompt": "go", "max_tokens": 900, "temperature": 0, "stream": true}),
    );
    assert!(matches!(s.next_event(), Some(Event::Data(_))));
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "quarantined", "{r}");
    let rest = s.rest();
    assert!(
        !rest.contains(&Event::Done),
        "a quarantined stream ended normally"
    );
    let err = rest
        .iter()
        .find_map(|e| match e {
            Event::Data(v) if v.get("error").is_some() => Some(v.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error event: {rest:?}"));
    assert_eq!(err["error"]["code"], "node_quarantined");
    let deadline = Instant::now() + PATIENCE;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "worker {pid} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = completion(
        &node,
        json!({"model": "slow", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"]["code"], "node_quarantined");
}

#[test]
fn a_model_that_fails_verification_never_gets_a_worker() {
    let good = make_model("tiny", &small(), 9);
    let node = node_with("");
    // Tamper with a weight after signing.
    let weights = good.dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let entry = json!({
        "name": "tiny",
        "dir": good.dir,
        "signature": good.sig,
        "trust_policy": good.policy,
    });
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "model_load_failed");
    assert_eq!(r["error"]["detail"], "signature_invalid");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model.safetensors"),
        "{r}"
    );
    assert!(models(&node).is_empty());
    assert_eq!(
        metric(
            &node,
            "ccnode_model_loads_total{result=\"signature_invalid\"}"
        ),
        1.0
    );
    let r = completion(&node, json!({"model": "tiny", "prompt": "x"}));
    assert_eq!(r.status, 404);

    // Signed by a key the policy does not trust: refused the same way.
    let other = make_model("tiny", &small(), 10);
    let entry = json!({"name": "tiny", "dir": other.dir, "signature": other.sig, "trust_policy": good.policy});
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["error"]["detail"], "signature_invalid", "{r}");

    // A good model loads at run time, is served, and unloads.
    let entry = json!({"name": "tiny", "dir": other.dir, "signature": other.sig, "trust_policy": other.policy});
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["ok"], true, "{r}");
    wait_ready(&node, "tiny", 1);
    assert_eq!(
        completion(
            &node,
            json!({"model": "tiny", "prompt": "x", "max_tokens": 2})
        )
        .status,
        200
    );
    let r = node.request(r#"{"v":1,"cmd":"model_unload","name":"tiny"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        completion(&node, json!({"model": "tiny", "prompt": "x"})).status,
        404
    );
}

/// The virtual environment's Python (scripts/test.sh creates it).
fn venv_python() -> std::path::PathBuf {
    let venv = std::env::var("CCNODE_VENV")
        .unwrap_or_else(|_| format!("{}/../.venv", env!("CARGO_MANIFEST_DIR")));
    let python = Path::new(&venv).join("bin/python");
    assert!(
        python.is_file(),
        "no virtual environment at {venv}: run ./scripts/test.sh, which creates it"
    );
    python
}

#[test]
fn a_keyless_signed_model_is_served_only_to_the_identity_in_the_policy() {
    // A private Sigstore instance (Fulcio-shaped CAs, CT log, Rekor v1
    // and v2, a timestamp authority) signs a generated model keyless, as
    // model_signing does; ccnoded verifies it offline against that
    // instance's trust root.
    let python = venv_python();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../attest/tests/interop/sigstore_instance.py");
    let tmp = tempfile::tempdir().unwrap();
    let instance = tmp.path().join("instance");
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    ccnode_worker::testmodel::write_model(&dir, &small(), 21).unwrap();
    let sig = tmp.path().join("model.sig");
    let sig_v2 = tmp.path().join("model-v2.sig");
    let sign = |out: &Path, variant: &str| -> Vec<std::ffi::OsString> {
        vec![
            "sign".into(),
            instance.clone().into_os_string(),
            dir.clone().into_os_string(),
            out.into(),
            "--identity".into(),
            "alice@example.com".into(),
            "--issuer".into(),
            "https://issuer.test".into(),
            "--variant".into(),
            variant.into(),
        ]
    };
    for args in [
        vec!["instance".into(), instance.clone().into_os_string()],
        sign(&sig, "ok"),
        // Logged to Rekor v2 (Ed25519 checkpoint, the time from an RFC
        // 3161 timestamp).
        sign(&sig_v2, "v2"),
    ] {
        let out = Command::new(&python)
            .arg(&script)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let policy = |name: &str, identity: &str| {
        let p = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "[[signer]]\nmodels = [\"tiny\"]\nsigstore_trust_root = \"{}\"\n\
                 sigstore_identities = [{{ identity = \"{identity}\", issuer = \"https://issuer.test\" }}]\n",
                instance.join("trusted_root.json").display()
            ),
        )
        .unwrap();
        p
    };
    let node = node_with("");
    let load_with = |policy: &Path, sig: &Path| {
        let entry = json!({"name": "tiny", "dir": dir, "signature": sig, "trust_policy": policy});
        node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string())
    };
    let load = |policy: &Path| load_with(policy, &sig);

    // Another identity of the same issuer: refused, no worker.
    let r = load(&policy("bob", "bob@example.com"));
    assert_eq!(r["error"]["detail"], "signature_invalid", "{r}");
    assert!(models(&node).is_empty());

    // The signer's identity: served.
    let r = load(&policy("alice", "alice@example.com"));
    assert_eq!(r["ok"], true, "{r}");
    wait_ready(&node, "tiny", 1);
    let listed = models(&node);
    assert!(
        listed[0]["signer"]
            .as_str()
            .is_some_and(|s| s.contains("alice@example.com")),
        "{listed:?}"
    );
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);

    // The same model signed through Rekor v2: refused for bob, served for
    // alice, the signer naming the v2 log and the timestamp.
    let r = node.request(r#"{"v":1,"cmd":"model_unload","name":"tiny"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let r = load_with(&policy("bob", "bob@example.com"), &sig_v2);
    assert_eq!(r["error"]["detail"], "signature_invalid", "{r}");
    let r = load_with(&policy("alice", "alice@example.com"), &sig_v2);
    assert_eq!(r["ok"], true, "{r}");
    wait_ready(&node, "tiny", 1);
    let signer = models(&node)[0]["signer"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        signer.contains("https://rekor2.test") && signer.contains("timestamped"),
        "{signer}"
    );
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn the_openai_python_client_lists_completes_and_streams() {
    let python = venv_python();
    let m = make_model("tiny", &small(), 11);
    let node = node_with(&model_toml("tiny", &m, ""));
    wait_ready(&node, "tiny", 1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://{}/v1", node.api_addr()))
        .arg("tiny")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let direct = ccnode_worker::reference::Direct::load(&m.dir).unwrap();
    assert_eq!(v["models"], json!(["tiny"]));
    assert_eq!(v["completion"]["object"], "text_completion");
    assert_eq!(
        v["completion"]["text"],
        direct.greedy("hello", 8).unwrap().text.as_str()
    );
    let chat_want = direct
        .greedy("<|user|>\nhi there\n<|assistant|>\n", 8)
        .unwrap()
        .text;
    assert_eq!(v["chat_stream"]["text"], chat_want.as_str(), "{v}");
    assert_eq!(v["chat"]["text"], chat_want.as_str());
    assert_eq!(v["chat"]["role"], "assistant");
    assert!(
        v["chat_stream"]["completion_tokens"].as_u64().is_some(),
        "{v}"
    );
    assert_eq!(v["unknown_model"], 404);
}

#[test]
fn a_configured_device_that_does_not_exist_is_a_config_error_naming_it() {
    let m = make_model("tiny", &small(), 1);
    let worker = api::workspace_bin("ccnode-worker");
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/gpus.dev.sim.toml");
    let mut node = TestNode::new(CCNODED)
        .with_gpu(&format!(
            "backend = \"sim\"\nsim_file = \"{}\"",
            sim.display()
        ))
        .with_toml(&format!(
            "[inference]\nworker_binary = \"{}\"\n\n{}",
            worker.display(),
            model_toml(
                "tiny",
                &m,
                "gpus = [\"MIG-00000000-0000-0000-0000-000000000000\"]"
            )
        ));
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("MIG-00000000-0000-0000-0000-000000000000"),
        "{log}"
    );
}

#[test]
fn ccnodectl_loads_lists_and_unloads_models() {
    let ctl = env!("CARGO_BIN_EXE_ccnodectl");
    let node = node_with("");
    let m = make_model("tiny", &small(), 12);
    let run = |args: &[&str]| {
        let out = Command::new(ctl)
            .arg("--socket")
            .arg(node.socket())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = m.dir.to_str().unwrap();
    let sig = m.sig.to_str().unwrap();
    let policy = m.policy.to_str().unwrap();
    // Another model's name: the policy trusts the key for "tiny" only.
    let (code, _, err) = run(&[
        "model",
        "load",
        "--name",
        "other",
        "--dir",
        dir,
        "--signature",
        sig,
        "--trust-policy",
        policy,
    ]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("signature_invalid"), "{err}");
    let (code, out, err) = run(&[
        "model",
        "load",
        "--name",
        "tiny",
        "--dir",
        dir,
        "--signature",
        sig,
        "--trust-policy",
        policy,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_ready(&node, "tiny", 1);
    let (code, out, _) = run(&["model", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("tiny") && out.contains("ready on cpu"),
        "{out}"
    );
    let (code, _, err) = run(&[
        "model",
        "load",
        "--name",
        "tiny",
        "--dir",
        dir,
        "--signature",
        sig,
        "--trust-policy",
        policy,
    ]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("model_exists"), "{err}");
    let (code, _, _) = run(&["model", "unload", "tiny"]);
    assert_eq!(code, Some(0));
    let (code, _, err) = run(&["model", "unload", "tiny"]);
    assert_eq!(code, Some(5));
    assert!(err.contains("model_not_loaded"), "{err}");
    let (_, out, _) = run(&["model", "list"]);
    assert!(out.contains("no models loaded"), "{out}");
}

#[test]
fn a_served_model_is_measured_and_in_the_attestation_claims() {
    use ccnode_attest::{verify, Evidence, VerifierPolicy};
    let tpm = ccnode_testkit::swtpm::Swtpm::start();
    let m = make_model("tiny", &small(), 13);
    let worker = api::workspace_bin("ccnode-worker");
    let node = TestNode::new(CCNODED)
        .with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\ntee = \"simulated\"\nfirmware_log = \"\"",
            tpm.tcti()
        ))
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\n\n[inference]\nworker_binary = \"{}\"\n\n{}",
            worker.display(),
            model_toml("tiny", &m, "")
        ))
        .start();
    wait_ready(&node, "tiny", 1);
    let digest = format!(
        "sha256:{}",
        models(&node)[0]["manifest_digest"].as_str().unwrap()
    );
    let nonce = [7u8; 32];
    let bytes =
        ccnode_attest::client::fetch_evidence(&node.attestation_url(), &nonce, PATIENCE).unwrap();
    let e = Evidence::from_json(&bytes).unwrap();
    assert_eq!(e.claims.models.len(), 1);
    assert_eq!(e.claims.models[0].name, "tiny");
    assert_eq!(e.claims.models[0].digest, digest);
    // Measured into the ccnode PCR before the worker got the bytes.
    let load = e
        .tpm
        .ccnode_event_log
        .events
        .iter()
        .find(|ev| ev.event_type == "model_load")
        .expect("a model_load event");
    assert_eq!(load.data["digest"], digest.as_str());
    assert_eq!(load.data["name"], "tiny");

    let key = ccnode_attest::tpm::key::AkPublicKey::from_pem(&e.tpm.ak.public_pem).unwrap();
    let ak = hex::encode(key.spki_sha256().unwrap());
    let policy = |allowed: &str| {
        VerifierPolicy::from_toml(&format!(
            "allowed_aks = [\"{ak}\"]\nallow_simulated_tee = true\nallowed_models = [\"{allowed}\"]\n"
        ))
        .unwrap()
    };
    let now = std::time::SystemTime::now();
    assert!(verify(&e, &nonce, &policy(&digest), now).passed());
    assert_eq!(
        verify(&e, &nonce, &policy("sha256:00"), now).failed(),
        ["policy_models"]
    );
}

#[test]
fn a_worker_killed_by_seccomp_is_counted_audited_and_quarantines_when_told() {
    // Debug builds of ccnode-worker make a forbidden system call after
    // `ready` when CCNODE_WORKER_TEST_FAULT=seccomp reaches them.
    let m = make_model("tiny", &small(), 14);
    let worker = api::workspace_bin("ccnode-worker");
    let node = TestNode::new(CCNODED)
        .with_env("CCNODE_WORKER_TEST_FAULT", "seccomp")
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\nenv_allow = [\"CCNODE_WORKER_TEST_FAULT\"]\n\n\
             [inference]\nworker_binary = \"{}\"\nquarantine_on_seccomp_violation = true\n\n{}",
            worker.display(),
            model_toml("tiny", &m, "")
        ))
        .start();
    wait_state(&node, "quarantined");
    assert!(metric(&node, "ccnode_worker_seccomp_violations_total") >= 1.0);
    assert!(
        metric(
            &node,
            "ccnode_worker_exits_total{reason=\"seccomp_violation\"}"
        ) >= 1.0
    );
    let audit = node.request(r#"{"v":1,"cmd":"audit","limit":50}"#);
    let records = audit["result"]["records"].as_array().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["command"] == "worker_exit" && r["result"] == "seccomp_violation"),
        "{audit}"
    );
    let s = node.request(r#"{"v":1,"cmd":"status"}"#);
    assert!(
        s["result"]["reason"].as_str().unwrap().contains("SIGSYS"),
        "{s}"
    );
}

#[test]
fn a_node_that_starts_drained_loads_its_models_when_it_becomes_active() {
    let m = make_model("tiny", &small(), 15);
    let mut node = node_with(&model_toml("tiny", &m, ""));
    wait_ready(&node, "tiny", 1);
    node.request(r#"{"v":1,"cmd":"drain","reason":"test"}"#);
    wait_state(&node, "drained");
    node.restart();
    wait_state(&node, "drained");
    assert!(models(&node).is_empty(), "{:?}", models(&node));
    node.request(r#"{"v":1,"cmd":"undrain","reason":"test"}"#);
    wait_ready(&node, "tiny", 1);
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A configured model an admin unloaded stays unloaded across a drain,
/// also after a `model_load` of it that failed.
#[test]
fn a_failed_load_of_an_unloaded_configured_model_keeps_it_unloaded() {
    let m = make_model("tiny", &small(), 16);
    // `late` never loads: each pass that loads configured models tries it
    // after `tiny` and audits its failure, which marks the pass's end.
    let late = format!(
        "[[inference.models]]\nname = \"late\"\ndir = \"{}\"\nsignature = \"/nonexistent/model.sig\"\ntrust_policy = \"{}\"\n",
        m.dir.display(),
        m.policy.display()
    );
    let node = node_with(&format!("{}{late}", model_toml("tiny", &m, "")));
    wait_ready(&node, "tiny", 1);
    let late_failures = || {
        let audit = node.request(r#"{"v":1,"cmd":"audit","limit":1000}"#);
        audit["result"]["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["command"] == "model_load"
                    && r["result"] != "ok"
                    && r["reason"].as_str().unwrap_or("").contains("late")
            })
            .count()
    };
    let r = node.request(r#"{"v":1,"cmd":"model_unload","name":"tiny"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let entry = json!({"name": "tiny", "dir": m.dir, "signature": "/nonexistent/model.sig", "trust_policy": m.policy});
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["error"]["code"], "model_load_failed", "{r}");
    let before = late_failures();
    assert!(before >= 1, "late failed at start");
    node.request(r#"{"v":1,"cmd":"drain","reason":"test"}"#);
    wait_state(&node, "drained");
    node.request(r#"{"v":1,"cmd":"undrain","reason":"test"}"#);
    let deadline = Instant::now() + PATIENCE;
    while late_failures() == before {
        assert!(Instant::now() < deadline, "no reload pass\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        models(&node).iter().all(|m| m["name"] != "tiny"),
        "{:?}",
        models(&node)
    );
}

/// ccnoded with `models_toml`, whose loads stop after verification while
/// `pause` holds a fifo for them (`CCNODE_TEST_PAUSE_DIR`, debug builds).
fn pausable_node(pause: &Path, models_toml: &str) -> TestNode {
    let worker = api::workspace_bin("ccnode-worker");
    TestNode::new(CCNODED)
        .with_env("CCNODE_TEST_PAUSE_DIR", pause.to_str().unwrap())
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\n\n[inference]\nworker_binary = \"{}\"\n\n{models_toml}",
            worker.display()
        ))
        .start()
}

/// The pause point of `model`'s loads, after its verification.
struct Pause(std::path::PathBuf);

impl Pause {
    fn new(dir: &Path, model: &str) -> Pause {
        let fifo = dir.join(format!("model-verified-{model}"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        Pause(fifo)
    }

    /// Returns once a load is at the pause point (the fifo has a reader);
    /// the load goes on when the returned file is dropped.
    fn wait(&self, node: &TestNode) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        let deadline = Instant::now() + PATIENCE * 4;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0)
            {
                Ok(f) => return f,
                // No reader yet.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => panic!("{}: {e}", self.0.display()),
            }
            assert!(
                Instant::now() < deadline,
                "no load reached {}:\n{}",
                self.0.display(),
                node.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `model_load` for `m` as `name` on a thread of its own (the reply
/// comes when the load is done).
fn load_in_background(node: &TestNode, name: &str, m: &Model) -> std::thread::JoinHandle<Value> {
    let entry = json!({"name": name, "dir": m.dir, "signature": m.sig, "trust_policy": m.policy});
    let line = json!({"v": 1, "cmd": "model_load", "model": entry}).to_string();
    let mut s = node.connect();
    std::thread::spawn(move || ccnode_testkit::send_line(&mut s, &line))
}

/// The processes whose parent is `pid` (ccnoded's are its workers' jails).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1))
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the pause point exists in debug builds only"
)]
fn a_quarantine_while_a_model_loads_leaves_no_worker_and_the_model_unserved() {
    let pause_dir = tempfile::tempdir().unwrap();
    let m = make_model("tiny", &small(), 22);
    let node = pausable_node(pause_dir.path(), "");
    let pause = Pause::new(pause_dir.path(), "tiny");

    // Quarantined while the model is verified: the load refuses itself
    // before any worker is ready, and the model is never served.
    let load = load_in_background(&node, "tiny", &m);
    let held = pause.wait(&node);
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "quarantined", "{r}");
    drop(held);
    let r = load.join().unwrap();
    assert_eq!(r["error"]["detail"], "node_not_active", "{r}");
    assert!(models(&node).is_empty(), "{:?}", models(&node));
    assert!(
        children(node.pid()).is_empty(),
        "a worker outlived the refused load:\n{}",
        node.log()
    );
    let r = node.request(r#"{"v":1,"cmd":"release","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "active", "{r}");

    // Quarantined and released again before the load goes on: the node
    // is active, but this load began before the quarantine.
    let load = load_in_background(&node, "tiny", &m);
    let held = pause.wait(&node);
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "quarantined", "{r}");
    let r = node.request(r#"{"v":1,"cmd":"release","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "active", "{r}");
    drop(held);
    let r = load.join().unwrap();
    assert_eq!(r["error"]["detail"], "node_not_active", "{r}");
    assert!(models(&node).is_empty(), "{:?}", models(&node));
    assert!(children(node.pid()).is_empty(), "{}", node.log());

    // Nothing in between: the load goes through and the model is served.
    let load = load_in_background(&node, "tiny", &m);
    drop(pause.wait(&node));
    let r = load.join().unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_ready(&node, "tiny", 1);
    assert!(!children(node.pid()).is_empty());
}

/// Waits until every worker (of model `name`, or of all models) has
/// exited; `what` says what was to end them.
fn wait_all_exited(node: &TestNode, name: Option<&str>, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ms = models(node);
        let alive = ms
            .iter()
            .filter(|m| name.is_none_or(|n| m["name"] == n))
            .flat_map(|m| m["workers"].as_array().cloned().unwrap_or_default())
            .any(|w| w["state"] != "exited");
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {ms:?}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `name` is listed, and every worker of it has exited.
fn assert_listed_with_no_worker(node: &TestNode, name: &str, when: &str) {
    let ms = models(node);
    let m = ms
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed {when}: {ms:?}"));
    assert!(
        m["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "exited"),
        "{when}: {m}"
    );
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the pause point exists in debug builds only"
)]
fn a_quarantine_during_the_reloads_after_an_undrain_is_applied_at_once() {
    let pause_dir = tempfile::tempdir().unwrap();
    let a = make_model("a", &small(), 23);
    let b = make_model("b", &small(), 24);
    let node = pausable_node(
        pause_dir.path(),
        &format!("{}{}", model_toml("a", &a, ""), model_toml("b", &b, "")),
    );
    wait_ready(&node, "a", 1);
    wait_ready(&node, "b", 1);
    let r = node.request(r#"{"v":1,"cmd":"drain","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "drained", "{r}");
    wait_all_exited(&node, None, "the drain");
    // The reloads after the undrain go by name: `a`, then `b`, held
    // after its verification.
    let pause = Pause::new(pause_dir.path(), "b");
    let r = node.request(r#"{"v":1,"cmd":"undrain","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "active", "{r}");
    let held = pause.wait(&node);
    wait_ready(&node, "a", 1);
    // Verified again, `b` is still listed (its requests get 503
    // model_not_ready, not 404), its workers not yet started.
    assert_listed_with_no_worker(&node, "b", "while it reloads");

    // While `b` is still loading, the quarantine reaches `a`'s worker.
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "quarantined", "{r}");
    wait_all_exited(&node, Some("a"), "the quarantine waits for the reloads");

    // `b`'s load then refuses itself: never served, no worker.
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let audit = node.request(r#"{"v":1,"cmd":"audit","limit":100}"#);
        let refused = audit["result"]["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["command"] == "model_load" && r["result"] == "node_not_active");
        if refused {
            break;
        }
        assert!(Instant::now() < deadline, "{audit}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // `b` stays listed, its workers stopped, for the next time the node is
    // active; none of them runs.
    assert_listed_with_no_worker(&node, "b", "after its refused reload");
    assert!(children(node.pid()).is_empty(), "{}", node.log());
}

#[test]
fn each_worker_gets_its_own_mig_device_and_no_device_is_shared() {
    let gpus = ccnode_testkit::SimGpus::new();
    let sim = ccnode_gpu::sim::SimBackend::open(&gpus.sim).unwrap();
    let inv = ccnode_gpu::GpuBackend::inventory(&sim).unwrap();
    let migs: Vec<String> = inv.gpus[1]
        .mig_devices
        .iter()
        .map(|m| m.uuid.clone())
        .collect();
    let m = make_model("tiny", &small(), 16);
    let worker = api::workspace_bin("ccnode-worker");
    let node = TestNode::new(CCNODED)
        .with_gpu(&gpus.gpu_toml())
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\n\n[api]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\n\
             [inference]\nworker_binary = \"{}\"\n\n{}",
            worker.display(),
            model_toml(
                "tiny",
                &m,
                &format!("replicas = 2\ngpus = [\"{}\", \"{}\"]", migs[0], migs[2])
            )
        ))
        .start();
    wait_ready(&node, "tiny", 2);
    let g = node.request(r#"{"v":1,"cmd":"gpus"}"#);
    let held: Vec<(String, u64)> = g["result"]["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["model"], "tiny");
            (
                a["device"].as_str().unwrap().to_owned(),
                a["worker"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(held, [(migs[0].clone(), 0), (migs[2].clone(), 1)], "{g}");
    assert_eq!(
        completion(
            &node,
            json!({"model": "tiny", "prompt": "x", "max_tokens": 2})
        )
        .status,
        200
    );

    // A second model on a device a worker holds: refused, nothing started.
    let other = make_model("other", &small(), 17);
    let entry = json!({
        "name": "other", "dir": other.dir, "signature": other.sig,
        "trust_policy": other.policy, "gpus": [migs[2]],
    });
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["error"]["detail"], "device_taken", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains(&migs[2]),
        "{r}"
    );
    assert_eq!(models(&node).len(), 1);
    // A free one: fine.
    let entry = json!({
        "name": "other", "dir": other.dir, "signature": other.sig,
        "trust_policy": other.policy, "gpus": [migs[1]],
    });
    let r = node.request(&json!({"v": 1, "cmd": "model_load", "model": entry}).to_string());
    assert_eq!(r["ok"], true, "{r}");
    wait_ready(&node, "other", 1);
}

/// ccnoded with `ccnode-test-worker` in `mode` as a model's worker.
fn misbehaving(mode: &str) -> (TestNode, Model) {
    let m = make_model("tiny", &small(), 18);
    let worker = api::workspace_bin("ccnode-test-worker");
    let node = TestNode::new(CCNODED)
        .with_env("CCNODE_TEST_WORKER_MODE", mode)
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\nenv_allow = [\"CCNODE_TEST_WORKER_MODE\"]\n\n\
             [inference]\nworker_binary = \"{}\"\nload_timeout = \"2s\"\n\n{}",
            worker.display(),
            model_toml("tiny", &m, "")
        ))
        .start();
    (node, m)
}

#[test]
fn misbehaving_workers_are_ended_for_it_while_ccnoded_keeps_answering() {
    for (mode, reason) in [
        ("flood", "control_flood"),
        // `ready` again and again: not asked for, so counted like noise.
        ("flood-ready", "control_flood"),
        ("oversize", "protocol_violation"),
        ("malformed", "protocol_violation"),
        ("silent", "ready_timeout"),
    ] {
        let (node, _m) = misbehaving(mode);
        let series = format!("ccnode_worker_exits_total{{reason=\"{reason}\"}}");
        let deadline = Instant::now() + PATIENCE * 2;
        // While the worker misbehaves, the admin socket and /metrics answer
        // every time (each call has its own timeout; none may fail).
        loop {
            let s = node.request(r#"{"v":1,"cmd":"status"}"#);
            assert_eq!(s["ok"], true, "{mode}: {s}");
            let (code, _) = node.http_get("/metrics");
            assert_eq!(code, 200, "{mode}");
            if metric(&node, &series) >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: no {reason} exit:\n{}\n{}",
                node.http_get("/metrics").1,
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Audited too (written just after the count).
        let deadline = Instant::now() + PATIENCE;
        loop {
            let audit = node.request(r#"{"v":1,"cmd":"audit","limit":100}"#);
            let found = audit["result"]["records"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["command"] == "worker_exit" && r["result"] == reason);
            if found {
                break;
            }
            assert!(Instant::now() < deadline, "{mode}: {audit}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A drain stops workers gracefully, giving each its grace (30 s) to
/// finish; a quarantine that comes meanwhile kills them at once instead of
/// waiting behind that stop.
#[test]
fn a_quarantine_during_a_drains_graceful_stop_kills_at_once() {
    let (node, _m) = misbehaving("ignore-shutdown");
    wait_ready(&node, "tiny", 1);
    let r = node.request(r#"{"v":1,"cmd":"drain","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "drained", "{r}");
    // The worker ignores the shutdown: its stop waits out the grace.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ms = models(&node);
        let stopping = ms
            .iter()
            .flat_map(|m| m["workers"].as_array().cloned().unwrap_or_default())
            .any(|w| w["state"] == "stopping");
        if stopping {
            break;
        }
        assert!(Instant::now() < deadline, "{ms:?}\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"test"}"#);
    assert_eq!(r["result"]["to"], "quarantined", "{r}");
    let killed = "ccnode_worker_exits_total{reason=\"killed\"}";
    let stopped = "ccnode_worker_exits_total{reason=\"stopped\"}";
    let deadline = Instant::now() + PATIENCE * 2;
    while metric(&node, killed) < 1.0 {
        assert!(
            metric(&node, stopped) == 0.0 && Instant::now() < deadline,
            "the quarantine waited for the drain's stop:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&node, stopped), 0.0);
    wait_all_exited(&node, None, "the quarantine");
}

/// `sandbox.cgroup_delegated`: ccnoded started in a cgroup v2 group of its
/// own (as systemd starts a unit with `Delegate=yes`) moves itself into
/// `<group>/ccnoded`, gives each worker a group under `<group>/workers`
/// carrying its device program (and the limits, where the host offers the
/// memory and pids controllers), serves, and leaves no worker group
/// behind.
#[test]
fn a_delegated_cgroup_holds_ccnoded_in_a_leaf_and_its_workers_beneath() {
    let Some(group) = ccnode_testkit::scratch_cgroup2("delegated") else {
        return;
    };
    let m = make_model("tiny", &small(), 21);
    let worker = api::workspace_bin("ccnode-worker");
    let mut node = TestNode::new(CCNODED)
        .in_cgroup(&group)
        .with_toml(&format!(
            "[sandbox]\nworker_user = \"nobody\"\ncgroup_delegated = true\npids_max = 77\n\n\
             [api]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\n\
             [inference]\nworker_binary = \"{}\"\n\n{}",
            worker.display(),
            model_toml("tiny", &m, "")
        ))
        .start();
    let procs = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let pid = node.pid().to_string();
    assert!(procs(&group).is_empty(), "ccnoded left its group");
    wait_ready(&node, "tiny", 1);
    // ccnoded and its jails (its children, which place each worker).
    let leaf = procs(&group.join("ccnoded"));
    assert!(leaf.contains(&pid), "{leaf:?}\n{}", node.log());
    for p in leaf.iter().filter(|p| **p != pid) {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').nth(1));
        assert_eq!(
            ppid,
            Some(Some(pid.as_str())),
            "{p} in ccnoded's leaf: {stat}"
        );
    }
    let workers = group.join("workers");
    let held: Vec<std::path::PathBuf> = std::fs::read_dir(&workers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(held.len(), 1, "one worker, one group: {held:?}");
    assert!(
        !procs(&held[0]).is_empty(),
        "the worker is not in its group"
    );
    let r = completion(
        &node,
        json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        metric(&node, "ccnode_sandbox_support{feature=\"device_cgroup\"}"),
        1.0,
        "{}",
        node.log()
    );
    let offered = std::fs::read_to_string(group.join("cgroup.controllers")).unwrap();
    let has = |c: &str| offered.split_whitespace().any(|o| o == c);
    let limits = metric(&node, "ccnode_sandbox_support{feature=\"cgroup_limits\"}");
    if has("memory") && has("pids") {
        assert_eq!(limits, 1.0, "{}", node.log());
        let max = std::fs::read_to_string(held[0].join("pids.max")).unwrap();
        assert_eq!(max.trim(), "77");
    } else {
        // This host's v2 hierarchy lacks them (hybrid): said, not faked.
        assert_eq!(limits, 0.0);
        assert!(
            node.log().contains("controller is not available in"),
            "{}",
            node.log()
        );
    }
    node.stop();
    let left: Vec<_> = std::fs::read_dir(&workers)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    for dir in [workers, group.join("ccnoded"), group.clone()] {
        ccnode_testkit::remove_cgroup(&dir);
    }
    assert!(left.is_empty(), "worker groups left behind: {left:?}");
}

#[test]
fn a_delegation_that_is_not_there_is_refused_at_start() {
    // A group that another process shares: not ccnoded's alone.
    let Some(group) = ccnode_testkit::scratch_cgroup2("shared") else {
        return;
    };
    let mut other = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(group.join("cgroup.procs"), other.id().to_string()).unwrap();
    let mut node = TestNode::new(CCNODED)
        .in_cgroup(&group)
        .with_toml("[sandbox]\ncgroup_delegated = true\n");
    let err = node.spawn().expect_err("ccnoded must not start");
    other.kill().unwrap();
    other.wait().unwrap();
    for dir in [group.join("workers"), group.join("ccnoded")] {
        if dir.exists() {
            ccnode_testkit::remove_cgroup(&dir);
        }
    }
    ccnode_testkit::remove_cgroup(&group);
    assert!(err.contains("exit status: 78"), "{err}");
    assert!(
        err.contains("sandbox.cgroup_delegated") && err.contains("other than ccnoded"),
        "{err}"
    );
}
