//! Loading GGUF files: metadata, tensors, and the model built from them.

use super::config::{Activation, Architecture, ModelConfig, RopeStyle};
use super::embedding::{Embedding, Table};
use super::linear::Linear;
use super::{Block, LoadOptions, Model, Norm, Parts};
use crate::error::{LmError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open GGUF file: its metadata, and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |why: String| LmError::Corrupt {
            path: path.into(),
            why,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LmError::NotFound(path.into()),
            _ => LmError::Io(e),
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| corrupt(e.to_string()))?;
        // A truncated download keeps its header: check the tensor data is all there. A hostile
        // header may declare empty or astronomically large shapes: candle reads those with
        // unchecked arithmetic (and an empty one through a misaligned pointer), so they stop here.
        let size = std::fs::metadata(path)?.len();
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0 && n.is_multiple_of(block));
            let end = elems
                .and_then(|n| (n / block).checked_mul(type_size))
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes as u64)
                });
            match end {
                None => {
                    return Err(corrupt(format!(
                        "tensor `{name}` has shape {dims:?}, which is empty, too large or not a whole number of {:?} blocks",
                        info.ggml_dtype
                    )))
                }
                Some(end) if end > size => {
                    return Err(corrupt(format!(
                        "tensor `{name}` ends at byte {end} but the file has {size} bytes"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(Self {
            path: path.into(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| LmError::MissingMetadata(key.into()))
    }

    /// An integer key as u32, whichever integer type the file stores it as. A value that
    /// does not fit (negative, or past u32) is refused rather than wrapped into a small one.
    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.req(key)?;
        v.to_u32()
            .ok()
            .or_else(|| v.to_u64().ok().and_then(|x| u32::try_from(x).ok()))
            .or_else(|| v.to_i32().ok().and_then(|x| u32::try_from(x).ok()))
            .ok_or_else(|| {
                LmError::MissingMetadata(format!("{key} (as a 32-bit unsigned integer)"))
            })
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.req(key)?;
        v.to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map_err(|_| LmError::MissingMetadata(format!("{key} (as a float)")))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.req(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|_| LmError::MissingMetadata(format!("{key} (as a string)")))
    }

    pub fn architecture(&self) -> Result<Architecture> {
        Architecture::parse(self.str("general.architecture")?)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str, device: &candle_core::Device) -> Result<QTensor> {
        let path = self.path.clone();
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| LmError::Corrupt {
                path,
                why: format!("tensor `{name}`: {e}"),
            })
    }

    fn dense(&mut self, name: &str, opts: &LoadOptions) -> Result<Tensor> {
        Ok(self.qtensor(name, &opts.device)?.dequantize(&opts.device)?)
    }

    fn opt_dense(&mut self, name: &str, opts: &LoadOptions) -> Result<Option<Tensor>> {
        if self.has_tensor(name) {
            Ok(Some(self.dense(name, opts)?))
        } else {
            Ok(None)
        }
    }

    fn linear(&mut self, prefix: &str, opts: &LoadOptions) -> Result<Linear> {
        let q = self.qtensor(&format!("{prefix}.weight"), &opts.device)?;
        let bias = self.opt_dense(&format!("{prefix}.bias"), opts)?;
        linear_from(Arc::new(q), bias, opts)
    }

    fn norm(&mut self, name: &str, eps: f64, opts: &LoadOptions) -> Result<Norm> {
        Ok(Norm {
            weight: self.dense(name, opts)?,
            eps: eps as f32,
        })
    }

    fn opt_norm(&mut self, name: &str, eps: f64, opts: &LoadOptions) -> Result<Option<Norm>> {
        if self.has_tensor(name) {
            Ok(Some(self.norm(name, eps, opts)?))
        } else {
            Ok(None)
        }
    }

    fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let hidden = self.u32(&k("embedding_length"))? as usize;
        let heads = self.u32(&k("attention.head_count"))? as usize;
        let kv_heads = self
            .u32(&k("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(heads);
        // A zero head count is refused by `validate`, not divided by here.
        let head_dim = self
            .u32(&k("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| LmError::MissingMetadata("tensor token_embd.weight".into()))?;
        let vocab = match embd.shape.dims() {
            [rows, _] => *rows,
            dims => {
                return Err(LmError::BadModel(format!(
                    "token_embd.weight has shape {dims:?}, not [vocabulary, hidden]"
                )))
            }
        };
        let gemma = arch == Architecture::Gemma3;
        let sliding = if gemma {
            Some((
                self.u32(&k("attention.sliding_window"))
                    .map(|x| x as usize)
                    .unwrap_or(512),
                6,
            ))
        } else {
            None
        };
        let config = ModelConfig {
            arch,
            hidden,
            layers: self.u32(&k("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            ffn: self.u32(&k("feed_forward_length"))? as usize,
            vocab,
            context_length: self
                .u32(&k("context_length"))
                .map(|x| x as usize)
                .unwrap_or(2048),
            norm_eps: self
                .f32(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f64,
            rope_theta: self.f32(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_theta_local: if gemma {
                10_000.0
            } else {
                self.f32(&k("rope.freq_base")).unwrap_or(10_000.0)
            },
            sliding_window: sliding,
            // llama.cpp's converter permutes llama q/k for ggml's interleaved ("normal") rope.
            rope_style: if arch == Architecture::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Halves
            },
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        };
        config.validate()?;
        self.check_against_tensors(&config)?;
        Ok(config)
    }

    /// Metadata the tensor shapes cannot confirm later: the layer count, the rope dimensions
    /// (this runtime rotates whole heads), and a declared vocabulary size.
    fn check_against_tensors(&self, c: &ModelConfig) -> Result<()> {
        let a = c.arch.name();
        let bad = |why: String| Err(LmError::BadModel(why));
        let blocks = self
            .content
            .tensor_infos
            .keys()
            .filter(|n| n.starts_with("blk.") && n.ends_with(".attn_q.weight"))
            .count();
        if blocks != c.layers {
            return bad(format!(
                "{a}.block_count says {} layers but the file has {blocks}",
                c.layers
            ));
        }
        if let Ok(rope) = self.u32(&format!("{a}.rope.dimension_count")) {
            if rope as usize != c.head_dim {
                return bad(format!(
                    "{a}.rope.dimension_count is {rope} but heads have {} dimensions",
                    c.head_dim
                ));
            }
        }
        if let Ok(declared) = self.u32(&format!("{a}.vocab_size")) {
            if declared as usize != c.vocab {
                return bad(format!(
                    "{a}.vocab_size is {declared} but token_embd.weight has {} rows",
                    c.vocab
                ));
            }
        }
        Ok(())
    }
}

fn linear_from(q: Arc<QTensor>, bias: Option<Tensor>, opts: &LoadOptions) -> Result<Linear> {
    if opts.dequantize {
        Ok(Linear::dense(q.dequantize(&opts.device)?, bias))
    } else {
        Linear::quantized(q, bias)
    }
}

impl Model {
    /// Loads a GGUF model (llama, qwen2 or gemma3 architecture).
    pub fn from_gguf(gguf: &mut GgufFile, opts: &LoadOptions) -> Result<Self> {
        let config = gguf.config()?;
        let eps = config.norm_eps;
        let dtype = DType::F32;
        let embd = Arc::new(gguf.qtensor("token_embd.weight", &opts.device)?);
        let quantization = gguf
            .content
            .tensor_infos
            .get("blk.0.attn_q.weight")
            .map(|t| format!("{:?}", t.ggml_dtype))
            .ok_or_else(|| LmError::MissingMetadata("tensor blk.0.attn_q.weight".into()))?;
        let mut blocks = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: gguf.norm(&format!("{p}.attn_norm.weight"), eps, opts)?,
                q: gguf.linear(&format!("{p}.attn_q"), opts)?,
                k: gguf.linear(&format!("{p}.attn_k"), opts)?,
                v: gguf.linear(&format!("{p}.attn_v"), opts)?,
                o: gguf.linear(&format!("{p}.attn_output"), opts)?,
                q_norm: gguf.opt_norm(&format!("{p}.attn_q_norm.weight"), eps, opts)?,
                k_norm: gguf.opt_norm(&format!("{p}.attn_k_norm.weight"), eps, opts)?,
                post_attn_norm: gguf.opt_norm(
                    &format!("{p}.post_attention_norm.weight"),
                    eps,
                    opts,
                )?,
                ffn_norm: gguf.norm(&format!("{p}.ffn_norm.weight"), eps, opts)?,
                gate: gguf.linear(&format!("{p}.ffn_gate"), opts)?,
                up: gguf.linear(&format!("{p}.ffn_up"), opts)?,
                down: gguf.linear(&format!("{p}.ffn_down"), opts)?,
                post_ffn_norm: gguf.opt_norm(&format!("{p}.post_ffw_norm.weight"), eps, opts)?,
            });
        }
        let final_norm = gguf.norm("output_norm.weight", eps, opts)?;
        let output = if gguf.has_tensor("output.weight") {
            gguf.linear("output", opts)?
        } else {
            linear_from(embd.clone(), None, opts)?
        };
        let embedding = Embedding::new(
            Table::Quantized(embd),
            config.embed_scale,
            dtype,
            &opts.device,
        )?;
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
