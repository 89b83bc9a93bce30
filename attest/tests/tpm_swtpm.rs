//! The TPM half of attestation against a real TPM 2.0 emulator (swtpm,
//! started per test by the testkit): the attestation key's life cycle,
//! quote → evidence → verification, an independent check of the same quote
//! with tpm2-tools' `tpm2_checkquote`, and the negative cases, each failing
//! on its named check.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use ccnode_attest::eventlog::ccnode::{event_type, LogStatus};
use ccnode_attest::eventlog::firmware;
use ccnode_attest::evidence::{Claims, Evidence, ModelClaim};
use ccnode_attest::tee::{SimulatedTee, Tee};
use ccnode_attest::tpm::{AkAlgorithm, PcrSelection, TpmConfig, TpmError, TpmService};
use ccnode_attest::verify::{verify, AttestationResult, Status, VerifierPolicy};
use ccnode_attest::{AttestError, Attester, GpuAttestation};
use ccnode_testkit::swtpm::Swtpm;
use ccnode_testkit::tool;
use serde_json::json;
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn config(tpm: &Swtpm, alg: AkAlgorithm, state: &Path) -> TpmConfig {
    let mut c = TpmConfig::new(state.join("ccnode-event-log.json"));
    c.tcti = tpm.tcti().parse().unwrap();
    c.ak_algorithm = alg;
    c.firmware_log = None;
    c
}

fn claims() -> Claims {
    Claims {
        node_id: "node-a".into(),
        agent_version: "0.1.0".into(),
        config_digest: format!("sha256:{}", "aa".repeat(32)),
        policy_digest: format!("sha256:{}", "bb".repeat(32)),
        node_state: "active".into(),
        node_state_reason: None,
        gpu: Some(gpu_claims("off")),
        drift: None,
        models: vec![ModelClaim {
            name: "tiny".into(),
            digest: format!("sha256:{}", "cc".repeat(32)),
        }],
        vram_scrub: None,
        tls_spki_sha256: None,
        tee_kind: String::new(),
    }
}

/// `claims.gpu` as ccnoded writes it: one real GPU in `cc_mode`.
fn gpu_claims(cc_mode: &str) -> serde_json::Value {
    json!({
        "backend": "nvml",
        "simulated": false,
        "inventory": {"gpus": [{"uuid": "GPU-0", "cc_mode": cc_mode, "driver": "550.90.07", "power_w": 71.25}]},
    })
}

fn policy(ak_sha256: &[u8; 32]) -> VerifierPolicy {
    VerifierPolicy::from_toml(&format!(
        "allowed_aks = [\"{}\"]\nallowed_models = [\"sha256:{}\"]\nallow_simulated_tee = true\n",
        hex::encode(ak_sha256),
        "cc".repeat(32)
    ))
    .unwrap()
}

struct Node {
    tpm: Swtpm,
    _state: tempfile::TempDir,
    attester: Attester,
}

/// Measures the load of the model [`claims`] lists, as ccnoded does.
fn measure_tiny(service: &TpmService) {
    service
        .measure(
            event_type::MODEL_LOAD,
            json!({"name": "tiny", "digest": format!("sha256:{}", "cc".repeat(32)), "signer": "k"}),
        )
        .unwrap();
}

fn node(alg: AkAlgorithm) -> Node {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let service = TpmService::open(config(&tpm, alg, state.path())).expect("open tpm");
    service
        .measure(event_type::POLICY_LOAD, json!({"digest": "sha256:bb"}))
        .unwrap();
    measure_tiny(&service);
    let attester = Attester::new(
        Arc::new(service),
        Tee::Simulated(SimulatedTee::new([9; 32])),
    );
    Node {
        tpm,
        _state: state,
        attester,
    }
}

fn nonce(b: u8) -> Vec<u8> {
    vec![b; 32]
}

fn assert_fails(result: &AttestationResult, check: &str) {
    let c = result
        .check(check)
        .unwrap_or_else(|| panic!("no check {check}"));
    assert_eq!(
        c.status,
        Status::Fail,
        "{check} should fail: {:#?}",
        result.checks
    );
    assert!(!result.passed());
}

