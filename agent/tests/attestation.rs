//! The attestation endpoint end to end: the real ccnoded on a real TPM 2.0
//! emulator (swtpm, started per test), fetched over HTTP and checked with
//! the verifier library and the `ccnode-verify` CLI's code path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::SystemTime;

use base64::Engine as _;
use ccnode_attest::client::fetch_evidence;
use ccnode_attest::tpm::key::AkPublicKey;
use ccnode_attest::{verify, Evidence, VerifierPolicy};
use ccnode_testkit::swtpm::Swtpm;
use ccnode_testkit::{TestNode, PATIENCE};
use serde_json::Value;

fn attested_node(tpm: &Swtpm, extra: &str) -> TestNode {
    TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
        .with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\ntee = \"simulated\"\nfirmware_log = \"\"\n{extra}",
            tpm.tcti()
        ))
        .start()
}

fn url(node: &TestNode) -> String {
    node.attestation_url()
}

fn nonce(tag: u8) -> Vec<u8> {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_le_bytes();
    let mut n = vec![tag; 32];
    n[..16].copy_from_slice(&t);
    n
}

fn fetch(node: &TestNode, nonce: &[u8]) -> Evidence {
    let bytes = fetch_evidence(&url(node), nonce, PATIENCE).expect("fetch evidence");
    Evidence::from_json(&bytes).expect("evidence parses")
}

fn ak_digest(e: &Evidence) -> String {
    let key = AkPublicKey::from_pem(&e.tpm.ak.public_pem).unwrap();
    hex::encode(key.spki_sha256().unwrap())
}

fn policy(ak: &str, extra: &str) -> VerifierPolicy {
    VerifierPolicy::from_toml(&format!(
        "allowed_aks = [\"{ak}\"]\nallow_simulated_tee = true\n{extra}"
    ))
    .unwrap()
}

fn failed(e: &Evidence, nonce: &[u8], p: &VerifierPolicy) -> Vec<&'static str> {
    verify(e, nonce, p, SystemTime::now()).failed()
}

#[test]
fn evidence_from_ccnoded_on_swtpm_verifies_and_the_ak_survives_a_restart() {
    let tpm = Swtpm::start();
    let mut node = attested_node(&tpm, "");
    // The first answer tells us the node's AK (trust on first use, as an
    // enrolment would); everything after is checked against it.
    let first = fetch(&node, &nonce(1));
    let ak = ak_digest(&first);
    let p = policy(&ak, "");

    let n = nonce(2);
    let e = fetch(&node, &n);
    let result = verify(&e, &n, &p, SystemTime::now());
    assert!(result.passed(), "{:?}", result.failed());
    assert_eq!(e.claims.node_id, "test-node");
    assert_eq!(e.claims.node_state, "active");
    assert_eq!(e.claims.tee_kind, "simulated");
    assert!(e.claims.config_digest.starts_with("sha256:"));
    assert!(e.claims.policy_digest.starts_with("sha256:"));
    // This start and its policy are in ccnode's own event log.
    let types: Vec<_> = e
        .tpm
        .ccnode_event_log
        .events
        .iter()
        .map(|ev| ev.event_type.as_str())
        .collect();
    assert_eq!(types, ["agent_start", "policy_load"]);

    // The same evidence against another nonce, or another AK, fails.
    assert!(failed(&e, &nonce(3), &p).contains(&"qualifying_data"));
    let other = policy(&"ab".repeat(32), "");
    assert_eq!(failed(&e, &n, &other), ["policy_ak"]);
    let strict = VerifierPolicy::from_toml(&format!("allowed_aks = [\"{ak}\"]\n")).unwrap();
    assert_eq!(
        failed(&e, &n, &strict),
        ["tee"],
        "simulated TEE refused by default"
    );

    // A restart reuses the persisted AK and extends the log.
    node.restart();
    let n = nonce(4);
    let e = fetch(&node, &n);
    assert_eq!(ak_digest(&e), ak);
    assert!(verify(&e, &n, &p, SystemTime::now()).passed());
    assert_eq!(e.tpm.ccnode_event_log.events.len(), 4);

    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("ccnode_attestations_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ccnode_attestation_seconds_count 1"),
        "{metrics}"
    );
}

