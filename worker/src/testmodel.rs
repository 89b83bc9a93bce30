//! Tiny Llama-shaped test models, written by hand (no candle, no
//! downloads): an HF Llama `config.json`, a byte-level BPE `tokenizer.json`
//! and f32 safetensors weights, deterministic from a seed. The weights are
//! random: a model generated here produces gibberish, but it loads and runs
//! in candle's Llama (`candle_transformers::models::llama`) exactly as a
//! real checkpoint does, so every test, benchmark and the quick start can
//! serve a real, signed model.
//!
//! [`expected_tensors`] lists every tensor a Llama checkpoint of a given
//! shape must hold, with its shape, under the names candle's loader reads;
//! the worker checks a model against it before loading (candle's loader
//! panics on a missing tensor).
//!
//! Files written by [`write_model`]:
//!
//! - `config.json`
//! - `tokenizer.json`
//! - one shard: `model.safetensors`; N shards:
//!   `model-00001-of-0000N.safetensors` ... and
//!   `model.safetensors.index.json`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

/// Token id of `<s>` (beginning of sequence).
pub const BOS_TOKEN_ID: u32 = 256;
/// Token id of `</s>` (end of sequence).
pub const EOS_TOKEN_ID: u32 = 257;
/// The special tokens, in id order from [`BOS_TOKEN_ID`].
pub const SPECIAL_TOKENS: [&str; 2] = ["<s>", "</s>"];

/// Largest model [`write_model`] writes (bytes of f32 weights): a guard
/// against a mistyped shape filling the disk.
pub const MAX_MODEL_BYTES: u64 = 16 << 30;

/// The BPE merges, as raw text (a space is the byte-level symbol `Ġ`), in
/// rank order: each result becomes a token, ids from 258 on. Later merges
/// may use earlier results.
const MERGES: &[(&str, &str)] = &[
    (" ", "t"),
    ("h", "e"),
    (" ", "a"),
    (" ", "i"),
    ("i", "n"),
    (" t", "he"),
    ("e", "r"),
    ("o", "n"),
    (" ", "s"),
    ("r", "e"),
    ("a", "n"),
    (" ", "w"),
    (" ", "o"),
    ("e", "n"),
    ("a", "t"),
    ("o", "r"),
    ("e", "s"),
    (" ", "c"),
    (" ", "b"),
    (" ", "f"),
    ("in", "g"),
    ("e", "d"),
    (" ", "p"),
    (" ", "m"),
    ("o", "u"),
    ("i", "s"),
    ("i", "t"),
    ("a", "r"),
    ("a", "l"),
    ("l", "e"),
    (" a", "n"),
    (" an", "d"),
    (" o", "f"),
    (" t", "o"),
    (" i", "n"),
    (" ", "d"),
    (" ", "h"),
    (" ", "l"),
    (" ", "n"),
    (" ", "e"),
    ("o", "m"),
    ("l", "l"),
    (" i", "s"),
    (" ", "y"),
    (" y", "ou"),
    ("s", "t"),
    ("c", "h"),
    ("l", "y"),
];

/// The vocabulary size: 256 byte symbols, the special tokens, one token per
/// merge.
pub const VOCAB_SIZE: usize = 256 + SPECIAL_TOKENS.len() + MERGES.len();

/// A Llama model's dimensions, and how many safetensors files to split its
/// weights into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    /// Safetensors files (1: `model.safetensors`; more: HF-style shards
    /// with an index), split by layer.
    pub shards: usize,
}

impl Shape {
    /// About 0.11 M parameters (0.45 MB of f32): loads and generates in
    /// milliseconds, for tests.
    pub fn tiny() -> Shape {
        Shape {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            shards: 1,
        }
    }

    /// About 166 M parameters (663 MB of f32 in two shards), Llama's
    /// proportions (head dim 64, grouped-query attention, MLP 2.75x): one
    /// token costs about 40 ms on two CPU cores in f32 with candle 0.11
    /// (measured once, release build, 2-core AMD EPYC VM; every token reads
    /// all weights once), for benchmarks where per-token work must dominate
    /// the serving overhead.
    pub fn bench() -> Shape {
        Shape {
            hidden_size: 1024,
            intermediate_size: 2816,
            num_hidden_layers: 14,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            max_position_embeddings: 2048,
            shards: 2,
        }
    }

