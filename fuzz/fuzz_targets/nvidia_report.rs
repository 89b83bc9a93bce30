//! NVIDIA GPU CC evidence as a verifier receives it: the SPDM
//! GET_MEASUREMENTS report parser (`ccnode_attest::nvidia::parse_report`)
//! and the PEM chain parser (`parse_pem_chain`), then the whole
//! `verify_report` on the same bytes split into report and chain.
//!
//! Beyond "no panic", checks that garbage never verifies: a fuzzed report
//! cannot carry a signature by a device key NVIDIA's pinned root vouches for.
#![no_main]

use std::time::{Duration, SystemTime};

use ccnode_attest::nvidia::{parse_pem_chain, parse_report, verify_report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = parse_report(data) {
        assert_eq!(report.signed_len + 96, data.len());
        let _ = report.response.driver_version();
        let _ = report.response.vbios_version();
    }
    let _ = parse_pem_chain(data);
    // The first two bytes (LE) say where the report ends and the chain
    // begins.
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_le_bytes(*head)).min(rest.len());
    let (report, chain) = rest.split_at(split);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_200_000);
    assert!(
        verify_report(report, chain, &[0u8; 32], now).is_err(),
        "fuzzed nvidia evidence verified"
    );
});
