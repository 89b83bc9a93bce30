//! The safetensors header check: `ccnode_attest::oms::safetensors::check_header`,
//! run on every verified `.safetensors` file before it is handed over.
//!
//! The first 8 input bytes choose the data section's length (kept small so
//! accepting inputs are reachable), the rest is the header. Beyond "no panic"
//! (overflowing shapes and offsets included), checks that an accepted header
//! is a JSON object that serde_json also parses.
#![no_main]

use ccnode_attest::oms::safetensors::check_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let data_len = u64::from_le_bytes(*len) % (1 << 20);
    if check_header(header, data_len).is_ok() {
        let value: serde_json::Value =
            serde_json::from_slice(header).expect("accepted header is JSON");
        assert!(value.is_object());
    }
});