    /// Each head's dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks the shape is one candle's Llama can run and
    /// [`write_model`] can write.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("shards", self.shards),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is zero"));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if self.head_dim() % 2 != 0 {
            return Err("the head dimension is odd (rotary embeddings need it even)".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err("num_attention_heads is not a multiple of num_key_value_heads".into());
        }
        if self.shards > self.num_hidden_layers || self.shards > 99_999 {
            return Err("more shards than layers".into());
        }
        match total_bytes(self, VOCAB_SIZE) {
            Some(n) if n <= MAX_MODEL_BYTES => Ok(()),
            _ => Err(format!("the weights would exceed {MAX_MODEL_BYTES} bytes")),
        }
    }

    /// Number of parameters (with this module's vocabulary).
    pub fn parameters(&self) -> u64 {
        expected_tensors(self, VOCAB_SIZE)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Every tensor of a Llama checkpoint of `shape` with this module's
/// vocabulary ([`VOCAB_SIZE`]), with its shape: see [`expected_tensors`].
pub fn expected_names(shape: &Shape) -> Vec<(String, Vec<usize>)> {
    expected_tensors(shape, VOCAB_SIZE)
}

/// Every tensor an HF Llama checkpoint with untied embeddings must hold for
/// candle's loader, with its shape (`[out, in]` for projections), in the
/// order [`write_model`] writes them: embeddings, each layer, final norm,
/// output head. `shape.shards` plays no part.
pub fn expected_tensors(shape: &Shape, vocab_size: usize) -> Vec<(String, Vec<usize>)> {
    crate::shape::Dims {
        hidden_size: shape.hidden_size,
        intermediate_size: shape.intermediate_size,
        vocab_size,
        num_hidden_layers: shape.num_hidden_layers,
        num_attention_heads: shape.num_attention_heads,
        num_key_value_heads: shape.num_key_value_heads,
        max_position_embeddings: shape.max_position_embeddings,
        tie_word_embeddings: false,
    }
    .tensors()
}

fn total_bytes(shape: &Shape, vocab: usize) -> Option<u64> {
    let h = shape.hidden_size as u64;
    let q = (shape.head_dim() * shape.num_attention_heads) as u64;
    let kv = (shape.head_dim() as u64).checked_mul(shape.num_key_value_heads as u64)?;
    let i = shape.intermediate_size as u64;
    let per_layer = [
        h,
        q.checked_mul(h)?,
        kv.checked_mul(h)?.checked_mul(2)?,
        h.checked_mul(q)?,
        h,
        i.checked_mul(h)?.checked_mul(3)?,
    ]
    .iter()
    .try_fold(0u64, |a, b| a.checked_add(*b))?;
    (vocab as u64)
        .checked_mul(h)?
        .checked_mul(2)?
        .checked_add(h)?
        .checked_add(per_layer.checked_mul(shape.num_hidden_layers as u64)?)?
        .checked_mul(4)
}

/// The safetensors file names for `shape`, in order.
pub fn weight_files(shape: &Shape) -> Vec<String> {
    if shape.shards <= 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=shape.shards)
        .map(|k| format!("model-{k:05}-of-{:05}.safetensors", shape.shards))
        .collect()
}

/// Every file [`write_model`] writes for `shape`, sorted.
pub fn model_files(shape: &Shape) -> Vec<String> {
    let mut files = vec!["config.json".to_string(), "tokenizer.json".to_string()];
    files.extend(weight_files(shape));
    if shape.shards > 1 {
        files.push("model.safetensors.index.json".into());
    }
    files.sort();
    files
}