#[test]
fn the_claims_follow_the_node_state_and_its_gpus() {
    let tpm = Swtpm::start();
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"));
    let sim = node.dir().join("gpus.sim.toml");
    std::fs::write(
        &sim,
        "driver_version = \"560.35.03\"\ncuda_driver_version = \"12.6\"\n\n[[gpus]]\ncount = 2\n\
         name = \"NVIDIA H100 80GB HBM3\"\nmemory_gib = 80\nvbios_version = \"96.00.99.00.01\"\n",
    )
    .unwrap();
    let node = node
        .with_gpu(&format!("backend = \"sim\"\nsim_file = \"{}\"", sim.display()))
        .with_toml("[gpu.baseline]\ndriver_version = \"550.127.05\"\n")
        .with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\ntee = \"simulated\"\nfirmware_log = \"\"",
            tpm.tcti()
        ))
        .start();
    let n = nonce(5);
    let e = fetch(&node, &n);
    let gpu = e.claims.gpu.clone().expect("GPU claims");
    assert_eq!(gpu["simulated"], true);
    assert_eq!(gpu["inventory"]["gpus"].as_array().unwrap().len(), 2);
    // Simulated GPUs are refused unless the policy allows them.
    let strict = policy(&ak_digest(&e), "");
    assert_eq!(failed(&e, &n, &strict), ["policy_drift", "gpu_cc"]);
    let p = policy(&ak_digest(&e), "allow_simulated_gpus = true");
    assert_eq!(
        failed(&e, &n, &p),
        ["policy_drift"],
        "driver drift is claimed"
    );

    let r = node.request(r#"{"v":1,"cmd":"quarantine","reason":"attest test"}"#);
    assert_eq!(r["ok"], true);
    let n = nonce(6);
    let e = fetch(&node, &n);
    assert_eq!(e.claims.node_state, "quarantined");
    assert_eq!(e.claims.node_state_reason.as_deref(), Some("attest test"));
    let f = failed(&e, &n, &p);
    assert!(f.contains(&"policy_node_state"), "{f:?}");
}

/// A raw HTTP exchange: returns the status, the headers and the body.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn post(addr: SocketAddr, body: &str) -> (u16, String, Value) {
    let req = format!(
        "POST /v1/attestation HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, head, body) = raw(addr, req.as_bytes());
    (
        status,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

fn addr_of(node: &TestNode) -> SocketAddr {
    let u = url(node);
    u.trim_start_matches("http://")
        .trim_end_matches("/v1/attestation")
        .parse()
        .unwrap()
}

#[test]
fn bad_requests_get_stable_error_codes() {
    let tpm = Swtpm::start();
    let node = attested_node(&tpm, "per_client_burst = 100\nper_client_rate = 100.0");
    let addr = addr_of(&node);
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);

    for (body, status, code) in [
        (format!("{{\"nonce\":\"{}\"}}", b64(15)), 400, "bad_nonce"),
        (format!("{{\"nonce\":\"{}\"}}", b64(65)), 400, "bad_nonce"),
        ("{\"nonce\":\"not base64!\"}".to_owned(), 400, "bad_nonce"),
        ("{\"nonce\":".to_owned(), 400, "bad_request"),
        (
            format!("{{\"nonce\":\"{}\",\"extra\":1}}", b64(32)),
            400,
            "bad_request",
        ),
        (
            format!(
                "{{\"nonce\":\"{}\",\"pad\":\"{}\"}}",
                b64(32),
                "x".repeat(5000)
            ),
            413,
            "body_too_large",
        ),
    ] {
        let (got, _, v) = post(addr, &body);
        assert_eq!(got, status, "{body:.80}: {v}");
        assert_eq!(v["error"]["code"], code, "{body:.80}: {v}");
    }
    let (status, head, _) = raw(
        addr,
        b"GET /v1/attestation HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    let (status, _, _) = raw(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    // And a good one still works after all that.
    let (status, _, v) = post(addr, &format!("{{\"nonce\":\"{}\"}}", b64(32)));
    assert_eq!(status, 200, "{v}");
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("ccnode_attestations_total{result=\"bad_nonce\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("ccnode_attestations_total{result=\"body_too_large\"} 1"));
}

#[test]
fn a_client_over_its_rate_gets_429_with_retry_after() {
    let tpm = Swtpm::start();
    let node = attested_node(&tpm, "per_client_burst = 2\nper_client_rate = 0.01");
    let addr = addr_of(&node);
    let body = format!(
        "{{\"nonce\":\"{}\"}}",
        base64::engine::general_purpose::STANDARD.encode([1u8; 32])
    );
    assert_eq!(post(addr, &body).0, 200);
    assert_eq!(post(addr, &body).0, 200);
    let (status, head, v) = post(addr, &body);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    let retry: u64 = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {head}"));
    assert_eq!(retry, 100, "one token per 100 s");
}

/// The pid of the swtpm serving `tpm`, found by its command port.
fn swtpm_pid(tpm: &Swtpm) -> i32 {
    let port = format!("type=tcp,port={},", tpm.port());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first().is_some_and(|a| a.ends_with("swtpm"))
                && args.iter().any(|a| a.starts_with(&port))
        })
        .expect("the swtpm process")
}

