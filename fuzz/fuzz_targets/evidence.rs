//! The evidence document as a verifier receives it: `Evidence::from_json`
//! (bounded, strict JSON) and then the whole verifier
//! (`ccnode_attest::verify::verify`) with a fixed nonce and policy: base64
//! and hex fields, TPM structures, event logs, the simulated TEE document,
//! RFC 8785 canonicalisation of the claims.
//!
//! Beyond "no panic", checks that garbage never verifies: a random document
//! cannot carry a quote signed by the policy's (nonexistent) AK.
#![no_main]

use std::time::SystemTime;

use ccnode_attest::evidence::Evidence;
use ccnode_attest::verify::{verify, VerifierPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(evidence) = Evidence::from_json(data) else {
        return;
    };
    let policy = VerifierPolicy::from_toml(
        "allowed_aks = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\nallow_simulated_tee = true\n",
    )
    .expect("fixed policy");
    let result = verify(&evidence, &[7u8; 32], &policy, SystemTime::UNIX_EPOCH);
    assert!(!result.passed(), "fuzzed evidence verified");
    let _ = serde_json::to_string(&result);
});
