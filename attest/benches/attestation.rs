//! The attestation benchmark: evidence production through the library
//! ([`Attester::attest`]: claims digest, binding, PCR read, TPM quote,
//! simulated TEE report) against swtpm, at 1, 10 and 100 concurrent callers,
//! plus the verifier's time per evidence document. Library level: the HTTP
//! endpoint's figure is measured with the agent.
//!
//! Run: `cargo bench -p ccnode-attest --bench attestation`. Prints a table
//! and one `BENCH_JSON {...}` line. docs/benchmarks.md records the machine,
//! the command and the figures.
//!
//! | variable                   | default | meaning                                   |
//! |----------------------------|---------|-------------------------------------------|
//! | `CCNODE_BENCH_SCALE`       | 1.0     | multiplies the counts (0.05 = quick run)  |
//! | `CCNODE_BENCH_ATTESTS`     | 1000    | attestations per concurrency level        |
//! | `CCNODE_BENCH_VERIFIES`    | 1000    | verifications (one thread)                |
//! | `CCNODE_BENCH_AK`          | ecc-p256| attestation key algorithm (or rsa-2048)   |
//!
//! Without `--bench` (as under `cargo test --all-targets`) it is a smoke
//! run at scale 0.01, labelled as no measurement.
//!
//! Every caller runs on its own OS thread, as `spawn_blocking` callers do
//! in ccnoded; the TPM service serialises them, so latency at N callers is
//! about N times the single-caller latency and throughput stays flat: the
//! TPM is the bottleneck, by design (one TPM, one command at a time).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use ccnode_attest::eventlog::ccnode::event_type;
use ccnode_attest::evidence::{Claims, ModelClaim};
use ccnode_attest::tee::{SimulatedTee, Tee};
use ccnode_attest::tpm::{AkAlgorithm, TpmConfig, TpmService};
use ccnode_attest::verify::{verify, VerifierPolicy};
use ccnode_attest::Attester;
use ccnode_testkit::bench::{count, env_f64, Summary};
use ccnode_testkit::swtpm::Swtpm;
use serde_json::json;

fn claims() -> Claims {
    Claims {
        node_id: "bench-node".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        config_digest: format!("sha256:{}", "aa".repeat(32)),
        policy_digest: format!("sha256:{}", "bb".repeat(32)),
        node_state: "active".into(),
        node_state_reason: None,
        gpu: Some(json!({
            "backend": "sim",
            "simulated": true,
            "inventory": {"gpus": [{"uuid": "GPU-0", "driver": "550.90.07", "cc_mode": "off"}]},
        })),
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

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = env_f64("CCNODE_BENCH_SCALE", if measuring { 1.0 } else { 0.01 });
    let attests = count("CCNODE_BENCH_ATTESTS", 1000, scale, 10);
    let verifies = count("CCNODE_BENCH_VERIFIES", 1000, scale, 10);
    let alg: AkAlgorithm = std::env::var("CCNODE_BENCH_AK")
        .unwrap_or_else(|_| "ecc-p256".into())
        .parse()
        .expect("CCNODE_BENCH_AK");

    let tpm = Swtpm::start();
    let state = tempfile::tempdir().expect("state dir");
    let mut config = TpmConfig::new(state.path().join("ccnode-event-log.json"));
    config.tcti = tpm.tcti().parse().expect("tcti");
    config.ak_algorithm = alg;
    config.firmware_log = None;
    let started = Instant::now();
    let service = TpmService::open(config).expect("open tpm");
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    service
        .measure(event_type::POLICY_LOAD, json!({"digest": "sha256:bb"}))
        .expect("measure");
    service
        .measure(
            event_type::MODEL_LOAD,
            json!({"name": "tiny", "digest": format!("sha256:{}", "cc".repeat(32))}),
        )
        .expect("measure");
    let attester = Arc::new(Attester::new(
        Arc::new(service),
        Tee::Simulated(SimulatedTee::new([7; 32])),
    ));
    // Warm-up.
    for i in 0..5u8 {
        attester.attest(&[i; 32], claims()).expect("attest");
    }

    println!(
        "attestation benchmark ({}): swtpm {}, AK {}, AK open/create {:.1} ms",
        if measuring {
            "measured"
        } else {
            "smoke run, no measurement"
        },
        tpm.tcti(),
        alg.as_str(),
        open_ms
    );
    println!(
        "{:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "callers", "n", "p50 ms", "p99 ms", "mean ms", "max ms", "attests/s"
    );
    let mut rows = Vec::new();
    for callers in [1usize, 10, 100] {
        let per = (attests / callers).max(1);
        let barrier = Arc::new(Barrier::new(callers + 1));
        let threads: Vec<_> = (0..callers)
            .map(|t| {
                let a = attester.clone();
                let b = barrier.clone();
                std::thread::spawn(move || {
                    let mut lat = Vec::with_capacity(per);
                    b.wait();
                    for i in 0..per {
                        let mut nonce = [0u8; 32];
                        nonce[..8].copy_from_slice(&(t as u64).to_le_bytes());
                        nonce[8..16].copy_from_slice(&(i as u64).to_le_bytes());
                        let s = Instant::now();
                        a.attest(&nonce, claims()).expect("attest");
                        lat.push(s.elapsed());
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let wall = Instant::now();
        let mut all: Vec<Duration> = Vec::new();
        for t in threads {
            all.extend(t.join().expect("caller thread"));
        }
        let secs = wall.elapsed().as_secs_f64();
        let n = all.len();
        let s = Summary::of(&mut all);
        let rate = n as f64 / secs;
        println!(
            "{callers:>8} {n:>7} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {rate:>12.1}",
            s.p50 / 1e3,
            s.p99 / 1e3,
            s.mean / 1e3,
            s.max / 1e3
        );
        rows.push(json!({
            "callers": callers, "n": n, "p50_ms": s.p50 / 1e3, "p99_ms": s.p99 / 1e3,
            "mean_ms": s.mean / 1e3, "max_ms": s.max / 1e3, "per_second": rate,
        }));
    }

    // The verifier, on one evidence document.
    let nonce = [0x5a; 32];
    let evidence = attester.attest(&nonce, claims()).expect("attest");
    let policy = VerifierPolicy::from_toml(&format!(
        "allowed_aks = [\"{}\"]\nallow_simulated_tee = true\nallow_simulated_gpus = true\n",
        hex::encode(attester.tpm().ak().spki_sha256)
    ))
    .expect("policy");
    let mut lat = Vec::with_capacity(verifies);
    for _ in 0..verifies {
        let s = Instant::now();
        let r = verify(&evidence, &nonce, &policy, SystemTime::now());
        lat.push(s.elapsed());
        assert!(r.passed(), "{:?}", r.failed());
    }
    let v = Summary::of(&mut lat);
    println!(
        "verify (library, one thread): n {} p50 {:.3} ms p99 {:.3} ms; evidence {} bytes",
        v.n,
        v.p50 / 1e3,
        v.p99 / 1e3,
        evidence.to_json().len()
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "attestation", "measured": measuring, "ak": alg.as_str(),
            "ak_open_ms": open_ms, "attest": rows,
            "verify": {"n": v.n, "p50_ms": v.p50 / 1e3, "p99_ms": v.p99 / 1e3},
            "evidence_bytes": evidence.to_json().len(),
        })
    );
}