fn assert_all_pass(result: &AttestationResult) {
    assert!(result.passed(), "verdict should pass: {:#?}", result.checks);
    for c in &result.checks {
        assert_ne!(c.status, Status::Fail, "{c:?}");
    }
}

fn ak_digest(a: &Attester) -> [u8; 32] {
    a.tpm().ak().spki_sha256
}

#[test]
fn ak_is_created_once_and_reused_across_reopen() {
    for alg in [AkAlgorithm::EccP256, AkAlgorithm::Rsa2048] {
        let tpm = Swtpm::start();
        let state = tempfile::tempdir().unwrap();
        let first = TpmService::open(config(&tpm, alg, state.path())).unwrap();
        let (pem, name, area) = (
            first.ak().public_pem.clone(),
            first.ak().name.clone(),
            first.ak().public_area.clone(),
        );
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(name.len(), 34, "sha256 name");
        drop(first);
        let again = TpmService::open(config(&tpm, alg, state.path())).unwrap();
        assert_eq!(again.ak().public_pem, pem, "{alg:?}: same key after reopen");
        assert_eq!(again.ak().name, name);
        assert_eq!(again.ak().public_area, area);
        drop(again);
        // The handle holds a key of the other algorithm: refused, not
        // overwritten.
        let other = match alg {
            AkAlgorithm::EccP256 => AkAlgorithm::Rsa2048,
            AkAlgorithm::Rsa2048 => AkAlgorithm::EccP256,
        };
        let err = TpmService::open(config(&tpm, other, state.path())).unwrap_err();
        assert!(matches!(err, TpmError::AkMismatch { .. }), "{err}");
        assert_eq!(err.code(), "ak_mismatch");
        let still = TpmService::open(config(&tpm, alg, state.path())).unwrap();
        assert_eq!(still.ak().public_pem, pem);
    }
}

#[test]
fn unreachable_tpm_is_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let mut c = TpmConfig::new(state.path().join("log"));
    c.tcti = "swtpm:host=127.0.0.1,port=1".parse().unwrap();
    let err = TpmService::open(c).unwrap_err();
    assert_eq!(err.code(), "tpm_unavailable", "{err}");
    let mut c = TpmConfig::new(state.path().join("log"));
    c.tcti = "device:/nonexistent/tpmrm0".parse().unwrap();
    let err = TpmService::open(c).unwrap_err();
    assert_eq!(err.code(), "tpm_unavailable", "{err}");
}

#[test]
fn evidence_verifies_ecc_and_rsa() {
    for alg in [AkAlgorithm::EccP256, AkAlgorithm::Rsa2048] {
        let n = node(alg);
        let ev = n.attester.attest(&nonce(1), claims()).unwrap();
        assert_eq!(ev.version, 1);
        assert_eq!(ev.claims.tee_kind, "simulated");
        assert_eq!(ev.tpm.ccnode_event_log.events.len(), 2);
        // Through JSON, as a remote verifier gets it.
        let parsed = Evidence::from_json(&ev.to_json()).unwrap();
        assert_eq!(parsed, ev);
        let mut p = policy(&ak_digest(&n.attester));
        // Pin the ccnode PCR to the value this log implies.
        let pcr13 = ev.tpm.pcrs["sha256"][&13].clone();
        p.expected_pcrs
            .entry("sha256".into())
            .or_default()
            .insert(13, hex::decode(&pcr13).unwrap());
        let r = verify(&parsed, &nonce(1), &p, SystemTime::now());
        assert_all_pass(&r);
        assert_eq!(r.check("policy_pcrs").unwrap().status, Status::Pass);
        assert_eq!(r.check("firmware_event_log").unwrap().status, Status::Skip);
        assert_eq!(r.check("ak_signature").unwrap().status, Status::Pass);
        let names: Vec<&str> = r.checks.iter().map(|c| c.name).collect();
        for name in [
            "nonce_length",
            "ak_public",
            "ak_signature",
            "quote_structure",
            "qualifying_data",
            "pcr_digest",
            "firmware_event_log",
            "ccnode_event_log",
            "claims_digest",
            "models_measured",
            "policy_ak",
            "policy_pcrs",
            "policy_models",
            "policy_node_state",
            "policy_drift",
            "tee",
        ] {
            assert!(names.contains(&name), "missing check {name}");
        }
        drop(n.tpm);
    }
}

