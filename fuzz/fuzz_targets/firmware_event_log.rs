//! The firmware event log parser and replay
//! (`ccnode_attest::eventlog::firmware::replay`): the TCG crypto-agile log a
//! node includes in its evidence, parsed by the verifier.
//!
//! Beyond "no panic" (and no runaway memory or time: sizes, counts and
//! digests per event are bounded), checks that an accepted log replays only
//! PCRs 0-23 and counts at least its header.
#![no_main]

use ccnode_attest::eventlog::firmware::replay;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = replay(data) {
        assert!(r.events >= 1);
        assert!(r.pcrs.keys().all(|p| *p < 24));
    }
});
