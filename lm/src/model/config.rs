//! The shape of a decoder-only transformer and the per-architecture choices that change its
//! forward (norms, activation, rope layout, sliding windows, embedding scale).

use crate::error::{LmError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama, SmolLM and other Llama-shaped models.
    Llama,
    /// Qwen2: Llama with q/k/v biases.
    Qwen2,
    /// Gemma 3: q/k norms, sandwich norms, GELU, interleaved sliding-window layers.
    Gemma3,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "smollm" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "gemma3" | "gemma3_text" => Ok(Self::Gemma3),
            other => Err(LmError::UnsupportedArchitecture(other.into())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// How rotary embeddings pair up dimensions. GGUF llama weights were permuted by the
/// converter for ggml's interleaved rope; HF weights and GGUF qwen2/gemma3 use halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    pub norm_eps: f64,
    pub rope_theta: f32,
    /// Rope base of sliding-window layers, when they differ (Gemma 3: 10 000).
    pub rope_theta_local: f32,
    /// Sliding-window size and pattern: layer `i` is global when `(i + 1) % pattern == 0`.
    pub sliding_window: Option<(usize, usize)>,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Token embeddings are multiplied by this before layer 0 (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    pub attn_scale: f32,
}

/// The dimensions of a llama-family model (Llama, Qwen2) in HF's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaShape {
    pub arch: Architecture,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub norm_eps: f64,
    pub rope_theta: f32,
}

impl ModelConfig {
    /// A llama-family config (HF weight layout: rope over halves, SiLU, no embedding scale).
    pub fn llama_like(s: &LlamaShape) -> Self {
        Self {
            arch: s.arch,
            hidden: s.hidden,
            layers: s.layers,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            ffn: s.ffn,
            vocab: s.vocab,
            context_length: s.context_length,
            norm_eps: s.norm_eps,
            rope_theta: s.rope_theta,
            rope_theta_local: s.rope_theta,
            sliding_window: None,
            rope_style: RopeStyle::Halves,
            activation: Activation::Silu,
            embed_scale: None,
            attn_scale: 1.0 / (s.head_dim as f32).sqrt(),
        }
    }

    /// Whether layer `i` attends only within the sliding window, and that window.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match self.sliding_window {
            Some((w, pattern)) if !(layer + 1).is_multiple_of(pattern) => Some(w),
            _ => None,
        }
    }

    pub fn rope_theta_of(&self, layer: usize) -> f32 {
        if self.window_of(layer).is_some() {
            self.rope_theta_local
        } else {
            self.rope_theta
        }
    }

    /// Rejects shapes and numbers no model has: a zero dimension would divide by zero or
    /// build an empty model, and a non-finite or non-positive epsilon or rope base turns every
    /// logit into NaN.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(LmError::BadModel(why));
        for (name, n) in [
            ("hidden size", self.hidden),
            ("layer count", self.layers),
            ("head count", self.heads),
            ("kv head count", self.kv_heads),
            ("head size", self.head_dim),
            ("feed-forward size", self.ffn),
            ("vocabulary", self.vocab),
            ("context length", self.context_length),
        ] {
            if n == 0 {
                return bad(format!("the {name} is 0"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} heads are not divisible by {} kv heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("odd head size {}", self.head_dim));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!(
                "norm epsilon {} is not a positive number",
                self.norm_eps
            ));
        }
        for theta in [self.rope_theta, self.rope_theta_local] {
            if !(theta.is_finite() && theta > 0.0) {
                return bad(format!("rope base {theta} is not a positive number"));
            }
        }
        if let Some((window, pattern)) = self.sliding_window {
            if window == 0 || pattern == 0 {
                return bad(format!(
                    "sliding window {window} with pattern {pattern} attends to nothing"
                ));
            }
        }
        Ok(())
    }
}