/// The tensors of each weight file: layers split evenly in order, the
/// embeddings in the first file, the final norm and output head in the last.
fn shard_plan(shape: &Shape) -> Vec<Vec<(String, Vec<usize>)>> {
    let all = expected_names(shape);
    let n = shape.shards.max(1);
    let layers = shape.num_hidden_layers;
    let per_layer = (all.len() - 3) / layers.max(1);
    let mut plan = Vec::with_capacity(n);
    for s in 0..n {
        let (first, last) = (s * layers / n, (s + 1) * layers / n);
        let mut shard = Vec::new();
        if s == 0 {
            shard.push(all[0].clone());
        }
        shard.extend_from_slice(&all[1 + first * per_layer..1 + last * per_layer]);
        if s == n - 1 {
            shard.extend_from_slice(&all[all.len() - 2..]);
        }
        plan.push(shard);
    }
    plan
}

/// Writes a model of `shape` into `dir` (created if missing), weights
/// deterministic from `seed`. Each file is written under a temporary name
/// and renamed into place; files of other names already in `dir` are left
/// alone (a signer would sign them too: write into an empty directory).
pub fn write_model(dir: &Path, shape: &Shape, seed: u64) -> io::Result<()> {
    shape
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("model shape: {e}")))?;
    fs::create_dir_all(dir)?;
    let files = weight_files(shape);
    let plan = shard_plan(shape);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (file, tensors) in files.iter().zip(&plan) {
        total += write_safetensors(&dir.join(file), tensors, seed)?;
        for (name, _) in tensors {
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
    }
    if shape.shards > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join("model.safetensors.index.json"), |w| {
            w.write_all(&pretty(&index))
        })?;
    }
    write_atomic(&dir.join("tokenizer.json"), |w| {
        w.write_all(&pretty(&tokenizer_json()))
    })?;
    write_atomic(&dir.join("config.json"), |w| {
        w.write_all(&pretty(&config_json(shape)))
    })?;
    Ok(())
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The HF Llama `config.json` for `shape`.
pub fn config_json(shape: &Shape) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": VOCAB_SIZE,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": shape.max_position_embeddings,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
    })
}

/// GPT-2's byte-to-symbol map: printable Latin-1 bytes stand for
/// themselves, the others (controls, space, 0x7f-0xa0, 0xad) for U+0100
/// onwards, in byte order. Space is `Ġ` (U+0120).
pub fn byte_symbol(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return char::from(b);
    }
    let index = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + index).unwrap_or('\u{fffd}')
}

fn symbols(text: &str) -> String {
    text.bytes().map(byte_symbol).collect()
}

/// The tokenizer, in the HF `tokenizers` JSON format: byte-level BPE,
/// byte symbols ids 0-255 (id = byte value), `<s>` 256 and `</s>` 257 as
/// special added tokens, then one token per merge. No normalizer and no
/// post-processor (nothing is added to an encoding): any text encodes, and
/// decodes back to itself.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_symbol(b).to_string(), json!(b));
    }
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(BOS_TOKEN_ID as usize + i));
    }
    let mut merges = Vec::with_capacity(MERGES.len());
    for (i, (l, r)) in MERGES.iter().enumerate() {
        let (l, r) = (symbols(l), symbols(r));
        vocab.insert(format!("{l}{r}"), json!(256 + SPECIAL_TOKENS.len() + i));
        merges.push(Value::String(format!("{l} {r}")));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "id": BOS_TOKEN_ID as usize + i,
                "content": t,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true,
            })
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    })
}

/// Writes `path` through `fill` under a temporary name in the same
/// directory, synced, then renamed into place; the temporary file is
/// removed on failure.
fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes one safetensors file; returns the bytes of tensor data.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)], seed: u64) -> io::Result<u64> {
    let mut header = String::from("{");
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}},",
            Value::String(name.clone()),
            dims.join(","),
            offset + bytes
        ));
        offset += bytes;
    }
    header.push_str("\"__metadata__\":{\"format\":\"pt\"}}");
    // The data starts 8-byte aligned: pad the header with spaces.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (name, shape) in tensors {
            let count = shape.iter().product::<usize>();
            let mut values = Values::new(seed, name);
            let mut left = count;
            while left > 0 {
                let n = left.min(1 << 14);
                buf.clear();
                for _ in 0..n {
                    buf.extend_from_slice(&values.next_f32().to_le_bytes());
                }
                w.write_all(&buf)?;
                left -= n;
            }
        }
        Ok(())
    })?;
    Ok(offset)
}

