//! The inference messages on the control socket between ccnoded and a
//! worker. Framing (4-byte big-endian length, JSON object with `v` and
//! `type`, size limits) is `ccnode_sandbox::control`; this module fixes the
//! message bodies. docs/inference.md documents the protocol.
//!
//! ```text
//! ccnoded ──load──▶ worker          (once, first frame after start)
//! ccnoded ◀─ready── worker          (weights loaded; or `error` and exit)
//! ccnoded ──generate{id}──▶ worker  (one at a time per worker)
//! ccnoded ◀─token{id}──── worker    (zero or more)
//! ccnoded ◀─done{id} | error{id}──  (exactly one)
//! ccnoded ──cancel{id}──▶ worker    (any time; a `done` still follows)
//! ccnoded ──health──▶ ◀─healthy──   (any time, answered even mid-generation)
//! ccnoded ──shutdown──▶ worker      (finish the current generation, exit 0)
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use ccnode_sandbox::control::{message, CONTROL_VERSION};

/// The worker's first fd after the control socket: model files arrive at
/// 4, 5, ... in the order the `load` message lists them.
pub const FIRST_MODEL_FD: i32 = 4;

/// Most model files one worker takes (config, tokenizer, shards): the jail
/// passes at most 64 fds, and the control socket is one of them.
pub const MAX_MODEL_FILES: usize = 63;

/// Largest prompt text accepted in a `generate`, bytes.
pub const MAX_PROMPT_BYTES: usize = 512 * 1024;

/// Largest frame the worker reads: a `generate` with the longest prompt,
/// JSON-escaped at worst 6 bytes per byte (`\u0000`), and its other
/// fields. ccnoded checks each encoded `generate` against it.
pub const MAX_FRAME_TO_WORKER: usize = 6 * MAX_PROMPT_BYTES + 64 * 1024;

/// Largest frame ccnoded reads from a worker: tokens, `done` and errors
/// are small; a worker that sends more is killed (protocol violation).
pub const MAX_FRAME_FROM_WORKER: usize = 64 * 1024;

/// Longest text one `token` frame may carry, bytes.
pub const MAX_TOKEN_TEXT: usize = 4096;

/// Most stop strings, and the longest one, in bytes.
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

/// One model file handed over as a sealed memfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// The path relative to the model directory, as signed.
    pub name: String,
    /// The fd number in the worker.
    pub fd: i32,
    /// Its size in bytes, as verified.
    pub size: u64,
}

/// `load`: what to serve and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// The model's name in ccnoded's config.
    pub model: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// With `cuda`: the GPU or MIG UUIDs the worker was granted
    /// (`GPU-…`/`MIG-…`); CUDA must show exactly these.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// The model files: `config.json`, `tokenizer.json`, safetensors.
    pub files: Vec<ModelFile>,
}

