//! The candle engine: a Llama-family model loaded from verified bytes, and
//! text generation (greedy or sampled, stop strings, streaming).
//!
//! Everything a model directory says is checked before candle sees it:
//! the architecture, every dimension against a cap, every tensor's name,
//! shape and dtype. candle's Llama loader panics on a missing tensor; a
//! panic here would be a crash of the worker, so nothing reaches the loader
//! that it could fail on.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};

use crate::protocol::{codes, Finish, MAX_TOKEN_TEXT};
use crate::shape;

/// Largest config.json accepted, bytes.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Largest tokenizer.json accepted, bytes.
pub const MAX_TOKENIZER_BYTES: usize = 64 * 1024 * 1024;

/// Most prompt tokens (BOS included) one generation takes, whatever the
/// model's context length: what bounds a prefill's KV cache and its cached
/// attention masks (about prompt² / 2 bytes with [`PREFILL_CHUNK`]), so a
/// long prompt on a long-context model cannot take a shared worker's
/// memory. Longer prompts are refused, `context_length_exceeded`.
pub const MAX_PROMPT_TOKENS: usize = 8192;

/// Prompt tokens per prefill forward pass: a layer's attention scores are
/// then at most heads × 256 × [`MAX_PROMPT_TOKENS`] f32 (256 MiB for 32
/// heads; candle holds a few such tensors at once), not heads × prompt².
pub const PREFILL_CHUNK: usize = 256;

/// Fixes the number of threads candle computes with, once, to what candle
/// itself would pick, and returns it. Without `RAYON_NUM_THREADS` candle
/// counts the physical cores anew on every matrix product
/// (`num_cpus::get_physical`, which reads and parses `/proc/cpuinfo`): on
/// the benchmark model about 130 reads of some 20 µs each per forward
/// (docs/benchmarks.md, "Inference overhead"). A `RAYON_NUM_THREADS`
/// already set is kept. Call it before any other thread starts (it sets
/// an environment variable); it also sizes rayon's global pool, to the
/// physical cores rather than the logical ones.
pub fn pin_thread_count() -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let n = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// A failure with its stable code (`protocol::codes`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct EngineError {
    pub code: &'static str,
    pub message: String,
}

impl EngineError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        EngineError {
            code,
            message: message.into(),
        }
    }
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::new(codes::INVALID_MODEL, message)
}

fn engine(e: candle_core::Error) -> EngineError {
    EngineError::new(codes::ENGINE, e.to_string())
}

/// One generation, as the engine takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: String,
    pub max_tokens: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// A loaded model.
pub struct Engine {
    model: Llama,
    empty_cache: Cache,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    bos: Option<u32>,
    eos: Vec<u32>,
    context_length: u32,
    parameters: u64,
    /// [`MAX_PROMPT_TOKENS`] and [`PREFILL_CHUNK`], smaller in tests.
    max_prompt_tokens: usize,
    prefill_chunk: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device)
            .field("context_length", &self.context_length)
            .field("parameters", &self.parameters)
            .finish_non_exhaustive()
    }
}

/// Parses and bounds `config.json`: a Llama, with every dimension capped.
pub fn parse_config(bytes: &[u8]) -> Result<(LlamaConfig, shape::Dims), EngineError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(invalid(format!(
            "config.json is over {MAX_CONFIG_BYTES} bytes"
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("config.json is not JSON: {e}")))?;
    // `architectures`, when present, must name Llama; without it,
    // `model_type` must.
    let arch_ok = match v["architectures"].as_array() {
        Some(a) => a.iter().any(|x| x == "LlamaForCausalLM"),
        None => v["model_type"] == "llama",
    };
    if !arch_ok {
        return Err(EngineError::new(
            codes::UNSUPPORTED_ARCHITECTURE,
            format!(
                "config.json describes {} (model_type {}); this worker serves the Llama family only",
                v["architectures"], v["model_type"]
            ),
        ));
    }
    if let Some(t) = v["torch_dtype"].as_str() {
        if !matches!(t, "float32" | "float16" | "bfloat16") {
            return Err(EngineError::new(
                codes::UNSUPPORTED_DTYPE,
                format!("torch_dtype {t:?}: only float32, float16 and bfloat16 are served"),
            ));
        }
    }
    let cfg: LlamaConfig = serde_json::from_value(v)
        .map_err(|e| invalid(format!("config.json is not a Llama config: {e}")))?;
    let dims = shape::Dims {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads(),
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
    };
    dims.check().map_err(invalid)?;
    if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps > 0.0 && cfg.rms_norm_eps < 1.0) {
        return Err(invalid("rms_norm_eps must be in (0, 1)"));
    }
    if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
        return Err(invalid("rope_theta must be positive"));
    }
    if let Some(r) = &cfg.rope_scaling {
        let ok = [r.factor, r.low_freq_factor, r.high_freq_factor]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
            && r.high_freq_factor != r.low_freq_factor
            && r.original_max_position_embeddings > 0;
        if !ok {
            return Err(invalid("rope_scaling has non-positive or equal factors"));
        }
    }
    // The BOS id goes into every prompt, into the embedding lookup; an EOS
    // id is compared with sampled ids, which are all below vocab_size. Out
    // of range, the first would be a device-side assert on CUDA, the second
    // a model that never stops.
    let eos: &[u32] = match &cfg.eos_token_id {
        Some(LlamaEosToks::Single(t)) => std::slice::from_ref(t),
        Some(LlamaEosToks::Multiple(ts)) => ts,
        None => &[],
    };
    for (key, id) in cfg
        .bos_token_id
        .iter()
        .map(|t| ("bos_token_id", t))
        .chain(eos.iter().map(|t| ("eos_token_id", t)))
    {
        if *id as usize >= dims.vocab_size {
            return Err(invalid(format!(
                "{key} {id} is not below vocab_size {}",
                dims.vocab_size
            )));
        }
    }
    Ok((cfg, dims))
}