/// One tensor's values: 1.0 for RMSNorm weights, otherwise uniform in
/// [-0.05, 0.05) from a splitmix64 stream keyed by the seed and the
/// tensor's name (so each tensor is the same whatever the sharding).
struct Values {
    state: u64,
    ones: bool,
}

impl Values {
    fn new(seed: u64, name: &str) -> Values {
        // FNV-1a of the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Values {
            state: seed ^ h.rotate_left(17),
            ones: name.ends_with("norm.weight"),
        }
    }

    fn next_f32(&mut self) -> f32 {
        if self.ones {
            return 1.0;
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 24 random bits: exactly representable in f32.
        let unit = (z >> 40) as f32 / (1u32 << 24) as f32;
        (unit * 2.0 - 1.0) * 0.05
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// The header and data section of a safetensors file.
    fn split_safetensors(bytes: &[u8]) -> (&[u8], &[u8]) {
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        (&bytes[8..8 + len], &bytes[8 + len..])
    }

    /// Every tensor in `dir`'s weight files: name -> (file, shape, data).
    fn tensors(dir: &Path, shape: &Shape) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
        let mut out = BTreeMap::new();
        for file in weight_files(shape) {
            let bytes = fs::read(dir.join(&file)).unwrap();
            let (header, data) = split_safetensors(&bytes);
            assert_eq!((8 + header.len()) % 8, 0, "{file}: data not aligned");
            ccnode_attest::oms::safetensors::check_header(header, data.len() as u64)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let header: serde_json::Map<String, Value> = serde_json::from_slice(header).unwrap();
            assert_eq!(header["__metadata__"], json!({"format": "pt"}));
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                assert_eq!(info["dtype"], "F32");
                let dims: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
                let [start, end]: [usize; 2] =
                    serde_json::from_value(info["data_offsets"].clone()).unwrap();
                let values = data[start..end]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert!(out.insert(name, (file.clone(), dims, values)).is_none());
            }
        }
        out
    }

    #[test]
    fn tiny_model_has_every_expected_tensor_with_its_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let shape = Shape::tiny();
        write_model(tmp.path(), &shape, 1).unwrap();
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, model_files(&shape));
        assert_eq!(
            names,
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
        let found = tensors(tmp.path(), &shape);
        let expected = expected_names(&shape);
        assert_eq!(found.len(), expected.len());
        assert_eq!(expected.len(), 3 + 9 * shape.num_hidden_layers);
        for (name, dims) in &expected {
            let (_, got, values) = &found[name];
            assert_eq!(got, dims, "{name}");
            assert_eq!(values.len(), dims.iter().product::<usize>());
            if name.ends_with("norm.weight") {
                assert!(values.iter().all(|v| *v == 1.0), "{name}");
            } else {
                assert!(values.iter().all(|v| (-0.05..0.05).contains(v)), "{name}");
                let distinct: HashSet<u32> = values.iter().map(|v| v.to_bits()).collect();
                assert!(distinct.len() > values.len() / 2, "{name}: not random");
            }
        }
        // Names and shapes as candle's llama.rs loads them (head dim 16).
        assert_eq!(found["model.embed_tokens.weight"].1, [VOCAB_SIZE, 64]);
        assert_eq!(found["lm_head.weight"].1, [VOCAB_SIZE, 64]);
        assert_eq!(found["model.layers.1.self_attn.k_proj.weight"].1, [32, 64]);
        assert_eq!(found["model.layers.1.self_attn.o_proj.weight"].1, [64, 64]);
        assert_eq!(found["model.layers.0.mlp.down_proj.weight"].1, [64, 128]);
        assert_eq!(found["model.layers.0.mlp.gate_proj.weight"].1, [128, 64]);
        assert_eq!(
            shape.parameters(),
            found.values().map(|t| t.2.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn weights_are_deterministic_from_the_seed() {
        let tmp = tempfile::tempdir().unwrap();
        let shape = Shape::tiny();
        for (dir, seed) in [("a", 7), ("b", 7), ("c", 8)] {
            write_model(&tmp.path().join(dir), &shape, seed).unwrap();
        }
        let read = |d: &str| fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
        assert_eq!(read("a"), read("b"));
        assert_ne!(read("a"), read("c"));
        // Rewriting in place gives the same bytes and leaves no temporary file.
        write_model(&tmp.path().join("a"), &shape, 8).unwrap();
        assert_eq!(read("a"), read("c"));
        assert_eq!(fs::read_dir(tmp.path().join("a")).unwrap().count(), 3);
    }

    #[test]
    fn sharded_model_splits_by_layer_with_an_index() {
        let tmp = tempfile::tempdir().unwrap();
        let shape = Shape {
            num_hidden_layers: 5,
            shards: 3,
            ..Shape::tiny()
        };
        write_model(tmp.path(), &shape, 3).unwrap();
        assert_eq!(
            model_files(&shape),
            [
                "config.json",
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json"
            ]
        );
        for f in model_files(&shape) {
            assert!(tmp.path().join(&f).is_file(), "{f}");
        }
        let found = tensors(tmp.path(), &shape);
        let index = read_json(&tmp.path().join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), expected_names(&shape).len());
        let mut total = 0;
        for (name, dims) in expected_names(&shape) {
            let (file, got, values) = &found[&name];
            assert_eq!(got, &dims);
            assert_eq!(map[&name], file.as_str(), "{name}");
            total += values.len() * 4;
        }
        assert_eq!(index["metadata"]["total_size"], total);
        // Whole layers per file, embeddings first, head last.
        let file_of = |n: &str| found[n].0.clone();
        assert_eq!(
            file_of("model.embed_tokens.weight"),
            "model-00001-of-00003.safetensors"
        );
        assert_eq!(
            file_of("lm_head.weight"),
            "model-00003-of-00003.safetensors"
        );
        assert_eq!(
            file_of("model.norm.weight"),
            "model-00003-of-00003.safetensors"
        );
        for layer in 0..5 {
            let files: HashSet<String> = found
                .iter()
                .filter(|(n, _)| n.starts_with(&format!("model.layers.{layer}.")))
                .map(|(_, t)| t.0.clone())
                .collect();
            assert_eq!(files.len(), 1, "layer {layer} split across {files:?}");
        }
        // Each tensor is the same whatever the sharding.
        let one = tempfile::tempdir().unwrap();
        let unsharded = Shape {
            shards: 1,
            ..shape.clone()
        };
        write_model(one.path(), &unsharded, 3).unwrap();
        let single = tensors(one.path(), &unsharded);
        for (name, t) in &found {
            assert_eq!(t.2, single[name].2, "{name}");
        }
    }

    #[test]
    fn config_json_is_hf_llama() {
        let tmp = tempfile::tempdir().unwrap();
        write_model(tmp.path(), &Shape::tiny(), 0).unwrap();
        let c = read_json(&tmp.path().join("config.json"));
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["hidden_size"], 64);
        assert_eq!(c["intermediate_size"], 128);
        assert_eq!(c["vocab_size"], VOCAB_SIZE);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 10000.0);
        assert_eq!(c["max_position_embeddings"], 512);
        assert_eq!(c["bos_token_id"], BOS_TOKEN_ID);
        assert_eq!(c["eos_token_id"], EOS_TOKEN_ID);
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["torch_dtype"], "float32");
    }

    #[test]
    fn tokenizer_json_is_a_consistent_byte_level_bpe() {
        let tmp = tempfile::tempdir().unwrap();
        write_model(tmp.path(), &Shape::tiny(), 0).unwrap();
        let t = read_json(&tmp.path().join("tokenizer.json"));
        assert_eq!(t["version"], "1.0");
        assert_eq!(t["normalizer"], Value::Null);
        assert_eq!(t["post_processor"], Value::Null);
        assert_eq!(t["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(t["pre_tokenizer"]["add_prefix_space"], false);
        assert_eq!(t["pre_tokenizer"]["use_regex"], true);
        assert_eq!(t["decoder"]["type"], "ByteLevel");
        let m = &t["model"];
        assert_eq!(m["type"], "BPE");
        assert_eq!(m["byte_fallback"], false);
        assert_eq!(m["ignore_merges"], false);
        assert_eq!(m["unk_token"], Value::Null);
        let vocab: BTreeMap<String, usize> = serde_json::from_value(m["vocab"].clone()).unwrap();
        // Ids 0..VOCAB_SIZE, each once.
        let mut ids: Vec<usize> = vocab.values().copied().collect();
        ids.sort();
        assert_eq!(ids, (0..VOCAB_SIZE).collect::<Vec<_>>());
        // The 256 byte symbols, id = byte, all distinct single chars; space is Ġ.
        for b in 0..=255u8 {
            assert_eq!(vocab[&byte_symbol(b).to_string()], usize::from(b));
        }
        assert_eq!(byte_symbol(b' '), '\u{120}');
        assert_eq!(byte_symbol(b'a'), 'a');
        assert_eq!(byte_symbol(0), '\u{100}');
        assert_eq!(byte_symbol(0xad), '\u{143}');
        // Specials, in the vocabulary and as special added tokens.
        assert_eq!(vocab["<s>"], BOS_TOKEN_ID as usize);
        assert_eq!(vocab["</s>"], EOS_TOKEN_ID as usize);
        let added = t["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 2);
        for (a, (content, id)) in added.iter().zip([("<s>", 256), ("</s>", 257)]) {
            assert_eq!(a["content"], content);
            assert_eq!(a["id"], id);
            assert_eq!(a["special"], true);
        }
        // Every merge joins two tokens that exist before it, into a new one.
        let merges = m["merges"].as_array().unwrap();
        assert!(merges.len() >= 24);
        for (rank, merge) in merges.iter().enumerate() {
            let (l, r) = merge.as_str().unwrap().split_once(' ').unwrap();
            let id = 256 + SPECIAL_TOKENS.len() + rank;
            assert!(vocab[l] < id && vocab[r] < id, "{merge}");
            assert_eq!(vocab[&format!("{l}{r}")], id, "{merge}");
        }
        assert!(merges.iter().any(|m| m == "Ġt he"));
    }

    #[test]
    fn refuses_unusable_shapes() {
        let tmp = tempfile::tempdir().unwrap();
        let bad = [
            Shape {
                hidden_size: 0,
                ..Shape::tiny()
            },
            Shape {
                hidden_size: 66,
                ..Shape::tiny()
            },
            Shape {
                hidden_size: 66,
                num_attention_heads: 6,
                ..Shape::tiny()
            },
            Shape {
                num_key_value_heads: 3,
                ..Shape::tiny()
            },
            Shape {
                shards: 3,
                ..Shape::tiny()
            },
            Shape {
                shards: 0,
                ..Shape::tiny()
            },
            Shape {
                hidden_size: 1 << 20,
                num_attention_heads: 1 << 10,
                ..Shape::tiny()
            },
            Shape {
                intermediate_size: usize::MAX,
                ..Shape::tiny()
            },
        ];
        for shape in bad {
            assert!(shape.validate().is_err(), "{shape:?}");
            let err = write_model(tmp.path(), &shape, 0).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{shape:?}");
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
        Shape::tiny().validate().unwrap();
        Shape::bench().validate().unwrap();
    }

    #[test]
    fn model_verifier_accepts_the_files_signed() {
        use ccnode_attest::oms::{self, sign, PublicKey, TrustPolicy, VerifyOptions};
        for shape in [
            Shape::tiny(),
            Shape {
                shards: 2,
                ..Shape::tiny()
            },
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("model");
            write_model(&dir, &shape, 11).unwrap();
            let key = sign::key_from_seed(11);
            let sig = tmp.path().join("model.sig");
            fs::write(&sig, sign::sign_dir_p256(&dir, &key, "m").unwrap()).unwrap();
            let policy =
                TrustPolicy::global_key(PublicKey::from_pem(&sign::public_key_pem(&key)).unwrap());
            // Verification checks every .safetensors header too.
            let model = oms::verify_model(&dir, &sig, &policy, &VerifyOptions::new("m")).unwrap();
            let names: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(names, model_files(&shape));
        }
    }

    #[test]
    fn bench_shape_is_about_166m_parameters() {
        let p = Shape::bench().parameters();
        assert!((150_000_000..200_000_000).contains(&p), "{p}");
        assert_eq!(model_files(&Shape::bench()).len(), 5);
        assert!(Shape::tiny().parameters() < 1_000_000);
    }
}

/// Loads the generated files with the real consumers: the `tokenizers`
/// crate and candle's Llama.
#[cfg(all(test, feature = "engine"))]
mod engine_tests {
    use super::*;

    fn tokenizer(dir: &Path) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_bytes(fs::read(dir.join("tokenizer.json")).unwrap()).unwrap()
    }

    #[test]
    fn tokenizers_crate_loads_it_and_round_trips_text() {
        let tmp = tempfile::tempdir().unwrap();
        write_model(tmp.path(), &Shape::tiny(), 0).unwrap();
        let tok = tokenizer(tmp.path());
        assert_eq!(tok.get_vocab_size(true), VOCAB_SIZE);
        assert_eq!(tok.token_to_id("<s>"), Some(BOS_TOKEN_ID));
        assert_eq!(tok.token_to_id("</s>"), Some(EOS_TOKEN_ID));
        for text in [
            "",
            "the",
            "Hello, world! The cat sat on the mat and you ate it.",
            "  leading and trailing spaces  ",
            "tabs\tand\nnewlines\r\n",
            "Grüße, naïve café — 日本語のテキスト 🦀✓",
            "\u{0}\u{1f}\u{7f} control bytes",
            "1234567890 !@#$%^&*()",
        ] {
            for special in [false, true] {
                let enc = tok.encode(text, special).unwrap();
                assert!(enc.get_ids().iter().all(|id| (*id as usize) < VOCAB_SIZE));
                let back = tok.decode(enc.get_ids(), false).unwrap();
                assert_eq!(back, text, "special={special}");
            }
        }
        // Merges apply: " the" is one token, fewer tokens than bytes.
        let enc = tok.encode(" the", false).unwrap();
        assert_eq!(enc.get_tokens(), ["Ġthe"]);
        let enc = tok.encode(" and the", false).unwrap();
        assert_eq!(enc.get_tokens(), ["Ġand", "Ġthe"]);
        let text = "and the other thing in the end";
        let ids = tok.encode(text, false).unwrap().get_ids().len();
        assert!(ids < text.len() * 2 / 3, "{ids} tokens");
        // The specials are recognised as such and skipped on request.
        let enc = tok.encode("<s>hi</s>", false).unwrap();
        assert_eq!(enc.get_ids().first(), Some(&BOS_TOKEN_ID));
        assert_eq!(enc.get_ids().last(), Some(&EOS_TOKEN_ID));
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hi");
    }

    #[test]
    fn candle_llama_loads_and_runs_it() {
        use candle_core::{DType, Device, Tensor};
        use candle_transformers::models::llama;
        for shape in [
            Shape::tiny(),
            Shape {
                num_hidden_layers: 3,
                shards: 2,
                ..Shape::tiny()
            },
        ] {
            let tmp = tempfile::tempdir().unwrap();
            write_model(tmp.path(), &shape, 5).unwrap();
            let device = Device::Cpu;
            let config: llama::LlamaConfig =
                serde_json::from_slice(&fs::read(tmp.path().join("config.json")).unwrap()).unwrap();
            let config = config.into_config(false);
            let mut weights = std::collections::HashMap::new();
            for f in weight_files(&shape) {
                let bytes = fs::read(tmp.path().join(f)).unwrap();
                weights.extend(candle_core::safetensors::load_buffer(&bytes, &device).unwrap());
            }
            assert_eq!(weights.len(), expected_names(&shape).len());
            let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &device);
            let model = llama::Llama::load(vb, &config).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &config, &device).unwrap();
            let ids = tokenizer(tmp.path()).encode("the cat", false).unwrap();
            let input = Tensor::new(ids.get_ids(), &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&input, 0, &mut cache).unwrap();
            let logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            assert_eq!(logits.len(), VOCAB_SIZE);
            assert!(logits.iter().all(|v| v.is_finite()));
            // The next step with the cache, one token at a time.
            let next = Tensor::new(&[EOS_TOKEN_ID], &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&next, ids.len(), &mut cache).unwrap();
            assert_eq!(logits.squeeze(0).unwrap().dims(), [VOCAB_SIZE]);
        }
    }
}
