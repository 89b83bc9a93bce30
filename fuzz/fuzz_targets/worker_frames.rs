//! Frames between ccnoded and an inference worker: each side treats the
//! other's bytes as untrusted (the worker is hostile; ccnoded's frames are
//! parsed by a process that must not crash on them either). Fuzzes the
//! bodies `ccnode_worker::protocol` parses, and the model-shape checks
//! the worker applies to config.json numbers before any tensor arithmetic.
//!
//! Beyond "no panic": a `Generate` that passes `check()` is within every
//! bound; a shape that passes `Dims::check` yields tensors whose sizes
//! multiply without overflow.
#![no_main]

use ccnode_worker::protocol::{self, Done, Generate, Load, Ready};
use ccnode_worker::shape::Dims;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(g) = protocol::parse::<Generate>(&frame) {
        if g.check().is_ok() {
            assert!(g.prompt.len() <= protocol::MAX_PROMPT_BYTES);
            assert!(g.max_tokens >= 1);
            assert!(g.stop.len() <= protocol::MAX_STOPS);
            // ccnoded's frames must fit what the worker reads.
            let encoded = serde_json::to_vec(&protocol::with_body("generate", &g)).unwrap();
            assert!(encoded.len() + 4 <= protocol::MAX_FRAME_TO_WORKER);
        }
    }
    let _ = protocol::parse::<Load>(&frame);
    let _ = protocol::parse::<Done>(&frame);
    let _ = protocol::parse::<Ready>(&frame);
    // Shape numbers as config.json gives them.
    let n = |k: &str| frame[k].as_u64().map(|v| v as usize).unwrap_or(1);
    let dims = Dims {
        hidden_size: n("hidden_size"),
        intermediate_size: n("intermediate_size"),
        vocab_size: n("vocab_size"),
        num_hidden_layers: n("num_hidden_layers"),
        num_attention_heads: n("num_attention_heads"),
        num_key_value_heads: n("num_key_value_heads"),
        max_position_embeddings: n("max_position_embeddings"),
        tie_word_embeddings: frame["tie_word_embeddings"] == true,
    };
    if dims.check().is_ok() {
        for (_, shape) in dims.tensors() {
            let elems = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                .expect("a checked shape cannot overflow");
            assert!(elems > 0);
        }
    }
});