/// The same quote checked by an independent implementation: tpm2-tools'
/// tpm2_checkquote (AK PEM, TPMS_ATTEST, TPMT_SIGNATURE, PCR values,
/// qualifying data as files).
#[test]
fn tpm2_checkquote_accepts_the_quote_ecc_and_rsa() {
    for alg in [AkAlgorithm::EccP256, AkAlgorithm::Rsa2048] {
        let n = node(alg);
        let ev = n.attester.attest(&nonce(2), claims()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ak.pem"), &ev.tpm.ak.public_pem).unwrap();
        std::fs::write(d.join("msg"), B64.decode(&ev.tpm.quote.attest).unwrap()).unwrap();
        std::fs::write(d.join("sig"), B64.decode(&ev.tpm.quote.signature).unwrap()).unwrap();
        let values = &ev.tpm.pcrs["sha256"];
        let list: Vec<u32> = values.keys().copied().collect();
        let raw: Vec<Vec<u8>> = values.values().map(|v| hex::decode(v).unwrap()).collect();
        let pcrs = tpm2_tools_pcrs(&list, &raw);
        std::fs::write(d.join("pcrs"), &pcrs).unwrap();
        let run = |qual: &str, pcr_file: &str| {
            Command::new(tool("tpm2_checkquote"))
                .current_dir(d)
                .args(["-u", "ak.pem", "-m", "msg", "-s", "sig", "-f", pcr_file])
                .args(["-g", "sha256", "-q", qual])
                .output()
                .unwrap()
        };
        let out = run(&ev.binding, "pcrs");
        assert!(
            out.status.success(),
            "{alg:?}: tpm2_checkquote refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // And it is not a rubber stamp: other qualifying data or PCR values
        // are refused.
        assert!(!run(&"00".repeat(32), "pcrs").status.success());
        let mut flipped = raw.clone();
        flipped[0][0] ^= 1;
        let bad = tpm2_tools_pcrs(&list, &flipped);
        std::fs::write(d.join("bad-pcrs"), &bad).unwrap();
        assert!(!run(&ev.binding, "bad-pcrs").status.success());
    }
}

/// PCR values in tpm2-tools' "serialized" PCR file format (what
/// `tpm2_quote -o` writes by default; its "values" format cannot carry more
/// than 8 PCRs in tpm2-tools 5.4): the C structures as they lie in memory
/// on x86-64 (little-endian, padded): TPML_PCR_SELECTION (count, 16
/// selections of 8 bytes), the number of TPML_DIGESTs, then each TPML_DIGEST
/// (count, 8 TPM2B_DIGESTs of 2 + 64 bytes), 8 values per TPML_DIGEST.
fn tpm2_tools_pcrs(pcrs: &[u32], values: &[Vec<u8>]) -> Vec<u8> {
    let mut out = 1u32.to_le_bytes().to_vec();
    let mut select = [0u8; 4];
    for p in pcrs {
        select[(*p / 8) as usize] |= 1 << (p % 8);
    }
    out.extend_from_slice(&0x000bu16.to_le_bytes());
    out.push(3);
    out.extend_from_slice(&select);
    out.push(0); // padding
    out.extend_from_slice(&[0u8; 15 * 8]);
    let chunks: Vec<&[Vec<u8>]> = values.chunks(8).collect();
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes()[..4]);
    for chunk in chunks {
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        for i in 0..8 {
            let mut digest = [0u8; 66];
            if let Some(v) = chunk.get(i) {
                digest[..2].copy_from_slice(&(v.len() as u16).to_le_bytes());
                digest[2..2 + v.len()].copy_from_slice(v);
            }
            out.extend_from_slice(&digest);
        }
    }
    out
}

#[test]
fn negative_cases_fail_on_the_right_check() {
    let n = node(AkAlgorithm::EccP256);
    let p = policy(&ak_digest(&n.attester));
    let ev = n.attester.attest(&nonce(3), claims()).unwrap();
    assert_all_pass(&verify(&ev, &nonce(3), &p, SystemTime::now()));

    // A different nonce.
    assert_fails(
        &verify(&ev, &nonce(4), &p, SystemTime::now()),
        "qualifying_data",
    );
    // Replayed old evidence: fresh evidence exists for a new nonce, the old
    // one is sent instead.
    let fresh = n.attester.attest(&nonce(5), claims()).unwrap();
    assert_all_pass(&verify(&fresh, &nonce(5), &p, SystemTime::now()));
    assert_fails(
        &verify(&ev, &nonce(5), &p, SystemTime::now()),
        "qualifying_data",
    );

    let flip_b64 = |s: &str, at: usize| {
        let mut b = B64.decode(s).unwrap();
        let i = at.min(b.len() - 1);
        b[i] ^= 0x01;
        B64.encode(b)
    };
    // One flipped byte in the quote (TPMS_ATTEST), at several places.
    for at in [0, 10, 40, 1000] {
        let mut e = ev.clone();
        e.tpm.quote.attest = flip_b64(&e.tpm.quote.attest, at);
        assert_fails(
            &verify(&e, &nonce(3), &p, SystemTime::now()),
            "ak_signature",
        );
    }
    // In the signature.
    for at in [8, 40, 1000] {
        let mut e = ev.clone();
        e.tpm.quote.signature = flip_b64(&e.tpm.quote.signature, at);
        assert_fails(
            &verify(&e, &nonce(3), &p, SystemTime::now()),
            "ak_signature",
        );
    }
    // In a PCR value (firmware PCR and the ccnode PCR).
    for idx in [0u32, 13] {
        let mut e = ev.clone();
        let v = e.tpm.pcrs.get_mut("sha256").unwrap().get_mut(&idx).unwrap();
        let mut b = hex::decode(&*v).unwrap();
        b[5] ^= 1;
        *v = hex::encode(b);
        assert_fails(&verify(&e, &nonce(3), &p, SystemTime::now()), "pcr_digest");
    }
    // In the ccnode event log: its data, its digest, its order.
    let mut e = ev.clone();
    e.tpm.ccnode_event_log.events[1].data["name"] = json!("tinz");
    assert_fails(
        &verify(&e, &nonce(3), &p, SystemTime::now()),
        "ccnode_event_log",
    );
    let mut e = ev.clone();
    let mut d = hex::decode(&e.tpm.ccnode_event_log.events[0].digest).unwrap();
    d[0] ^= 1;
    e.tpm.ccnode_event_log.events[0].digest = hex::encode(d);
    assert_fails(
        &verify(&e, &nonce(3), &p, SystemTime::now()),
        "ccnode_event_log",
    );
    let mut e = ev.clone();
    e.tpm.ccnode_event_log.events.pop();
    assert_fails(
        &verify(&e, &nonce(3), &p, SystemTime::now()),
        "ccnode_event_log",
    );
    // In the claims.
    let mut e = ev.clone();
    e.claims.node_id = "node-b".into();
    let r = verify(&e, &nonce(3), &p, SystemTime::now());
    assert_fails(&r, "claims_digest");
    assert_fails(&r, "qualifying_data");
    let mut e = ev.clone();
    e.claims.models[0].digest = format!("sha256:{}", "cd".repeat(32));
    assert_fails(
        &verify(&e, &nonce(3), &p, SystemTime::now()),
        "claims_digest",
    );
    // An unknown AK: the policy lists another.
    let other = policy(&[0x42; 32]);
    let r = verify(&ev, &nonce(3), &other, SystemTime::now());
    assert_fails(&r, "policy_ak");
    assert_eq!(r.failed(), vec!["policy_ak"]);
    // A swapped AK PEM (another key, same everything else).
    let m = node(AkAlgorithm::EccP256);
    let mut e = ev.clone();
    e.tpm.ak = m.attester.attest(&nonce(3), claims()).unwrap().tpm.ak;
    let r = verify(&e, &nonce(3), &p, SystemTime::now());
    assert_fails(&r, "ak_signature");
    assert_fails(&r, "policy_ak");
    // Simulated TEE evidence without the flag.
    let mut strict = p.clone();
    strict.allow_simulated_tee = false;
    let r = verify(&ev, &nonce(3), &strict, SystemTime::now());
    assert_fails(&r, "tee");
    assert_eq!(r.failed(), vec!["tee"]);
    // Wrong nonce lengths: the attester refuses them, and so does the
    // verifier.
    for len in [0usize, 15, 65] {
        let err = n.attester.attest(&vec![1; len], claims()).unwrap_err();
        assert!(matches!(err, AttestError::Nonce(_)), "{err}");
        assert_eq!(err.code(), "bad_nonce");
        assert_fails(
            &verify(&ev, &vec![3; len], &p, SystemTime::now()),
            "nonce_length",
        );
    }
    // Node state and drift.
    let mut c = claims();
    c.node_state = "quarantined".into();
    c.node_state_reason = Some("xid 79".into());
    let q = n.attester.attest(&nonce(6), c).unwrap();
    let r = verify(&q, &nonce(6), &p, SystemTime::now());
    assert_eq!(r.failed(), vec!["policy_node_state"]);
    let mut c = claims();
    c.drift = Some(vec![
        json!({"component": "driver", "expected": "550", "found": "555"}),
    ]);
    let q = n.attester.attest(&nonce(7), c).unwrap();
    assert_eq!(
        verify(&q, &nonce(7), &p, SystemTime::now()).failed(),
        vec!["policy_drift"]
    );
    // A model the policy does not allow.
    let mut c = claims();
    c.models.push(ModelClaim {
        name: "rogue".into(),
        digest: format!("sha256:{}", "dd".repeat(32)),
    });
    let q = n.attester.attest(&nonce(8), c).unwrap();
    assert_eq!(
        verify(&q, &nonce(8), &p, SystemTime::now()).failed(),
        vec!["models_measured", "policy_models"]
    );
    // A claimed model whose digest differs from the one measured.
    let mut c = claims();
    c.models[0].digest = format!("sha256:{}", "ce".repeat(32));
    let q = n.attester.attest(&nonce(13), c).unwrap();
    assert_eq!(
        verify(&q, &nonce(13), &p, SystemTime::now()).failed(),
        vec!["models_measured", "policy_models"]
    );
    // A model loaded this boot and unloaded before the quote: the claims
    // no longer list it, the log does.
    n.attester
        .tpm()
        .measure(
            event_type::MODEL_LOAD,
            json!({"name": "rogue", "digest": format!("sha256:{}", "dd".repeat(32))}),
        )
        .unwrap();
    let q = n.attester.attest(&nonce(14), claims()).unwrap();
    let r = verify(&q, &nonce(14), &p, SystemTime::now());
    assert_eq!(r.failed(), vec!["policy_models"]);
    assert!(r.check("policy_models").unwrap().message.contains("rogue"));
    // A log that names another PCR than the policy's.
    let mut e = ev.clone();
    e.tpm.ccnode_event_log.pcr = 0;
    let r = verify(&e, &nonce(3), &p, SystemTime::now());
    assert_fails(&r, "ccnode_event_log");
    assert!(r
        .check("ccnode_event_log")
        .unwrap()
        .message
        .contains("policy's ccnode_pcr is 13"));
    // An unknown TEE kind.
    let mut e = ev.clone();
    e.tee.kind = "sev-snp".into();
    e.claims.tee_kind = "sev-snp".into();
    assert_fails(&verify(&e, &nonce(3), &p, SystemTime::now()), "tee");
}

#[test]
fn event_log_survives_restart_and_detects_reset() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&tpm, AkAlgorithm::EccP256, state.path());
    let first = TpmService::open(cfg.clone()).unwrap();
    assert_eq!(first.log_status(), &LogStatus::Consistent);
    first
        .measure(event_type::AGENT_START, json!({"version": "0.1.0"}))
        .unwrap();
    measure_tiny(&first);
    drop(first);
    // A restart of ccnoded: same TPM (PCR kept), log read back.
    let again = Arc::new(TpmService::open(cfg.clone()).unwrap());
    assert_eq!(again.log_status(), &LogStatus::Consistent);
    assert_eq!(again.events().unwrap().len(), 2);
    again
        .measure(event_type::AGENT_START, json!({"version": "0.1.0"}))
        .unwrap();
    let a = Attester::new(again.clone(), Tee::Simulated(SimulatedTee::new([0; 32])));
    let ev = a.attest(&nonce(9), claims()).unwrap();
    assert_eq!(ev.tpm.ccnode_event_log.events.len(), 3);
    let p = policy(&again.ak().spki_sha256);
    assert_all_pass(&verify(&ev, &nonce(9), &p, SystemTime::now()));
    drop(a);
    drop(again);
    // A reboot: a fresh TPM (PCR back to zeros), the old log set aside.
    drop(tpm);
    let fresh = Swtpm::start();
    let cfg = config(&fresh, AkAlgorithm::EccP256, state.path());
    let svc = TpmService::open(cfg).unwrap();
    assert_eq!(svc.log_status(), &LogStatus::Reset { discarded: 3 });
    assert!(svc.events().unwrap().is_empty());
    assert!(state
        .path()
        .join("ccnode-event-log.previous-boot.json")
        .exists());
}