#[test]
fn a_tpm_that_hangs_gets_busy_answers_not_requests_that_wait_forever() {
    let tpm = Swtpm::start();
    let node = attested_node(
        &tpm,
        "max_concurrent = 1\nrequest_timeout = \"1s\"\nper_client_burst = 1000\nper_client_rate = 1000.0",
    );
    let addr = addr_of(&node);
    let body = |tag: u8| {
        format!(
            "{{\"nonce\":\"{}\"}}",
            base64::engine::general_purpose::STANDARD.encode(nonce(tag))
        )
    };
    assert_eq!(post(addr, &body(1)).0, 200);
    // The TPM stops answering. The first request's quote never returns;
    // each request that times out gives its slot back but leaves its job
    // queued. Soon the queue is full: the next request is answered busy
    // at once rather than waiting for a place (before, it waited for good).
    let swtpm = nix::unistd::Pid::from_raw(swtpm_pid(&tpm));
    nix::sys::signal::kill(swtpm, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut busy = None;
    for tag in 2..8 {
        let (status, head, v) = post(addr, &body(tag));
        if status == 503 {
            busy = Some((head, v));
            break;
        }
        assert_eq!(status, 504, "request {tag}: {v}");
        assert_eq!(v["error"]["code"], "timeout", "{v}");
    }
    nix::sys::signal::kill(swtpm, nix::sys::signal::Signal::SIGCONT).unwrap();
    let (head, v) = busy.expect("no request was answered busy");
    assert_eq!(v["error"]["code"], "busy", "{v}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    // The TPM back, the batcher skips the stale jobs (answered busy until
    // it has) and verifiers are answered again.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (status, _, v) = post(addr, &body(9));
        if status == 200 {
            break;
        }
        assert_eq!(v["error"]["code"], "busy", "{status}: {v}");
        assert!(std::time::Instant::now() < deadline, "still busy: {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_tpm_that_cannot_be_reached_stops_ccnoded_with_69() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).with_attestation(&format!(
        "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"swtpm:host=127.0.0.1,port={port}\""
    ));
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("cannot open the TPM"), "{log}");

    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
        .with_attestation("enabled = true\ntcti = \"serial:/dev/ttyS0\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("attestation.tcti"), "{log}");
}

#[test]
fn a_configured_tee_that_cannot_report_stops_ccnoded_with_69_never_falling_back() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such");
    let run = |tee: &str| {
        let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\nfirmware_log = \"\"\n{tee}",
            tpm.tcti()
        ));
        node.run_to_exit()
    };
    // SEV-SNP, detected: neither configfs-tsm nor the device.
    let (status, log) = run(&format!(
        "tee = \"sev-snp\"\ntsm_root = \"{0}\"\nsev_guest_device = \"{0}/sev-guest\"",
        missing.display()
    ));
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(
        log.contains("the configured TEE (sev-snp) cannot give a report"),
        "{log}"
    );
    assert!(log.contains("neither configfs-tsm"), "{log}");
    // SEV-SNP through the device: it is named.
    let (status, log) = run(&format!(
        "tee = \"sev-snp\"\nsnp_interface = \"sev-guest\"\nsev_guest_device = \"{}/sev-guest\"",
        missing.display()
    ));
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("sev-guest"), "{log}");
    // TDX on a host without configfs-tsm.
    let (status, log) = run(&format!(
        "tee = \"tdx\"\ntsm_root = \"{}\"",
        missing.display()
    ));
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("configfs-tsm is not available"), "{log}");
    // A directory that is not configfs: entries have no attributes.
    let (status, log) = run(&format!(
        "tee = \"tdx\"\ntsm_root = \"{}\"",
        dir.path().display()
    ));
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("provider"), "{log}");
    // Bad keys are configuration errors.
    let (status, log) = run("tee = \"sev-snp\"\nsnp_vmpl = 4");
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("attestation.snp_vmpl"), "{log}");
    let (status, log) = run("tee = \"sgx\"");
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("tee"), "{log}");
}

