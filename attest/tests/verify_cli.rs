//! `ccnode-verify evidence` and `ccnode-verify attest` as a verifier runs
//! them: exit codes, the table, `--json`; `attest` against a small HTTP
//! server that answers with evidence from a real (swtpm) attester for the
//! nonce it was sent.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use base64::Engine as _;
use ccnode_attest::eventlog::ccnode::event_type;
use ccnode_attest::evidence::Claims;
use ccnode_attest::tee::{SimulatedTee, Tee};
use ccnode_attest::tpm::{TpmConfig, TpmService};
use ccnode_attest::Attester;
use ccnode_testkit::swtpm::Swtpm;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ccnode-verify");

fn claims() -> Claims {
    Claims {
        node_id: "cli-node".into(),
        agent_version: "0.1.0".into(),
        config_digest: "sha256:00".into(),
        policy_digest: "sha256:11".into(),
        node_state: "active".into(),
        node_state_reason: None,
        gpu: None,
        drift: None,
        models: vec![],
        vram_scrub: None,
        tls_spki_sha256: None,
        tee_kind: String::new(),
    }
}

fn attester(tpm: &Swtpm, state: &Path) -> Arc<Attester> {
    let mut c = TpmConfig::new(state.join("log.json"));
    c.tcti = tpm.tcti().parse().unwrap();
    c.firmware_log = None;
    let svc = TpmService::open(c).unwrap();
    svc.measure(event_type::AGENT_START, json!({"version": "0.1.0"}))
        .unwrap();
    Arc::new(Attester::new(
        Arc::new(svc),
        Tee::Simulated(SimulatedTee::new([1; 32])),
    ))
}

fn write_policy(dir: &Path, ak: &[u8; 32], simulated: bool) -> std::path::PathBuf {
    let p = dir.join(format!("verifier-{simulated}.toml"));
    std::fs::write(
        &p,
        format!(
            "allowed_aks = [\"{}\"]\nallow_simulated_tee = {simulated}\n",
            hex::encode(ak)
        ),
    )
    .unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[test]
fn evidence_subcommand_exit_codes_and_output() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let a = attester(&tpm, dir.path());
    let nonce = [0x21u8; 32];
    let ev = a.attest(&nonce, claims()).unwrap();
    let file = dir.path().join("evidence.json");
    std::fs::write(&file, ev.to_json()).unwrap();
    let ak = a.tpm().ak().spki_sha256;
    let good = write_policy(dir.path(), &ak, true);
    let strict = write_policy(dir.path(), &ak, false);
    let f = file.to_str().unwrap();
    let hexnonce = hex::encode(nonce);

    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        &hexnonce,
        "--policy",
        good.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 0, "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("ak_signature") && out.contains("verdict: pass"),
        "{out}"
    );

    // --json: the attestation result.
    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        &hexnonce,
        "--policy",
        good.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code(&o), 0);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "pass");
    assert_eq!(v["claims"]["node_id"], "cli-node");
    assert!(v["checks"].as_array().unwrap().len() >= 15);

    // Another nonce: exit 1, qualifying_data named.
    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        &"22".repeat(32),
        "--policy",
        good.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code(&o), 1);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "fail");
    let failed: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["qualifying_data", "tee"]);

    // Simulated TEE without the flag: exit 1, tee named in the table.
    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        &hexnonce,
        "--policy",
        strict.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("tee") && l.contains("FAIL")),
        "{out}"
    );

    // Unusable inputs: exit 4.
    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        "zz",
        "--policy",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 4);
    let o = run(&[
        "evidence",
        "--file",
        "/nonexistent",
        "--nonce",
        &hexnonce,
        "--policy",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 4);
    let bad_policy = dir.path().join("bad.toml");
    std::fs::write(&bad_policy, "allowed_aks = []\nallow_everything = true\n").unwrap();
    let o = run(&[
        "evidence",
        "--file",
        f,
        "--nonce",
        &hexnonce,
        "--policy",
        bad_policy.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code(&o), 4);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"], "policy");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, b"{\"version\": 1}").unwrap();
    let o = run(&[
        "evidence",
        "--file",
        garbage.to_str().unwrap(),
        "--nonce",
        &hexnonce,
        "--policy",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 4);
    // Usage error: exit 2.
    assert_eq!(code(&run(&["evidence", "--file", f])), 2);
}

/// Serves `responses` connections: reads one request, hands its body to
/// `answer`, writes what it returns.
fn serve<F>(responses: usize, answer: F) -> (String, std::thread::JoinHandle<()>)
where
    F: Fn(&[u8]) -> Vec<u8> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/attestation", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        for _ in 0..responses {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                }
                if n == 0 {
                    break Vec::new();
                }
            };
            let _ = s.write_all(&answer(&body));
        }
    });
    (url, h)
}

#[test]
fn attest_subcommand_fetches_fresh_evidence() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let a = attester(&tpm, dir.path());
    let policy = write_policy(dir.path(), &a.tpm().ak().spki_sha256, true);
    let p = policy.to_str().unwrap().to_string();

    // An honest node: evidence for the nonce it was sent.
    let honest = a.clone();
    let (url, h) = serve(1, move |body| {
        let req: Value = serde_json::from_slice(body).unwrap();
        let nonce = base64::engine::general_purpose::STANDARD
            .decode(req["nonce"].as_str().unwrap())
            .unwrap();
        assert_eq!(nonce.len(), 32);
        let ev = honest.attest(&nonce, claims()).unwrap().to_json();
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            ev.len()
        )
        .into_bytes();
        r.extend_from_slice(&ev);
        r
    });
    let saved = dir.path().join("saved.json");
    let o = run(&[
        "attest",
        "--url",
        &url,
        "--policy",
        &p,
        "--save",
        saved.to_str().unwrap(),
    ]);
    h.join().unwrap();
    assert_eq!(
        code(&o),
        0,
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(saved.exists());

    // A replaying node: old evidence, whatever the nonce.
    let old = a.attest(&[9; 32], claims()).unwrap().to_json();
    let (url, h) = serve(1, move |_| {
        let mut r =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", old.len()).into_bytes();
        r.extend_from_slice(&old);
        r
    });
    let o = run(&["attest", "--url", &url, "--policy", &p, "--json"]);
    h.join().unwrap();
    assert_eq!(code(&o), 1);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let qd = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qualifying_data")
        .unwrap();
    assert_eq!(qd["status"], "fail");

    // A node answering with an error, and one sending too much: exit 5.
    let (url, h) = serve(1, |_| {
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 19\r\n\r\n{\"code\":\"too_many\"}".to_vec()
    });
    let o = run(&["attest", "--url", &url, "--policy", &p]);
    h.join().unwrap();
    assert_eq!(code(&o), 5, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("429"));
    let (url, h) = serve(1, |_| {
        let mut r = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        r.resize(ccnode_attest::client::MAX_RESPONSE + 4096, b' ');
        r
    });
    let o = run(&["attest", "--url", &url, "--policy", &p]);
    h.join().unwrap();
    assert_eq!(code(&o), 5);
    assert!(String::from_utf8_lossy(&o.stderr).contains("exceeds"));
    // Nobody listening.
    let o = run(&[
        "attest",
        "--url",
        "http://127.0.0.1:1/v1/attestation",
        "--policy",
        &p,
    ]);
    assert_eq!(code(&o), 5);
    // https is not supported: a usage-level input error.
    let o = run(&["attest", "--url", "https://127.0.0.1:1/", "--policy", &p]);
    assert_eq!(code(&o), 5);
}