#[test]
fn foreign_extension_of_the_ccnode_pcr_is_reported() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&tpm, AkAlgorithm::EccP256, state.path());
    let svc = TpmService::open(cfg.clone()).unwrap();
    svc.measure(event_type::POLICY_LOAD, json!({"digest": "x"}))
        .unwrap();
    measure_tiny(&svc);
    drop(svc);
    // Something else extends the ccnode PCR while ccnoded is down.
    let out = Command::new(tool("tpm2_pcrextend"))
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .arg(format!("13:sha256={}", "ab".repeat(32)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svc = Arc::new(TpmService::open(cfg).unwrap());
    assert!(
        matches!(svc.log_status(), LogStatus::Mismatch { .. }),
        "{:?}",
        svc.log_status()
    );
    let a = Attester::new(svc.clone(), Tee::Simulated(SimulatedTee::new([0; 32])));
    let ev = a.attest(&nonce(10), claims()).unwrap();
    let r = verify(
        &ev,
        &nonce(10),
        &policy(&svc.ak().spki_sha256),
        SystemTime::now(),
    );
    assert_eq!(r.failed(), vec!["ccnode_event_log"]);
}

/// A node configured with another ccnode PCR verifies only against a
/// policy that names it: the verifier does not take the PCR from the log.
#[test]
fn the_ccnode_pcr_is_the_policys_not_the_logs() {
    let tpm = Swtpm::start();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&tpm, AkAlgorithm::EccP256, state.path());
    cfg.ccnode_pcr = 14;
    cfg.pcrs = PcrSelection::default_with(14).unwrap();
    let svc = Arc::new(TpmService::open(cfg).unwrap());
    measure_tiny(&svc);
    let a = Attester::new(svc.clone(), Tee::Simulated(SimulatedTee::new([0; 32])));
    let ev = a.attest(&nonce(15), claims()).unwrap();
    assert_eq!(ev.tpm.ccnode_event_log.pcr, 14);
    let mut p = policy(&svc.ak().spki_sha256);
    let r = verify(&ev, &nonce(15), &p, SystemTime::now());
    assert_eq!(r.failed(), vec!["ccnode_event_log"]);
    p.ccnode_pcr = 14;
    assert_all_pass(&verify(&ev, &nonce(15), &p, SystemTime::now()));
}

