//! TDX quotes as a verifier receives them: `parse_quote` (bounded, strict:
//! header, TD report, signature data, QE report certification data, the
//! PEM PCK chain), then, for what parses, the signature-chain verification.
//!
//! Beyond "no panic", checks that garbage never verifies: at the Unix epoch
//! no PCK certificate is valid yet, so nothing may pass.
#![no_main]

use std::time::SystemTime;

use ccnode_attest::tee::tdx::{parse_quote, verify_quote};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(quote) = parse_quote(data) else {
        return;
    };
    let _ = quote.report.debug();
    assert!(
        verify_quote(&quote, SystemTime::UNIX_EPOCH).is_err(),
        "fuzzed quote verified"
    );
});
