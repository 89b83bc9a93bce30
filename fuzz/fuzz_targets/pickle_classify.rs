//! The pickle recogniser: `ccnode_attest::oms::pickle::classify`, run on
//! every verified file that is not `.safetensors` before it is handed over.
//!
//! Chiefly "no panic, no runaway" on any bytes: the scan is bounded by
//! opcodes and line length, lengths skip rather than read, and the stack
//! model must not underflow its own counters. Also checks that anything
//! beginning with a protocol 2–5 header is refused, as a pickle or as an
//! archive. That the recogniser refuses what CPython would run is checked
//! against CPython itself in attest/tests/pickle_python.rs.
#![no_main]

use ccnode_attest::oms::pickle::{classify, Refusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let verdict = classify(data);
    if let [0x80, 2..=5, ..] = data {
        assert!(
            matches!(verdict, Some(Refusal::PickleHeader | Refusal::Container(_))),
            "{verdict:?}"
        );
    }
});
