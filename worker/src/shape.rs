//! The shape of a Llama-family model: its dimensions, their bounds, and the
//! tensors (names and shapes) the weights must hold. Shared by the worker's
//! checks before loading and by the test-model generator.

/// Dimensions from config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// Caps on each dimension: above the largest Llama models published, far
/// below what would overflow or exhaust memory in shape arithmetic.
pub const MAX_HIDDEN: usize = 65_536;
pub const MAX_INTERMEDIATE: usize = 262_144;
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_LAYERS: usize = 512;
pub const MAX_HEADS: usize = 1024;
pub const MAX_POSITIONS: usize = 1 << 20;

impl Dims {
    /// Checks every dimension is within its cap and that they fit together.
    pub fn check(&self) -> Result<(), String> {
        let bounded = [
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            (
                "intermediate_size",
                self.intermediate_size,
                MAX_INTERMEDIATE,
            ),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (name, v, max) in bounded {
            if v == 0 || v > max {
                return Err(format!("{name} = {v} is outside 1..={max}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if (self.hidden_size / self.num_attention_heads) % 2 != 0 {
            return Err("the head dimension must be even (rotary embeddings)".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every tensor the weights must hold, with its shape (`[out, in]` for
    /// projections), in HF Llama naming (what candle's Llama loads), in
    /// checkpoint order: embeddings, each layer, final norm, output head
    /// (absent with tied embeddings).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let kv = self.num_key_value_heads * self.head_dim();
        let i = self.intermediate_size;
        let mut t = vec![(
            "model.embed_tokens.weight".to_owned(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            t.extend([
                (p("input_layernorm"), vec![h]),
                (p("self_attn.q_proj"), vec![h, h]),
                (p("self_attn.k_proj"), vec![kv, h]),
                (p("self_attn.v_proj"), vec![kv, h]),
                (p("self_attn.o_proj"), vec![h, h]),
                (p("post_attention_layernorm"), vec![h]),
                (p("mlp.gate_proj"), vec![i, h]),
                (p("mlp.up_proj"), vec![i, h]),
                (p("mlp.down_proj"), vec![h, i]),
            ]);
        }
        t.push(("model.norm.weight".to_owned(), vec![h]));
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".to_owned(), vec![self.vocab_size, h]));
        }
        t
    }

    /// Parameters in the model.
    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dims {
        Dims {
            hidden_size: 64,
            intermediate_size: 128,
            vocab_size: 300,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn tensors_follow_the_config() {
        let d = tiny();
        d.check().unwrap();
        let t = d.tensors();
        assert_eq!(t.len(), 3 + 2 * 9);
        let k = t
            .iter()
            .find(|(n, _)| n == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(k.1, vec![32, 64]);
        let tied = Dims {
            tie_word_embeddings: true,
            ..d
        };
        assert!(!tied.tensors().iter().any(|(n, _)| n == "lm_head.weight"));
        assert_eq!(d.parameters() - tied.parameters(), 300 * 64);
    }

    #[test]
    fn dimensions_out_of_bounds_or_inconsistent_are_refused() {
        for bad in [
            Dims {
                hidden_size: 0,
                ..tiny()
            },
            Dims {
                num_hidden_layers: MAX_LAYERS + 1,
                ..tiny()
            },
            Dims {
                vocab_size: MAX_VOCAB + 1,
                ..tiny()
            },
            Dims {
                hidden_size: 66,
                ..tiny()
            },
            Dims {
                num_key_value_heads: 3,
                ..tiny()
            },
            Dims {
                hidden_size: 12,
                num_attention_heads: 4,
                ..tiny()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
