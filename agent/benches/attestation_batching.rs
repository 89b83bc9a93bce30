//! Batched quotes against one quote per request (issue 5's benchmark): two
//! `ccnoded`s, each on its own swtpm, identical but for
//! `attestation.batch_max` (256 and 1), driven in the same run by the same
//! verifier threads (`POST /v1/attestation` through the verifier's own
//! client, a new connection per request) at 1, 10, 100 and 500 concurrent
//! verifiers. Throughput and p99 latency for each, and batched over
//! per-request throughput as a ratio. Every tenth answer is verified with
//! its own nonce (a batched one through its inclusion proof).
//!
//! Run: `cargo bench -p ccnode-agent --bench attestation_batching`. Prints a
//! table and one `BENCH_JSON {...}` line; docs/benchmarks.md records them.
//!
//! | variable                    | default        | meaning                                |
//! |-----------------------------|----------------|----------------------------------------|
//! | `CCNODE_BENCH_SCALE`        | 1.0            | multiplies the count                   |
//! | `CCNODE_BENCH_ATTESTS`      | 2000           | attestations per level and mode        |
//! | `CCNODE_BENCH_LEVELS`       | 1,10,100,500   | concurrent verifiers                   |
//!
//! Without `--bench` (as under `cargo test --all-targets`) it is a smoke
//! run: a few attestations at 1 and 8 verifiers, labelled as no measurement.

use std::sync::Arc;
use std::time::SystemTime;

use ccnode_attest::client::fetch_evidence;
use ccnode_attest::tpm::key::AkPublicKey;
use ccnode_attest::{verify, Evidence, VerifierPolicy};
use ccnode_testkit::bench::{
    count, daemon_mean_ms, env_f64, loadavg, metric, random_nonce, run_level, Level,
};
use ccnode_testkit::swtpm::Swtpm;
use ccnode_testkit::{TestNode, PATIENCE};
use serde_json::json;

/// A ccnoded on its own swtpm with `batch_max`, rate limits out of the way.
fn node(batch_max: usize) -> (Swtpm, TestNode, Arc<str>, VerifierPolicy) {
    let tpm = Swtpm::start();
    let node = TestNode::new(env!("CARGO_BIN_EXE_ccnoded"))
        .with_attestation(&format!(
            "enabled = true\nlisten = \"127.0.0.1:0\"\ntcti = \"{}\"\ntee = \"simulated\"\n\
             firmware_log = \"\"\nper_client_rate = 100000.0\nper_client_burst = 100000\n\
             global_rate = 100000.0\nglobal_burst = 100000\nmax_concurrent = 4096\n\
             batch_max = {batch_max}\nrequest_timeout = \"60s\"",
            tpm.tcti()
        ))
        .start();
    let url: Arc<str> = node.attestation_url().into();
    let mut random = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let n = random_nonce(&mut random);
    let first = Evidence::from_json(&fetch_evidence(&url, &n, PATIENCE).expect("fetch"))
        .expect("evidence parses");
    let ak = AkPublicKey::from_pem(&first.tpm.ak.public_pem).expect("ak pem");
    let policy = VerifierPolicy::from_toml(&format!(
        "allowed_aks = [\"{}\"]\nallow_simulated_tee = true\n",
        hex::encode(ak.spki_sha256().expect("ak digest"))
    ))
    .expect("policy");
    assert!(verify(&first, &n, &policy, SystemTime::now()).passed());
    for _ in 0..5 {
        fetch_evidence(&url, &random_nonce(&mut random), PATIENCE).expect("warm-up");
    }
    (tpm, node, url, policy)
}

