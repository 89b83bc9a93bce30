//! The persisted state file decoder: `ccnode_agent::persist::decode_state`.
//! The file is ours, but a crash, a full disk or a hand edit can leave
//! anything in it, and a bad file must quarantine the node, never crash it.
//!
//! Beyond "no panic", checks that a decoded record survives
//! `encode_state` and `decode_state` again unchanged, except that the file
//! keeps `since` to the millisecond, and that the re-encoding is a fixed
//! point (what ccnoded writes, it reads back as written).
#![no_main]

use std::time::{Duration, SystemTime};

use ccnode_agent::persist::{decode_state, encode_state, MAX_STATE_BYTES};
use ccnode_agent::state::NodeRecord;
use libfuzzer_sys::fuzz_target;

fn to_millis(t: SystemTime) -> SystemTime {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("RFC 3339 timestamps are not before 1970");
    SystemTime::UNIX_EPOCH + Duration::new(d.as_secs(), d.subsec_millis() * 1_000_000)
}

fuzz_target!(|data: &[u8]| {
    // load_state never passes more than this.
    if data.len() as u64 > MAX_STATE_BYTES {
        return;
    }
    let Ok(record) = decode_state(data) else {
        return;
    };
    let bytes = encode_state(&record).expect("a decoded record encodes");
    let again = decode_state(&bytes).unwrap_or_else(|e| {
        panic!(
            "encoded {:?} does not decode: {e}",
            String::from_utf8_lossy(&bytes)
        )
    });
    let expected = NodeRecord {
        since: to_millis(record.since),
        ..record
    };
    assert_eq!(again, expected);
    assert_eq!(encode_state(&again).expect("encodes"), bytes);
});
