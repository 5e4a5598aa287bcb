//! Models of a named shape with random weights: benchmarks of big shapes on machines that
//! cannot download them (the GPU machine has no internet). Weights are N(0, 0.02²) like HF's
//! `initializer_range`, norms are ones; the forward is the same as for loaded weights.

use super::config::{Architecture, LlamaShape, ModelConfig};
use super::safetensors::NamedTensors;
use super::{LoadOptions, Model};
use crate::error::{LmError, Result};
use candle_core::{DType, Device, Tensor};

/// A benchmark shape: HF dimensions, and whether the output projection is the embedding.
#[derive(Debug, Clone)]
pub struct NamedShape {
    pub name: &'static str,
    pub shape: LlamaShape,
    pub tied: bool,
}

#[allow(clippy::too_many_arguments)] // one row of the table below: a named shape's dimensions
const fn qwen2(
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    tied: bool,
) -> NamedShape {
    NamedShape {
        name,
        shape: LlamaShape {
            arch: Architecture::Qwen2,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn,
            vocab,
            context_length: 32_768,
            norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
        },
        tied,
    }
}

/// The shapes `muse bench --shape` knows (Qwen2.5's published configurations), plus a tiny one
/// for tests.
pub const SHAPES: &[NamedShape] = &[
    qwen2("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151_936, true),
    qwen2("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151_936, true),
    qwen2("qwen2.5-7b", 3584, 28, 28, 4, 18_944, 152_064, false),
    qwen2("tiny", 64, 2, 4, 2, 128, 512, false),
];

pub fn shape_named(name: &str) -> Result<&'static NamedShape> {
    SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        LmError::Layout(format!(
            "unknown shape `{name}`: use one of {}",
            SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Random tensors, shaped by their HF name.
struct RandomTensors {
    config: ModelConfig,
    dtype: DType,
    device: Device,
}

impl RandomTensors {
    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        // `model.layers.<i>.<leaf>`: only the shape's layers exist.
        let leaf = match name.rsplit_once(".layers.") {
            None => name,
            Some((_, rest)) => {
                let (index, leaf) = rest.split_once('.')?;
                if index.parse::<usize>().ok()? >= c.layers {
                    return None;
                }
                leaf
            }
        };
        let bias = c.arch == Architecture::Qwen2;
        Some(match leaf {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![c.vocab, c.hidden],
            "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
                vec![c.hidden]
            }
            "self_attn.q_proj.weight" => vec![q, c.hidden],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, c.hidden],
            "self_attn.q_proj.bias" if bias => vec![q],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" if bias => vec![kv],
            "self_attn.o_proj.weight" => vec![c.hidden, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![c.ffn, c.hidden],
            "mlp.down_proj.weight" => vec![c.hidden, c.ffn],
            _ => return None,
        })
    }
}

impl NamedTensors for RandomTensors {
    fn get(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .shape_of(name)
            .ok_or_else(|| LmError::Layout(format!("no random tensor `{name}`")))?;
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn has(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }
}

impl Model {
    /// A model of `shape` with random weights: bf16 on a GPU (seeded with `seed`), f32 on the
    /// CPU (candle's CPU generator cannot be seeded).
    pub fn random(shape: &NamedShape, seed: u64, opts: &LoadOptions) -> Result<Self> {
        let dtype = if opts.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        if !opts.device.is_cpu() {
            opts.device.set_seed(seed)?;
        }
        let config = ModelConfig::llama_like(&shape.shape);
        let source = RandomTensors {
            config: config.clone(),
            dtype,
            device: opts.device.clone(),
        };
        Self::from_named(
            config,
            &source,
            shape.tied,
            format!("random {dtype:?}"),
            opts,
            dtype,
        )
    }
}
