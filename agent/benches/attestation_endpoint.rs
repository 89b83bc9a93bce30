//! The attestation endpoint benchmark, end to end: the real `ccnoded` on a
//! real TPM 2.0 emulator (swtpm), `POST /v1/attestation` through the
//! verifier's own client ([`fetch_evidence`]: a new connection per
//! request, as `ccnode-verify attest` makes), at 1, 10 and 100 concurrent
//! verifiers. In the same run, on a second swtpm, the library's
//! [`Attester::attest`] with the same claims at the same concurrency: the
//! peer that gives the cost of HTTP and of building the claims in the
//! daemon, as a ratio.
//!
//! Run: `cargo bench -p ccnode-agent --bench attestation_endpoint`. Prints a
//! table and one `BENCH_JSON {...}` line; docs/benchmarks.md records the
//! machine, the command and the figures.
//!
//! | variable                    | default  | meaning                                        |
//! |-----------------------------|----------|------------------------------------------------|
//! | `CCNODE_BENCH_SCALE`        | 1.0      | multiplies the count (0.05 = quick run)        |
//! | `CCNODE_BENCH_ATTESTS`      | 1000     | attestations per level, endpoint and library each |
//! | `CCNODE_BENCH_LEVELS`       | 1,10,100 | concurrent verifiers (comma-separated)         |
//! | `CCNODE_BENCH_VERIFY_EVERY` | 10       | verify every Nth endpoint response (1 = all)   |
//! | `CCNODE_BENCH_AK`           | ecc-p256 | attestation key algorithm (or rsa-2048)        |
//!
//! Every verifier is an OS thread doing its share of the level's count
//! back to back, each with a fresh 32-byte nonce from `/dev/urandom`. The
//! sampled responses are parsed and checked with [`verify`] after the timed
//! part (so verification does not take CPU from the daemon while it is
//! timed), against the AK the first response showed (trust on first use).
//! The daemon's rate limits are raised out of the way; any non-200 answer
//! fails the run.
//!
//! Since batched quotes (commit c6996aa) ccnoded answers verifiers that
//! wait together with one quote (`attestation.batch_max`); the library peer
//! stays at one quote per call, so the ratio then shows the batching gain.
//!
//! Without `--bench` (as under `cargo test --all-targets`) it is a smoke
//! run: 10 attestations at 1 and 4 verifiers, all verified, labelled as no
//! measurement.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ccnode_attest::client::fetch_evidence;
use ccnode_attest::eventlog::ccnode::event_type;
use ccnode_attest::tee::{SimulatedTee, Tee};
use ccnode_attest::tpm::key::AkPublicKey;
use ccnode_attest::tpm::{AkAlgorithm, TpmConfig, TpmService};
use ccnode_attest::{verify, Attester, Claims, Evidence, VerifierPolicy};
use ccnode_testkit::bench::{
    count, daemon_mean_ms, env_f64, loadavg, metric, random_nonce, run_level, Level,
};
use ccnode_testkit::swtpm::Swtpm;
use ccnode_testkit::{TestNode, PATIENCE};
use serde_json::json;

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = env_f64("CCNODE_BENCH_SCALE", if measuring { 1.0 } else { 0.01 });
    let attests = count("CCNODE_BENCH_ATTESTS", 1000, scale, 10);
    let verify_every = env_f64(
        "CCNODE_BENCH_VERIFY_EVERY",
        if measuring { 10.0 } else { 1.0 },
    ) as usize;
    assert!(
        verify_every >= 1,
        "CCNODE_BENCH_VERIFY_EVERY must be at least 1"
    );
    let levels: Vec<usize> = std::env::var("CCNODE_BENCH_LEVELS")
        .unwrap_or_else(|_| if measuring { "1,10,100" } else { "1,4" }.into())
        .split(',')
        .map(|l| l.trim().parse().expect("CCNODE_BENCH_LEVELS: numbers"))
        .collect();
    let alg: AkAlgorithm = std::env::var("CCNODE_BENCH_AK")
        .unwrap_or_else(|_| "ecc-p256".into())
        .parse()
        .expect("CCNODE_BENCH_AK");
    let load_before = loadavg();

    // The daemon, on its own swtpm, with the rate limits out of the way.
    let node_tpm = Swtpm::start();
    let started = Instant::now();
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
        .with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\ntee = \"simulated\"\n\
             firmware_log = \"\"\nak_algorithm = \"{}\"\nper_client_rate = 100000.0\n\
             per_client_burst = 100000\nglobal_rate = 100000.0\nglobal_burst = 100000\n\
             max_concurrent = 1024",
            node_tpm.tcti(),
            alg.as_str()
        ))
        .start();
    let node_start_ms = started.elapsed().as_secs_f64() * 1e3;
    let url: Arc<str> = node.attestation_url().into();

    // The first answer gives the AK (trust on first use) and the claims the
    // library peer will attest.
    let mut random = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let first_nonce = random_nonce(&mut random);
    let first = Evidence::from_json(&fetch_evidence(&url, &first_nonce, PATIENCE).expect("fetch"))
        .expect("evidence parses");
    let key = AkPublicKey::from_pem(&first.tpm.ak.public_pem).expect("ak pem");
    let ak = hex::encode(key.spki_sha256().expect("ak digest"));
    assert_eq!(first.tpm.ak.algorithm, alg.as_str(), "the daemon's AK");
    let policy = VerifierPolicy::from_toml(&format!(
        "allowed_aks = [\"{ak}\"]\nallow_simulated_tee = true\n"
    ))
    .expect("policy");
    let r = verify(&first, &first_nonce, &policy, SystemTime::now());
    assert!(r.passed(), "first evidence: {:?}", r.failed());
    let evidence_bytes = first.to_json().len();

    // The library peer: the same code path below HTTP, same AK algorithm,
    // same two start-up events, same claims.
    let lib_tpm = Swtpm::start();
    let lib_state = tempfile::tempdir().expect("state dir");
    let mut config = TpmConfig::new(lib_state.path().join("tpm-events.json"));
    config.tcti = lib_tpm.tcti().parse().expect("tcti");
    config.ak_algorithm = alg;
    config.firmware_log = None;
    let service = TpmService::open(config).expect("open tpm");
    service
        .measure(
            event_type::AGENT_START,
            json!({"version": env!("CARGO_PKG_VERSION")}),
        )
        .expect("measure");
    service
        .measure(
            event_type::POLICY_LOAD,
            json!({
                "config_digest": first.claims.config_digest,
                "policy_digest": first.claims.policy_digest,
            }),
        )
        .expect("measure");
    let attester = Arc::new(Attester::new(
        Arc::new(service),
        Tee::Simulated(SimulatedTee::new([7; 32])),
    ));
    let claims: Arc<Claims> = Arc::new(first.claims.clone());

    // Warm-up, both paths.
    for _ in 0..5 {
        fetch_evidence(&url, &random_nonce(&mut random), PATIENCE).expect("fetch");
        attester
            .attest(&random_nonce(&mut random), (*claims).clone())
            .expect("attest");
    }

    println!(
        "attestation_endpoint ({}): ccnoded on swtpm, AK {}, simulated TEE, ccnoded start {:.0} ms, evidence {} bytes",
        if measuring {
            "measurement"
        } else {
            "smoke run, no measurement"
        },
        alg.as_str(),
        node_start_ms,
        evidence_bytes
    );
    println!(
        "{:>9} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9}",
        "verifiers",
        "path",
        "n",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "max ms",
        "attests/s",
        "daemon ms",
        "end/lib"
    );
    let mut rows = Vec::new();
    let mut verified = 0usize;
    for &callers in &levels {
        let per = (attests / callers).max(1);

        // The library peer first, then the endpoint.
        let a = attester.clone();
        let c = claims.clone();
        let (lat, _, wall) = run_level::<(), _>(callers, per, move |_, n| {
            a.attest(&n, (*c).clone()).expect("attest");
            None
        });
        let lib = Level::of(lat, wall);

        let (_, before) = node.http_get("/metrics");
        let u = url.clone();
        let (lat, sampled, wall) = run_level(callers, per, move |i, n| {
            let body = fetch_evidence(&u, &n, PATIENCE).expect("fetch evidence");
            (i % verify_every == 0).then_some((n, body))
        });
        let end = Level::of(lat, wall);
        let (_, after) = node.http_get("/metrics");
        let daemon_ms = daemon_mean_ms(&before, &after);

        for (n, body) in &sampled {
            let e = Evidence::from_json(body).expect("evidence parses");
            let r = verify(&e, n, &policy, SystemTime::now());
            assert!(r.passed(), "evidence failed: {:?}", r.failed());
        }
        verified += sampled.len();

        let ratio = end.per_second / lib.per_second;
        for (path, l, d, q) in [
            ("library", &lib, String::new(), String::new()),
            (
                "endpoint",
                &end,
                format!("{daemon_ms:.2}"),
                format!("{ratio:.3}"),
            ),
        ] {
            let s = &l.summary;
            println!(
                "{callers:>9} {path:>9} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.1} {d:>9} {q:>9}",
                s.n,
                s.p50 / 1e3,
                s.p99 / 1e3,
                s.mean / 1e3,
                s.max / 1e3,
                l.per_second
            );
        }
        rows.push(json!({
            "verifiers": callers,
            "library": lib.json(),
            "endpoint": end.json(),
            "endpoint_daemon_mean_ms": daemon_ms,
            "endpoint_over_library_throughput": ratio,
            "verified": sampled.len(),
        }));
    }

    let (_, text) = node.http_get("/metrics");
    let ok = metric(&text, "ccnode_attestations_total{result=\"ok\"}").unwrap_or(0.0);
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("ccnode_attestations_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ok, total, "every attestation answered ok");
    let load_after = loadavg();
    println!(
        "  {verified} endpoint responses verified (1 in {verify_every}); daemon answered {ok} ok, {} otherwise; load {load_before} -> {load_after}",
        total - ok
    );
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "attestation_endpoint",
            "measuring": measuring,
            "ak": alg.as_str(),
            "node_start_ms": node_start_ms,
            "evidence_bytes": evidence_bytes,
            "levels": rows,
            "verified": verified,
            "daemon_ok": ok,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        })
    );
}
