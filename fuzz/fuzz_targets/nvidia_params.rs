//! The NVIDIA driver's registry parameters (`/proc/driver/nvidia/params`),
//! read by the NVML backend to decide whether the driver scrubs memory on
//! free (`ccnode_gpu::scrub_on_free_from_params`), which is driver drift.
//!
//! Beyond "no panic": the answer is fail-closed. Whatever else the text
//! holds, appending a line that sets `RmDisableScrubOnFree` to a non-zero
//! value must make the answer `Disabled`.
#![no_main]

use ccnode_gpu::{scrub_on_free_from_params, ScrubOnFree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = scrub_on_free_from_params(&text);
    let disabled = format!("{text}\nRegistryDwords: \"RmDisableScrubOnFree=1\"\n");
    assert_eq!(scrub_on_free_from_params(&disabled), ScrubOnFree::Disabled);
});