/// `generate`: one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    pub id: u64,
    pub prompt: String,
    pub max_tokens: u32,
    /// 0: greedy.
    pub temperature: f64,
    /// 1.0: no nucleus filtering.
    pub top_p: f64,
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Generate {
    /// Bounds a well-behaved ccnoded never exceeds; the worker checks them
    /// anyway.
    pub fn check(&self) -> Result<(), String> {
        if self.prompt.len() > MAX_PROMPT_BYTES {
            return Err(format!("prompt over {MAX_PROMPT_BYTES} bytes"));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens is 0".into());
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err("temperature outside [0, 2]".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("top_p outside (0, 1]".into());
        }
        if self.stop.len() > MAX_STOPS
            || self
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(format!(
                "at most {MAX_STOPS} stop strings of 1 to {MAX_STOP_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// Why a generation ended, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled by ccnoded.
    Cancelled,
}

/// `done`: the end of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub id: u64,
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Microseconds from the worker reading the `generate` frame to its
    /// first `token` frame (absent when it sent none): the worker's own
    /// share of the time to first token, as it reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_us: Option<u64>,
}

/// `ready`: the model is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub model: String,
    /// Parameters in the model.
    pub parameters: u64,
    /// The model's context length (prompt plus completion tokens).
    pub context_length: u32,
    pub device: String,
}

/// Stable error codes a worker reports.
pub mod codes {
    /// `load`: config.json names an architecture other than Llama.
    pub const UNSUPPORTED_ARCHITECTURE: &str = "unsupported_architecture";
    /// `load`: a tensor dtype other than F32, F16, BF16.
    pub const UNSUPPORTED_DTYPE: &str = "unsupported_dtype";
    /// `load`: config, tokenizer or weights malformed or inconsistent.
    pub const INVALID_MODEL: &str = "invalid_model";
    /// `load`: a model fd is not a sealed memfd, or its size differs.
    pub const UNSEALED_INPUT: &str = "unsealed_input";
    /// `load`: CUDA shows other devices than the ones granted.
    pub const DEVICE_MISMATCH: &str = "device_mismatch";
    /// `load`: the device cannot be used (no CUDA in this build, ...).
    pub const DEVICE_UNAVAILABLE: &str = "device_unavailable";
    /// `generate`: prompt plus max_tokens exceed the context length.
    pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";
    /// `generate`: a field out of bounds.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// `generate` while another one runs.
    pub const BUSY: &str = "busy";
    /// A tensor operation failed mid-generation.
    pub const ENGINE: &str = "engine_error";
    /// A frame the worker does not understand.
    pub const PROTOCOL: &str = "protocol_error";
}

/// A message of `kind` carrying `body`'s fields.
pub fn with_body(kind: &str, body: &impl Serialize) -> Value {
    let mut v = message(kind);
    if let (Some(obj), Ok(Value::Object(fields))) = (v.as_object_mut(), serde_json::to_value(body))
    {
        for (k, val) in fields {
            obj.insert(k, val);
        }
    }
    v
}

/// An `error` message; `id` for a generation, `None` for the worker itself.
pub fn error(id: Option<u64>, code: &str, message: &str) -> Value {
    let mut v = self::message("error");
    v["code"] = code.into();
    v["message"] = message.into();
    if let Some(id) = id {
        v["id"] = id.into();
    }
    v
}

/// A `token` message: text produced for generation `id`.
pub fn token(id: u64, text: &str) -> Value {
    let mut v = message("token");
    v["id"] = id.into();
    v["text"] = text.into();
    v
}

/// The body of a frame as `T`, ignoring the envelope fields.
pub fn parse<T: for<'de> Deserialize<'de>>(frame: &Value) -> Result<T, String> {
    let mut body = frame.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.remove("v");
        obj.remove("type");
    }
    serde_json::from_value(body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let g = Generate {
            id: 7,
            prompt: "hi".into(),
            max_tokens: 4,
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
            stop: vec!["\n".into()],
        };
        let v = with_body("generate", &g);
        assert_eq!(v["type"], "generate");
        assert_eq!(v["v"], CONTROL_VERSION);
        assert_eq!(parse::<Generate>(&v).unwrap(), g);
        let d = Done {
            id: 7,
            finish: Finish::Length,
            prompt_tokens: 2,
            completion_tokens: 4,
            first_token_us: None,
        };
        let v = with_body("done", &d);
        assert_eq!(v["finish"], "length");
        assert!(v.get("first_token_us").is_none(), "{v}");
        assert_eq!(parse::<Done>(&v).unwrap(), d);
        let d = Done {
            first_token_us: Some(1234),
            ..d
        };
        let v = with_body("done", &d);
        assert_eq!(v["first_token_us"], 1234);
        assert_eq!(parse::<Done>(&v).unwrap(), d);
    }

    #[test]
    fn unknown_fields_and_bad_bounds_are_refused() {
        let mut v = with_body(
            "load",
            &Load {
                model: "m".into(),
                device: "cpu".into(),
                gpus: vec![],
                files: vec![],
            },
        );
        v["extra"] = 1.into();
        assert!(parse::<Load>(&v).is_err());
        let ok = Generate {
            id: 1,
            prompt: "x".into(),
            max_tokens: 1,
            temperature: 1.0,
            top_p: 0.9,
            seed: 0,
            stop: vec![],
        };
        assert!(ok.check().is_ok());
        for bad in [
            Generate {
                max_tokens: 0,
                ..ok.clone()
            },
            Generate {
                temperature: 2.5,
                ..ok.clone()
            },
            Generate {
                top_p: 0.0,
                ..ok.clone()
            },
            Generate {
                stop: vec![String::new()],
                ..ok.clone()
            },
            Generate {
                stop: vec!["a".into(); 5],
                ..ok.clone()
            },
            Generate {
                prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
                ..ok.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
