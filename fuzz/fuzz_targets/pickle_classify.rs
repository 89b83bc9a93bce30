//! The pickle recogniser: `ccnode_attest::oms::pickle::classify`, run on
//! every verified file that is not `.safetensors` before it is handed over.
//!
//! Beyond "no panic, no runaway" (the scan is bounded by opcodes and line
//! length, and lengths skip rather than read), checks that anything
//! beginning with a protocol 2–5 header is refused, as a pickle or, where a
//! tar header sits at offset 257 as well, as an archive.
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
