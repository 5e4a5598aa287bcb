//! Loading safetensors + `config.json` models of the llama family (Llama, SmolLM, Qwen2) in
//! f32, f16 or bf16. On CPU weights are widened to f32 (candle's fastest CPU matmul).

use super::config::{Architecture, LlamaShape, ModelConfig};
use super::embedding::{Embedding, Table};
use super::linear::{to_activation_dtype, Linear};
use super::{Block, LoadOptions, Model, Norm, Parts};
use crate::error::{LmError, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Tensor};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    /// transformers 5 writes the rope base here instead of `rope_theta`.
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    tie_word_embeddings: bool,
    torch_dtype: Option<String>,
    /// transformers 5's name for `torch_dtype`.
    dtype: Option<String>,
}

fn default_ctx() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f32>,
}

impl HfConfig {
    fn weight_dtype(&self) -> Option<&str> {
        self.torch_dtype.as_deref().or(self.dtype.as_deref())
    }

    fn rope_base(&self) -> f32 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0)
    }
}

/// The shard files named by a `model.safetensors.index.json`.
pub(crate) fn safetensors_shards(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index)?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| LmError::Corrupt {
        path: index.into(),
        why: e.to_string(),
    })?;
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return Ok(safetensors_shards(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect());
    }
    Err(LmError::NotFound(single))
}

struct Weights {
    st: MmapedSafetensors,
    dir: PathBuf,
    dtype: DType,
    opts: LoadOptions,
}

/// Tensors by HF checkpoint name, in the activation dtype on the target device.
pub(super) trait NamedTensors {
    fn get(&self, name: &str) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
}

impl NamedTensors for Weights {
    fn get(&self, name: &str) -> Result<Tensor> {
        let t = self
            .st
            .load(name, &self.opts.device)
            .map_err(|e| LmError::Corrupt {
                path: self.dir.clone(),
                why: format!("tensor `{name}`: {e}"),
            })?;
        to_activation_dtype(t, self.dtype)
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

impl Model {
    /// Loads `config.json` + `model.safetensors` (or its shards) from `dir`.
    pub fn from_safetensors_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|_| LmError::NotFound(cfg_path.clone()))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| LmError::Corrupt {
            path: cfg_path.clone(),
            why: e.to_string(),
        })?;
        let arch_name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => Architecture::parse(other)?,
        };
        if arch == Architecture::Gemma3 {
            return Err(LmError::UnsupportedArchitecture(
                "gemma3 from safetensors (use its GGUF)".into(),
            ));
        }
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; the runtime never writes model files.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| LmError::Corrupt {
            path: dir.into(),
            why: e.to_string(),
        })?;
        let dtype = if opts.device.is_cpu() {
            DType::F32
        } else {
            match hf.weight_dtype() {
                Some("float16") => DType::F16,
                Some("float32") => DType::F32,
                _ => DType::BF16,
            }
        };
        let w = Weights {
            st,
            dir: dir.into(),
            dtype,
            opts: opts.clone(),
        };
        let heads = hf.num_attention_heads;
        // A zero head count is refused by `validate`, not divided by here.
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size.checked_div(heads).unwrap_or(0));
        let config = ModelConfig::llama_like(&LlamaShape {
            arch,
            hidden: hf.hidden_size,
            layers: hf.num_hidden_layers,
            heads,
            kv_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim,
            ffn: hf.intermediate_size,
            vocab: hf.vocab_size,
            context_length: hf.max_position_embeddings,
            norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_base(),
        });
        let quantization = hf.weight_dtype().unwrap_or("f32").to_string();
        let tied = hf.tie_word_embeddings || !w.has("lm_head.weight");
        Self::from_named(config, &w, tied, quantization, opts, dtype)
    }

    /// Builds a llama-family model from tensors named as in HF checkpoints.
    pub(super) fn from_named(
        config: ModelConfig,
        w: &dyn NamedTensors,
        tied: bool,
        quantization: String,
        opts: &LoadOptions,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let layer = |i: usize| format!("model.layers.{i}.self_attn.q_proj.weight");
        if !w.has(&layer(config.layers - 1)) || w.has(&layer(config.layers)) {
            return Err(LmError::BadModel(format!(
                "the config says {} layers but the weights hold a different number",
                config.layers
            )));
        }
        let eps = config.norm_eps as f32;
        let linear = |prefix: &str| -> Result<Linear> {
            let bias = if w.has(&format!("{prefix}.bias")) {
                Some(w.get(&format!("{prefix}.bias"))?)
            } else {
                None
            };
            Ok(Linear::dense(w.get(&format!("{prefix}.weight"))?, bias))
        };
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: w.get(name)?,
                eps,
            })
        };
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"))?,
                k: linear(&format!("{p}.self_attn.k_proj"))?,
                v: linear(&format!("{p}.self_attn.v_proj"))?,
                o: linear(&format!("{p}.self_attn.o_proj"))?,
                q_norm: None,
                k_norm: None,
                post_attn_norm: None,
                ffn_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"))?,
                up: linear(&format!("{p}.mlp.up_proj"))?,
                down: linear(&format!("{p}.mlp.down_proj"))?,
                post_ffn_norm: None,
            });
        }
        let embed = w.get("model.embed_tokens.weight")?;
        let output = if tied {
            Linear::dense(embed.clone(), None)
        } else {
            linear("lm_head")?
        };
        let final_norm = norm("model.norm.weight")?;
        let embedding = Embedding::new(Table::Dense(embed), None, dtype, &opts.device)?;
        Self::assemble(
            Parts {
                config,
                embedding,
                blocks,
                final_norm,
                output,
                quantization,
            },
            opts,
            dtype,
        )
    }
}