fn is_weights(name: &str) -> bool {
    name.ends_with(".safetensors")
}

impl Engine {
    /// Loads a model from its files' bytes (`config.json`, `tokenizer.json`
    /// and the safetensors shards; other files are ignored) onto `device`.
    pub fn load(files: &[(&str, &[u8])], device: &Device) -> Result<Engine, EngineError> {
        let find = |n: &str| files.iter().find(|(name, _)| *name == n).map(|(_, b)| *b);
        let config = find("config.json").ok_or_else(|| invalid("no config.json"))?;
        let (llama_cfg, dims) = parse_config(config)?;
        let tok_bytes = find("tokenizer.json").ok_or_else(|| invalid("no tokenizer.json"))?;
        if tok_bytes.len() > MAX_TOKENIZER_BYTES {
            return Err(invalid(format!(
                "tokenizer.json is over {MAX_TOKENIZER_BYTES} bytes"
            )));
        }
        let tokenizer = tokenizers::Tokenizer::from_bytes(tok_bytes)
            .map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
        // Every id the tokenizer can produce indexes the embedding table
        // (an id out of range is, on CUDA, a device-side assert that
        // poisons the context): the largest, added tokens included, must be
        // below vocab_size. Ids may be sparse, so the count is not enough.
        if let Some(top) = tokenizer.get_vocab(true).into_values().max() {
            if top as usize >= dims.vocab_size {
                return Err(invalid(format!(
                    "the tokenizer has token id {top}, the model only {} embeddings",
                    dims.vocab_size
                )));
            }
        }
        // Every shard's tensors, each name once.
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut shards = 0;
        for (name, bytes) in files.iter().filter(|(n, _)| is_weights(n)) {
            shards += 1;
            let loaded = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
                .map_err(|e| invalid(format!("{name}: {e}")))?;
            for (t, v) in loaded {
                if !matches!(v.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                    return Err(EngineError::new(
                        codes::UNSUPPORTED_DTYPE,
                        format!(
                            "{name}: tensor {t} is {:?}; only F32, F16 and BF16",
                            v.dtype()
                        ),
                    ));
                }
                if tensors.insert(t.clone(), v).is_some() {
                    return Err(invalid(format!("tensor {t} appears in two shards")));
                }
            }
        }
        if shards == 0 {
            return Err(invalid("no .safetensors file"));
        }
        for (t, want) in dims.tensors() {
            let Some(have) = tensors.get(&t) else {
                return Err(invalid(format!("tensor {t} is missing")));
            };
            if have.dims() != want.as_slice() {
                return Err(invalid(format!(
                    "tensor {t} has shape {:?}, the config implies {want:?}",
                    have.dims()
                )));
            }
        }
        let parameters = tensors.values().map(|t| t.elem_count() as u64).sum();
        // CPU computes in f32; a GPU in the stored precision.
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            tensors
                .get("model.embed_tokens.weight")
                .map(|t| t.dtype())
                .unwrap_or(DType::F32)
        };
        let mut on_device = HashMap::with_capacity(tensors.len());
        for (k, v) in tensors {
            let v = v.to_dtype(dtype).and_then(|v| v.to_device(device));
            on_device.insert(k, v.map_err(engine)?);
        }
        let cfg: Config = llama_cfg.into_config(false);
        let vb = VarBuilder::from_tensors(on_device, dtype, device);
        let model = Llama::load(vb, &cfg).map_err(|e| invalid(e.to_string()))?;
        let empty_cache = Cache::new(true, dtype, &cfg, device).map_err(engine)?;
        let eos = match &cfg.eos_token_id {
            Some(LlamaEosToks::Single(t)) => vec![*t],
            Some(LlamaEosToks::Multiple(ts)) => ts.clone(),
            None => Vec::new(),
        };
        Ok(Engine {
            model,
            empty_cache,
            tokenizer,
            device: device.clone(),
            bos: cfg.bos_token_id,
            eos,
            context_length: u32::try_from(dims.max_position_embeddings).unwrap_or(u32::MAX),
            parameters,
            max_prompt_tokens: MAX_PROMPT_TOKENS,
            prefill_chunk: PREFILL_CHUNK,
        })
    }

    /// The same engine with other prompt limits (tests: the tiny model's
    /// context is far below [`MAX_PROMPT_TOKENS`]).
    #[cfg(test)]
    fn with_prompt_limits(mut self, max_prompt_tokens: usize, prefill_chunk: usize) -> Self {
        self.max_prompt_tokens = max_prompt_tokens;
        self.prefill_chunk = prefill_chunk.max(1);
        self
    }

    pub fn context_length(&self) -> u32 {
        self.context_length
    }

    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    /// The prompt's token ids (BOS first when the model has one).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| EngineError::new(codes::INVALID_REQUEST, e.to_string()))?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Generates for `req`, giving each piece of text to `emit` as soon as
    /// it is whole (never half a UTF-8 character, never text of a stop
    /// string, never more than [`MAX_TOKEN_TEXT`] bytes). `cancelled` is
    /// asked before every forward pass.
    pub fn generate(
        &self,
        req: &Request,
        cancelled: &dyn Fn() -> bool,
        emit: &mut dyn FnMut(&str),
    ) -> Result<Outcome, EngineError> {
        let prompt = self.encode(&req.prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::new(
                codes::INVALID_REQUEST,
                "the prompt is empty",
            ));
        }
        let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        if prompt.len() > self.max_prompt_tokens {
            return Err(EngineError::new(
                codes::CONTEXT_LENGTH_EXCEEDED,
                format!(
                    "{prompt_tokens} prompt tokens exceed the worker's limit of {} per prompt",
                    self.max_prompt_tokens
                ),
            ));
        }
        if u64::from(prompt_tokens) + u64::from(req.max_tokens) > u64::from(self.context_length) {
            return Err(EngineError::new(
                codes::CONTEXT_LENGTH_EXCEEDED,
                format!(
                    "{prompt_tokens} prompt tokens plus max_tokens {} exceed the context length {}",
                    req.max_tokens, self.context_length
                ),
            ));
        }
        let sampling = if req.temperature < 1e-7 {
            Sampling::ArgMax
        } else if req.top_p < 1.0 {
            Sampling::TopP {
                p: req.top_p,
                temperature: req.temperature,
            }
        } else {
            Sampling::All {
                temperature: req.temperature,
            }
        };
        let mut sampler = LogitsProcessor::from_sampling(req.seed, sampling);
        let mut cache = self.empty_cache.clone();
        let mut text = TextStream::new(&req.stop);
        let mut generated: Vec<u32> = Vec::new();
        let outcome = |finish, n: usize| Outcome {
            finish,
            prompt_tokens,
            completion_tokens: u32::try_from(n).unwrap_or(u32::MAX),
        };
        if req.max_tokens == 0 {
            return Ok(outcome(Finish::Length, 0));
        }
        // The prompt in chunks of `prefill_chunk` tokens, each attending to
        // the cache of those before: attention holds heads × chunk ×
        // (position + chunk) scores at a time, not heads × prompt².
        let mut pos = 0usize;
        let mut logits = None;
        for chunk in prompt.chunks(self.prefill_chunk) {
            if cancelled() {
                return Ok(outcome(Finish::Cancelled, 0));
            }
            logits = Some(self.forward(chunk, pos, &mut cache)?);
            pos += chunk.len();
        }
        let Some(mut logits) = logits else {
            return Err(EngineError::new(codes::ENGINE, "no prompt was run"));
        };
        loop {
            let next = sampler.sample(&logits).map_err(engine)?;
            if self.eos.contains(&next) {
                let n = generated.len() + 1;
                return Ok(self.finish(&generated, &mut text, emit, || outcome(Finish::Stop, n)));
            }
            generated.push(next);
            let piece = self.decode_tail(&generated, &mut text.prev, &mut text.cur)?;
            let (out, stopped) = text.push(&piece);
            emit_pieces(emit, &out);
            if stopped {
                return Ok(outcome(Finish::Stop, generated.len()));
            }
            if cancelled() {
                return Ok(outcome(Finish::Cancelled, generated.len()));
            }
            if generated.len() >= req.max_tokens as usize {
                return Ok(self.finish(&generated, &mut text, emit, || {
                    outcome(Finish::Length, generated.len())
                }));
            }
            logits = self.forward(&[next], pos, &mut cache)?;
            pos += 1;
        }
    }

    /// The logits after `tokens`, the first of them at position `pos`.
    fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        cache: &mut Cache,
    ) -> Result<Tensor, EngineError> {
        Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .and_then(|x| self.model.forward(&x, pos, cache))
            .and_then(|l| l.squeeze(0))
            .map_err(engine)
    }

    /// The end of a generation: what the decoder held back (an incomplete
    /// character at the very end decodes as U+FFFD, as a whole decode
    /// would), then what the stop filter held back. A stop string completed
    /// by the tail still cuts.
    fn finish(
        &self,
        tokens: &[u32],
        text: &mut TextStream,
        emit: &mut dyn FnMut(&str),
        outcome: impl FnOnce() -> Outcome,
    ) -> Outcome {
        let mut out = outcome();
        let tail = self.decode_rest(tokens, text.prev, text.cur);
        let (piece, stopped) = text.push(&tail);
        emit_pieces(emit, &piece);
        if stopped {
            out.finish = Finish::Stop;
        } else {
            emit_pieces(emit, &text.flush());
        }
        out
    }

    /// Whatever `tokens[prev..]` decodes to beyond what was emitted of it.
    fn decode_rest(&self, tokens: &[u32], prev: usize, cur: usize) -> String {
        let decode = |t: &[u32]| self.tokenizer.decode(t, true).unwrap_or_default();
        if prev >= tokens.len() {
            return String::new();
        }
        let before = if prev < cur {
            decode(&tokens[prev..cur])
        } else {
            String::new()
        };
        let all = decode(&tokens[prev..]);
        match all.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_owned(),
            None => String::new(),
        }
    }

    /// The new whole text since the last call (candle's TokenOutputStream
    /// scheme: decode from a window start, emit only complete characters).
    fn decode_tail(
        &self,
        tokens: &[u32],
        prev: &mut usize,
        cur: &mut usize,
    ) -> Result<String, EngineError> {
        let decode = |t: &[u32]| {
            self.tokenizer
                .decode(t, true)
                .map_err(|e| EngineError::new(codes::ENGINE, e.to_string()))
        };
        let before = if *prev < *cur {
            decode(&tokens[*prev..*cur])?
        } else {
            String::new()
        };
        let all = decode(&tokens[*prev..])?;
        if all.len() > before.len() && !all.ends_with('\u{fffd}') && all.starts_with(&before) {
            let new = all[before.len()..].to_owned();
            *prev = *cur;
            *cur = tokens.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

/// Gives `s` to `emit` in [`pieces`] of at most [`MAX_TOKEN_TEXT`] bytes
/// (what ccnoded takes in one `token` frame); nothing when it is empty.
fn emit_pieces(emit: &mut dyn FnMut(&str), s: &str) {
    for piece in pieces(s, MAX_TOKEN_TEXT) {
        emit(piece);
    }
}

/// `text` cut into pieces of at most `max` bytes, each ending on a
/// character boundary, that join back to `text`; none when it is empty.
/// (A `max` under 4 could fall inside one character: such a piece is that
/// whole character.)
fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            cut = first.len_utf8();
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Text on its way out: holds back what could be the start of a stop
/// string, and cuts at the first complete one.
#[derive(Debug)]
struct TextStream {
    stops: Vec<String>,
    held: String,
    prev: usize,
    cur: usize,
}

impl TextStream {
    fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            prev: 0,
            cur: 0,
        }
    }

    /// Adds `piece`; returns the text safe to emit, and whether a stop
    /// string ended the generation (its text and what follows are dropped).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // The longest suffix of `held` that begins some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .take(1)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodel::{self, Shape, EOS_TOKEN_ID, VOCAB_SIZE};

    /// The tiny test model's files, config.json and tokenizer.json as
    /// `edit` leaves them.
    fn tiny_files(
        edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value),
    ) -> Vec<(String, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        testmodel::write_model(dir.path(), &Shape::tiny(), 1).unwrap();
        let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
        let mut config: serde_json::Value = serde_json::from_slice(&read("config.json")).unwrap();
        let mut tokenizer: serde_json::Value =
            serde_json::from_slice(&read("tokenizer.json")).unwrap();
        edit(&mut config, &mut tokenizer);
        vec![
            ("config.json".into(), serde_json::to_vec(&config).unwrap()),
            (
                "tokenizer.json".into(),
                serde_json::to_vec(&tokenizer).unwrap(),
            ),
            ("model.safetensors".into(), read("model.safetensors")),
        ]
    }

    fn load(files: &[(String, Vec<u8>)]) -> Result<Engine, EngineError> {
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        Engine::load(&files, &Device::Cpu)
    }

    fn greedy(prompt: &str, max_tokens: u32) -> Request {
        Request {
            prompt: prompt.into(),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        }
    }

    /// The text `engine` generates for `req`, and how it ended.
    fn run(engine: &Engine, req: &Request) -> Result<(String, Outcome), EngineError> {
        let mut text = String::new();
        let o = engine.generate(req, &|| false, &mut |p| text.push_str(p))?;
        Ok((text, o))
    }

    #[test]
    fn token_ids_beyond_the_vocabulary_are_refused_at_load() {
        assert!(load(&tiny_files(|_, _| {})).is_ok());
        let refused = |edit: fn(&mut serde_json::Value, &mut serde_json::Value)| {
            let e = load(&tiny_files(edit)).unwrap_err();
            assert_eq!(e.code, codes::INVALID_MODEL, "{e}");
            e.message
        };
        let m = refused(|c, _| c["bos_token_id"] = VOCAB_SIZE.into());
        assert!(m.contains("bos_token_id"), "{m}");
        let m = refused(|c, _| c["eos_token_id"] = serde_json::json!([EOS_TOKEN_ID, VOCAB_SIZE]));
        assert!(m.contains("eos_token_id"), "{m}");
        refused(|c, _| c["eos_token_id"] = (VOCAB_SIZE + 7).into());
        // As many tokens as vocab_size, but sparse: the last merge's id is
        // past the embeddings.
        let m = refused(|_, t| {
            let vocab = t["model"]["vocab"].as_object_mut().unwrap();
            let last = vocab
                .iter()
                .find(|(_, id)| id.as_u64() == Some(VOCAB_SIZE as u64 - 1))
                .map(|(k, _)| k.clone())
                .unwrap();
            vocab[&last] = (VOCAB_SIZE + 10).into();
        });
        assert!(m.contains("token id"), "{m}");
        // An added token past the embeddings (as the reserved tokens of
        // some tokenizers are).
        let m = refused(|_, t| {
            let mut pad = t["added_tokens"][1].clone();
            pad["content"] = "<pad>".into();
            pad["id"] = VOCAB_SIZE.into();
            t["added_tokens"].as_array_mut().unwrap().push(pad);
        });
        assert!(m.contains("token id"), "{m}");
    }

    #[test]
    fn emitted_pieces_are_at_most_max_token_text_on_char_boundaries() {
        let pieces_of = |s: &str| {
            let mut out: Vec<String> = Vec::new();
            emit_pieces(&mut |p| out.push(p.to_owned()), s);
            out
        };
        for text in [
            "é".repeat(3000),
            format!("a{}", "é".repeat(3000)),
            "€".repeat(2000),
            "x".repeat(MAX_TOKEN_TEXT),
            "short".to_owned(),
        ] {
            let out = pieces_of(&text);
            assert!(out
                .iter()
                .all(|p| !p.is_empty() && p.len() <= MAX_TOKEN_TEXT));
            assert_eq!(out.concat(), text);
        }
        let lens = |s: &str| pieces_of(s).iter().map(String::len).collect::<Vec<_>>();
        assert_eq!(lens(&"é".repeat(3000)), [4096, 1904]);
        // 4096 would cut an é in two.
        assert_eq!(lens(&format!("a{}", "é".repeat(3000))), [4095, 1906]);
        assert_eq!(lens(&"x".repeat(MAX_TOKEN_TEXT)), [4096]);
        assert!(pieces_of("").is_empty());
        // A limit inside one character still moves on, a character a time.
        assert_eq!(pieces("a€b", 2).collect::<Vec<_>>(), ["a", "€", "b"]);
    }

    #[test]
    fn prompts_over_the_token_cap_are_refused_and_at_the_cap_served() {
        let engine = load(&tiny_files(|_, _| {})).unwrap();
        let prompt = "the quick brown fox jumps over the lazy dog";
        let cap = engine.encode(prompt).unwrap().len();
        let longer = format!("{prompt}!");
        assert_eq!(engine.encode(&longer).unwrap().len(), cap + 1);
        let engine = engine.with_prompt_limits(cap, 4);
        let (_, o) = run(&engine, &greedy(prompt, 4)).unwrap();
        assert_eq!(o.prompt_tokens as usize, cap);
        assert!(o.completion_tokens >= 1);
        let e = run(&engine, &greedy(&longer, 4)).unwrap_err();
        assert_eq!(e.code, codes::CONTEXT_LENGTH_EXCEEDED, "{e}");
        assert!(e.message.contains("limit"), "{e}");
        // The production cap holds whatever the model's context.
        assert_eq!(
            load(&tiny_files(|_, _| {})).unwrap().max_prompt_tokens,
            MAX_PROMPT_TOKENS
        );
    }

    #[test]
    fn a_prompt_prefilled_in_chunks_generates_what_one_pass_does() {
        let dir = tempfile::tempdir().unwrap();
        testmodel::write_model(dir.path(), &Shape::tiny(), 1).unwrap();
        let prompt = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox";
        let direct = crate::reference::Direct::load(dir.path())
            .unwrap()
            .greedy(prompt, 12)
            .unwrap();
        for chunk in [1, 3, 7, PREFILL_CHUNK] {
            let engine = load(&tiny_files(|_, _| {}))
                .unwrap()
                .with_prompt_limits(MAX_PROMPT_TOKENS, chunk);
            let (text, o) = run(&engine, &greedy(prompt, 12)).unwrap();
            assert_eq!(o.prompt_tokens as usize, direct.prompt_tokens);
            assert_eq!(text, direct.text, "prefill chunks of {chunk}");
        }
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut t = TextStream::new(&["END".into(), "\n\n".into()]);
        assert_eq!(t.push("hello E"), ("hello ".into(), false));
        assert_eq!(t.push("N"), (String::new(), false));
        assert_eq!(t.push("x more"), ("ENx more".into(), false));
        assert_eq!(t.push(" and\n"), (" and".into(), false));
        assert_eq!(t.push("\nrest"), (String::new(), true));
        let mut t = TextStream::new(&["END".into()]);
        assert_eq!(t.push("aEND tail"), ("a".into(), true));
        let mut t = TextStream::new(&[]);
        assert_eq!(t.push("é"), ("é".into(), false));
        let mut t = TextStream::new(&["ab".into()]);
        assert_eq!(t.push("xa"), ("x".into(), false));
        assert_eq!(t.flush(), "a");
    }

    #[test]
    fn configs_that_are_not_llama_or_out_of_bounds_are_refused() {
        let good = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 128, "vocab_size": 300,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32"
        });
        assert!(parse_config(good.to_string().as_bytes()).is_ok());
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good.clone();
            c[k] = v;
            parse_config(c.to_string().as_bytes()).unwrap_err()
        };
        let e = with("architectures", serde_json::json!(["GPT2LMHeadModel"]));
        assert_eq!(e.code, codes::UNSUPPORTED_ARCHITECTURE, "{e}");
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("architectures");
        c["model_type"] = "gpt2".into();
        let e = parse_config(c.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.code, codes::UNSUPPORTED_ARCHITECTURE, "{e}");
        assert_eq!(
            with("torch_dtype", "int8".into()).code,
            codes::UNSUPPORTED_DTYPE
        );
        assert_eq!(with("hidden_size", 65.into()).code, codes::INVALID_MODEL);
        assert_eq!(
            with("num_hidden_layers", 100_000.into()).code,
            codes::INVALID_MODEL
        );
        assert_eq!(
            with("max_position_embeddings", (1u64 << 40).into()).code,
            codes::INVALID_MODEL
        );
        assert_eq!(
            with("num_key_value_heads", 3.into()).code,
            codes::INVALID_MODEL
        );
        assert_eq!(with("rms_norm_eps", 0.0.into()).code, codes::INVALID_MODEL);
        assert_eq!(with("hidden_size", "big".into()).code, codes::INVALID_MODEL);
        assert!(parse_config(b"{not json").is_err());
    }
}
