//! The same model run directly with candle, in-process, from its files on
//! disk: what tests compare the served output with, and the peer the
//! inference benchmark measures against. Deliberately written from
//! candle's own API (mmaped safetensors, its Llama, argmax) and not through
//! [`crate::engine`], so that a bug there cannot hide in both.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig, LlamaEosToks};

/// A model loaded directly.
pub struct Direct {
    model: Llama,
    cache: Cache,
    tokenizer: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Direct")
    }
}

/// A greedy run: the text, the tokens, and when each token was produced.
#[derive(Debug, Clone)]
pub struct Run {
    pub text: String,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    /// From the call to the first token.
    pub first_token: Duration,
    /// Whole run.
    pub total: Duration,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Direct {
    /// Loads `dir` (config.json, tokenizer.json, *.safetensors) on CPU, f32.
    pub fn load(dir: &Path) -> Result<Direct, String> {
        let cfg: LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(err)?)
                .map_err(err)?;
        let cfg = cfg.into_config(false);
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(err)?;
        let mut shards: Vec<_> = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        let device = Device::Cpu;
        // SAFETY: the test owns these files and does not change them while
        // the mapping lives (candle's requirement for mmaped safetensors).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &device) }
            .map_err(err)?;
        let model = Llama::load(vb, &cfg).map_err(err)?;
        let cache = Cache::new(true, DType::F32, &cfg, &device).map_err(err)?;
        let eos = match &cfg.eos_token_id {
            Some(LlamaEosToks::Single(t)) => vec![*t],
            Some(LlamaEosToks::Multiple(t)) => t.clone(),
            None => vec![],
        };
        Ok(Direct {
            model,
            cache,
            tokenizer,
            bos: cfg.bos_token_id,
            eos,
        })
    }

    /// Greedy decoding of up to `max_tokens` after `prompt` (BOS first when
    /// the model has one); stops at EOS.
    pub fn greedy(&self, prompt: &str, max_tokens: usize) -> Result<Run, String> {
        let start = Instant::now();
        let enc = self.tokenizer.encode(prompt, false).map_err(err)?;
        let mut input: Vec<u32> = self.bos.into_iter().collect();
        input.extend_from_slice(enc.get_ids());
        let prompt_tokens = input.len();
        let mut cache = self.cache.clone();
        let mut pos = 0;
        let mut tokens = Vec::new();
        let mut first_token = Duration::ZERO;
        while tokens.len() < max_tokens {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .map_err(err)?;
            let logits = self
                .model
                .forward(&x, pos, &mut cache)
                .and_then(|l| l.squeeze(0))
                .map_err(err)?;
            pos += input.len();
            let next = logits
                .argmax(candle_core::D::Minus1)
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(err)?;
            if tokens.is_empty() {
                first_token = start.elapsed();
            }
            if self.eos.contains(&next) {
                break;
            }
            tokens.push(next);
            input = vec![next];
        }
        let text = self.tokenizer.decode(&tokens, true).map_err(err)?;
        Ok(Run {
            text,
            prompt_tokens,
            tokens,
            first_token,
            total: start.elapsed(),
        })
    }
}