/// 16 verifiers at once against `node`; every answer verifies with its own
/// nonce. Returns how many answers came batched.
fn sixteen_at_once(node: &TestNode) -> usize {
    let ak = ak_digest(&fetch(node, &nonce(9)));
    let p = policy(&ak, "");
    let u = url(node);
    let handles: Vec<_> = (0..16u8)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let n = nonce(100 + i);
                let bytes = fetch_evidence(&u, &n, PATIENCE).expect("fetch");
                (n, Evidence::from_json(&bytes).unwrap())
            })
        })
        .collect();
    let mut batched = 0;
    for h in handles {
        let (n, e) = h.join().unwrap();
        let r = verify(&e, &n, &p, SystemTime::now());
        assert!(r.passed(), "{:?}", r.failed());
        batched += usize::from(e.batch.is_some());
    }
    // Every verifier was counted in exactly one batch.
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("ccnode_attestation_batch_size_sum 17"),
        "{metrics}"
    );
    batched
}

#[test]
fn many_verifiers_at_once_each_get_their_own_fresh_answer() {
    let tpm = Swtpm::start();
    let node = attested_node(
        &tpm,
        "per_client_burst = 1000\nper_client_rate = 1000.0\nmax_concurrent = 64",
    );
    // Whether any shared a quote depends on timing; each answer verifies
    // either way.
    sixteen_at_once(&node);

    // With batch_max = 1 every verifier gets a quote of its own.
    let tpm = Swtpm::start();
    let node = attested_node(
        &tpm,
        "per_client_burst = 1000\nper_client_rate = 1000.0\nmax_concurrent = 64\nbatch_max = 1",
    );
    assert_eq!(sixteen_at_once(&node), 0);
    let (_, metrics) = node.http_get("/metrics");
    assert!(
        metrics.contains("ccnode_attestation_batch_size_count 17"),
        "{metrics}"
    );
}