/// A firmware event log is included and replayed: PCRs 0 and 7 are extended
/// the way firmware would (before the service opens: swtpm serves one
/// connection at a time), and the log describes exactly that.
#[test]
fn firmware_event_log_is_replayed() {
    let tpm = Swtpm::start();
    let events: [(u32, u32, &[u8]); 3] = [
        (0, 0x8000_0008, b"crtm version"),
        (7, 0x8000_00e0, b"secure boot on"),
        (0, 0x0000_0004, b"separator"),
    ];
    for (pcr, _, data) in &events {
        let out = Command::new(tool("tpm2_pcrextend"))
            .env("TPM2TOOLS_TCTI", tpm.tcti())
            .arg(format!(
                "{pcr}:sha256={}",
                hex::encode(Sha256::digest(data))
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let state = tempfile::tempdir().unwrap();
    let log_path = state.path().join("binary_bios_measurements");
    std::fs::write(&log_path, firmware::build_log(&events)).unwrap();
    let mut cfg = config(&tpm, AkAlgorithm::EccP256, state.path());
    cfg.firmware_log = Some(log_path.clone());
    let svc = Arc::new(TpmService::open(cfg).unwrap());
    measure_tiny(&svc);
    let a = Attester::new(svc.clone(), Tee::Simulated(SimulatedTee::new([0; 32])));
    let p = policy(&svc.ak().spki_sha256);
    let ev = a.attest(&nonce(11), claims()).unwrap();
    assert!(ev.tpm.firmware_event_log.is_some());
    let r = verify(&ev, &nonce(11), &p, SystemTime::now());
    assert_all_pass(&r);
    assert_eq!(r.check("firmware_event_log").unwrap().status, Status::Pass);
    // A log that does not match what the TPM measured.
    std::fs::write(
        &log_path,
        firmware::build_log(&[
            (0, 0x8000_0008, b"crtm version"),
            (7, 0x8000_00e0, b"secure boot off"),
        ]),
    )
    .unwrap();
    let ev = a.attest(&nonce(12), claims()).unwrap();
    let r = verify(&ev, &nonce(12), &p, SystemTime::now());
    assert_eq!(r.failed(), vec!["firmware_event_log"]);
    // A log that lies about PCR 0, in evidence whose ccnode log calls PCR
    // 0 its own: the replay still covers PCR 0 (the policy, not the
    // evidence, names ccnode's PCR).
    std::fs::write(
        &log_path,
        firmware::build_log(&[
            (0, 0x8000_0008, b"crtm version, another"),
            (7, 0x8000_00e0, b"secure boot on"),
            (0, 0x0000_0004, b"separator"),
        ]),
    )
    .unwrap();
    let mut lie = a.attest(&nonce(16), claims()).unwrap();
    lie.tpm.ccnode_event_log.pcr = 0;
    let r = verify(&lie, &nonce(16), &p, SystemTime::now());
    assert_fails(&r, "firmware_event_log");
    assert!(
        r.check("firmware_event_log")
            .unwrap()
            .message
            .contains("PCR 0"),
        "{:?}",
        r.checks
    );
    // A log that is not a TCG log at all.
    let mut e = ev.clone();
    e.tpm.firmware_event_log = Some(B64.encode(b"garbage"));
    assert_fails(
        &verify(&e, &nonce(12), &p, SystemTime::now()),
        "firmware_event_log",
    );
}

#[test]
fn a_batch_shares_one_quote_and_each_verifier_checks_its_own_nonce() {
    let n = node(AkAlgorithm::EccP256);
    let p = policy(&ak_digest(&n.attester));
    let nonces: Vec<Vec<u8>> = (0..5u8).map(|i| nonce(0x40 + i)).collect();
    let answers = n.attester.attest_batch(&nonces, claims()).unwrap();
    assert_eq!(answers.len(), 5);
    // One quote for all of them.
    let quote = &answers[0].tpm.quote;
    assert!(answers.iter().all(|e| &e.tpm.quote == quote));
    for (i, (e, nonce)) in answers.iter().zip(&nonces).enumerate() {
        let b = e.batch.as_ref().expect("batched");
        assert_eq!((b.index as usize, b.size), (i, 5));
        let r = verify(e, nonce, &p, SystemTime::now());
        assert_all_pass(&r);
        assert_eq!(r.check("batch_inclusion").unwrap().status, Status::Pass);
    }
    // Another verifier's answer does not prove my nonce.
    let r = verify(&answers[1], &nonces[2], &p, SystemTime::now());
    assert_fails(&r, "batch_inclusion");
    assert_fails(&r, "qualifying_data");
    // A forged index or path, or a stripped batch, fails.
    let mut forged = answers[3].clone();
    forged.batch.as_mut().unwrap().index = 2;
    assert_fails(
        &verify(&forged, &nonces[3], &p, SystemTime::now()),
        "batch_inclusion",
    );
    let mut forged = answers[3].clone();
    let path = &mut forged.batch.as_mut().unwrap().path;
    path[0] = "00".repeat(32);
    assert_fails(
        &verify(&forged, &nonces[3], &p, SystemTime::now()),
        "batch_inclusion",
    );
    let mut stripped = answers[0].clone();
    stripped.batch = None;
    assert_fails(
        &verify(&stripped, &nonces[0], &p, SystemTime::now()),
        "qualifying_data",
    );
    // One nonce is answered plainly.
    let single = n.attester.attest_batch(&nonces[..1], claims()).unwrap();
    assert!(single[0].batch.is_none());
    assert_all_pass(&verify(&single[0], &nonces[0], &p, SystemTime::now()));
    // A bad nonce refuses the whole batch before the TPM is asked.
    let mut bad = nonces.clone();
    bad.push(vec![1; 8]);
    assert!(matches!(
        n.attester.attest_batch(&bad, claims()),
        Err(AttestError::Nonce(_))
    ));
}

/// A GPU in CC mode that answers every nonce with NVIDIA's genuine sample
/// report (signed over its own, fixed nonce).
#[derive(Debug)]
struct SampleGpu;

impl GpuAttestation for SampleGpu {
    fn cc_gpus(&self) -> Vec<(String, u32)> {
        vec![("GPU-0".into(), 0)]
    }

    fn report(&self, _index: u32, _nonce: &[u8; 32]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let report = ccnode_attest::nvidia::report_from_hex(include_str!(
            "fixtures/nvidia-hopper/hopperAttestationReport.txt"
        ))
        .map_err(|e| e.to_string())?;
        Ok((
            report,
            include_bytes!("fixtures/nvidia-hopper/hopperCertChain.txt").to_vec(),
        ))
    }
}

#[test]
fn gpu_evidence_is_bound_into_the_quote_and_its_nonce_is_checked() {
    let n = node(AkAlgorithm::EccP256);
    let ak = ak_digest(&n.attester);
    let attester = Attester::new(
        n.attester.tpm().clone(),
        Tee::Simulated(SimulatedTee::new([9; 32])),
    )
    .with_gpus(Arc::new(SampleGpu));
    let mut c = claims();
    c.gpu = Some(gpu_claims("on"));
    let e = attester.attest(&nonce(1), c.clone()).unwrap();
    assert_eq!(e.gpus.len(), 1);
    assert_eq!(e.bound_evidence.len(), 1);
    assert_eq!(e.bound_evidence[0].kind, "nvidia-gpu-cc");
    // The GPU was asked for the nonce derived from ours.
    let expected = ccnode_attest::evidence::gpu_nonce(&nonce(1), &c_digest(&e), "GPU-0");
    assert_eq!(e.gpus[0].nonce, hex::encode(expected));
    let r = verify(&e, &nonce(1), &policy(&ak), SystemTime::now());
    // Everything verifies, the binding over the GPU evidence included...
    for check in ["qualifying_data", "ak_signature", "tee", "claims_digest"] {
        assert_eq!(
            r.check(check).unwrap().status,
            Status::Pass,
            "{check}: {:#?}",
            r.checks
        );
    }
    // ...but the sample was signed over NVIDIA's nonce, not ours.
    assert_eq!(r.failed(), vec!["gpu_cc"], "{:#?}", r.checks);
    assert!(
        r.check("gpu_cc").unwrap().message.contains("nonce"),
        "{:#?}",
        r.checks
    );

    // GPU evidence swapped after the quote: its digest is not the bound one.
    let mut swapped = e.clone();
    swapped.gpus[0].cert_chain.push('\n');
    let r = verify(&swapped, &nonce(1), &policy(&ak), SystemTime::now());
    assert_fails(&r, "gpu_cc");
    assert!(r.check("gpu_cc").unwrap().message.contains("not the bound"));
    // Bound evidence edited to match: the binding, hence the quote, breaks.
    let mut rebound = swapped.clone();
    rebound.bound_evidence[0] = ccnode_attest::evidence::gpu_bound(&rebound.gpus[0]).unwrap();
    let r = verify(&rebound, &nonce(1), &policy(&ak), SystemTime::now());
    assert_fails(&r, "qualifying_data");
    // GPU evidence dropped altogether: the claims say the GPU is in CC mode.
    let mut dropped = e.clone();
    dropped.gpus.clear();
    dropped.bound_evidence.clear();
    let r = verify(&dropped, &nonce(1), &policy(&ak), SystemTime::now());
    assert_fails(&r, "gpu_cc");
    assert_fails(&r, "qualifying_data");
}

fn c_digest(e: &Evidence) -> [u8; 32] {
    e.claims.digest().unwrap()
}