/// One level against one node: figures, the daemon's mean time per quote,
/// the mean batch size, and how many answers were verified.
fn level(
    node: &TestNode,
    url: &Arc<str>,
    policy: &VerifierPolicy,
    callers: usize,
    per: usize,
) -> (Level, f64, f64, usize) {
    let (_, before) = node.http_get("/metrics");
    let u = url.clone();
    let (lat, sampled, wall) = run_level(callers, per, move |i, n| {
        let body = fetch_evidence(&u, &n, PATIENCE).expect("fetch evidence");
        (i % 10 == 0).then_some((n, body))
    });
    let (_, after) = node.http_get("/metrics");
    for (n, body) in &sampled {
        let e = Evidence::from_json(body).expect("evidence parses");
        let r = verify(&e, n, policy, SystemTime::now());
        assert!(r.passed(), "evidence failed: {:?}", r.failed());
    }
    let get = |t: &str, m: &str| metric(t, m).unwrap_or(0.0);
    let verifiers = get(&after, "ccnode_attestation_batch_size_sum")
        - get(&before, "ccnode_attestation_batch_size_sum");
    let quotes = get(&after, "ccnode_attestation_batch_size_count")
        - get(&before, "ccnode_attestation_batch_size_count");
    let mean_batch = if quotes > 0.0 {
        verifiers / quotes
    } else {
        0.0
    };
    (
        Level::of(lat, wall),
        daemon_mean_ms(&before, &after),
        mean_batch,
        sampled.len(),
    )
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = env_f64("CCNODE_BENCH_SCALE", if measuring { 1.0 } else { 0.01 });
    let attests = count("CCNODE_BENCH_ATTESTS", 2000, scale, 16);
    let levels: Vec<usize> = std::env::var("CCNODE_BENCH_LEVELS")
        .unwrap_or_else(|_| if measuring { "1,10,100,500" } else { "1,8" }.into())
        .split(',')
        .map(|l| l.trim().parse().expect("CCNODE_BENCH_LEVELS: numbers"))
        .collect();
    let load_before = loadavg();
    let (_t1, batched, batched_url, batched_policy) = node(256);
    let (_t2, single, single_url, single_policy) = node(1);

    println!(
        "attestation_batching ({}): two ccnoded on swtpm (ECC AK, simulated TEE), batch_max 256 vs 1",
        if measuring {
            "measurement"
        } else {
            "smoke run, no measurement"
        }
    );
    println!(
        "{:>9} {:>11} {:>6} {:>8} {:>8} {:>10} {:>10} {:>10} {:>8}",
        "verifiers", "mode", "n", "p50 ms", "p99 ms", "attests/s", "ms/quote", "per quote", "ratio"
    );
    let mut rows = Vec::new();
    let mut verified = 0;
    for &callers in &levels {
        let per = (attests / callers).max(2);
        // Alternate which goes first, so neither always runs on a warmer
        // machine.
        let (one, b) = if rows.len() % 2 == 0 {
            let one = level(&single, &single_url, &single_policy, callers, per);
            let b = level(&batched, &batched_url, &batched_policy, callers, per);
            (one, b)
        } else {
            let b = level(&batched, &batched_url, &batched_policy, callers, per);
            let one = level(&single, &single_url, &single_policy, callers, per);
            (one, b)
        };
        verified += one.3 + b.3;
        let ratio = b.0.per_second / one.0.per_second;
        for (mode, l, r) in [
            ("per-request", &one, String::new()),
            ("batched", &b, format!("{ratio:.2}")),
        ] {
            let s = &l.0.summary;
            println!(
                "{callers:>9} {mode:>11} {:>6} {:>8.2} {:>8.2} {:>10.1} {:>10.2} {:>10.1} {r:>8}",
                s.n,
                s.p50 / 1e3,
                s.p99 / 1e3,
                l.0.per_second,
                l.1,
                l.2
            );
        }
        rows.push(json!({
            "verifiers": callers,
            "per_request": one.0.json(),
            "per_request_ms_per_quote": one.1,
            "batched": b.0.json(),
            "batched_ms_per_quote": b.1,
            "batched_mean_batch": b.2,
            "batched_over_per_request_throughput": ratio,
        }));
    }
    let load_after = loadavg();
    println!("  {verified} answers verified; load {load_before} -> {load_after}");
    println!(
        "BENCH_JSON {}",
        json!({
            "bench": "attestation_batching",
            "measuring": measuring,
            "levels": rows,
            "verified": verified,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        })
    );
    drop(batched);
    drop(single);
}