/// A self-signed P-256 certificate for 127.0.0.1 and its key, made by
/// openssl (independent of ccnoded's TLS code).
fn self_signed(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = std::process::Command::new(ccnode_testkit::tool("openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=ccnode-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (cert, key)
}

/// sha256 of the certificate's SubjectPublicKeyInfo, by openssl.
fn openssl_spki_sha256(cert: &std::path::Path) -> String {
    let sh = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum",
        cert.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &sh])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[test]
fn over_tls_the_claims_pin_the_connection_to_the_attested_node() {
    let tpm = Swtpm::start();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), "node");
    let node = attested_node(
        &tpm,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let u = url(&node);
    assert!(u.starts_with("https://127.0.0.1:"), "{u}");
    let roots = ccnode_attest::client::load_roots(&cert).unwrap();
    let n = nonce(20);
    let fetched = ccnode_attest::client::fetch(&u, &n, PATIENCE, Some(&roots)).unwrap();
    let e = Evidence::from_json(&fetched.body).unwrap();
    let expected = openssl_spki_sha256(&cert);
    assert_eq!(e.claims.tls_spki_sha256.as_deref(), Some(expected.as_str()));
    assert_eq!(fetched.tls_spki_sha256.as_deref(), Some(expected.as_str()));
    let p = policy(&ak_digest(&e), "");
    let mut result = verify(&e, &n, &p, SystemTime::now());
    ccnode_attest::verify::check_tls_binding(&mut result, &expected);
    assert!(result.passed(), "{:?}", result.failed());
    // Evidence relayed through another TLS endpoint fails the binding.
    let mut relayed = verify(&e, &n, &p, SystemTime::now());
    ccnode_attest::verify::check_tls_binding(&mut relayed, &"cd".repeat(32));
    assert_eq!(relayed.failed(), ["tls_binding"]);

    // Another CA does not get through the handshake; plain HTTP gets no
    // evidence from the TLS port.
    let (other, _) = self_signed(certs.path(), "other");
    let other_roots = ccnode_attest::client::load_roots(&other).unwrap();
    let err = ccnode_attest::client::fetch(&u, &nonce(21), PATIENCE, Some(&other_roots))
        .unwrap_err()
        .to_string();
    assert!(err.contains("handshake"), "{err}");
    let plain = u.replacen("https://", "http://", 1);
    assert!(fetch_evidence(&plain, &nonce(22), PATIENCE).is_err());
    // https without roots is refused before connecting.
    assert!(ccnode_attest::client::fetch(&u, &nonce(23), PATIENCE, None).is_err());
}

#[test]
fn tls_settings_are_checked_at_start() {
    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
        .with_attestation("enabled = true\ntls_cert = \"/nonexistent.crt\"");
    let (status, log) = node.run_to_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("attestation.tls_key"), "{log}");

    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(dir.path(), "a");
    let (_, wrong_key) = self_signed(dir.path(), "b");
    let mut node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded")).with_attestation(&format!(
        "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\nfirmware_log = \"\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        tpm.tcti(),
        cert.display(),
        wrong_key.display()
    ));
    let (status, log) = node.run_to_exit();
    assert_eq!(
        status.code(),
        Some(78),
        "a key that is not the certificate's: {log}"
    );
    assert!(
        log.contains("attestation TLS") && log.contains("certificate and key"),
        "{log}"
    );
}

/// `ccnode-verify`, built next to `ccnoded` by a workspace build (as
/// `./scripts/test.sh` and CI do).
fn ccnode_verify() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_ccnoded")).with_file_name("ccnode-verify");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) first",
        p.display()
    );
    p
}

#[test]
fn ccnode_verify_attest_passes_against_ccnoded_and_fails_a_stranger_ak() {
    let tpm = Swtpm::start();
    let node = attested_node(&tpm, "");
    let ak = ak_digest(&fetch(&node, &nonce(30)));
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("allowed_aks = [\"sha256:{ak}\"]\nallow_simulated_tee = true\n"),
    )
    .unwrap();
    let out = std::process::Command::new(ccnode_verify())
        .args(["attest", "--json", "--url", &url(&node), "--policy"])
        .arg(&good)
        .output()
        .unwrap();
    let result: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{result}");
    assert_eq!(result["verdict"], "pass");
    assert_eq!(result["ak_spki_sha256"], ak);

    let stranger = dir.path().join("stranger.toml");
    std::fs::write(
        &stranger,
        format!(
            "allowed_aks = [\"{}\"]\nallow_simulated_tee = true\n",
            "ef".repeat(32)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(ccnode_verify())
        .args(["attest", "--url", &url(&node), "--policy"])
        .arg(&stranger)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("policy_ak") && l.contains("FAIL")),
        "{table}"
    );
}
