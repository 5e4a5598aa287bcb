//! `lm`: the model runtime shared by the muse and the majordomo.
//!
//! Real GGUF (and safetensors) models behind a forward that takes token ids *or* vectors and
//! exposes the final hidden state and the logits as separate steps (DESIGN.md §3).

pub mod cache;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod loaded;
pub mod model;
pub mod sampling;
pub mod source;
pub mod stream;
pub mod threads;
pub mod tokenizer;

pub use cache::KvCache;
/// The tensor library, re-exported so callers use the same version.
pub use candle_core as candle;
pub use chat::{ChatMessage, ChatTemplate};
pub use error::{LmError, Result};
pub use loaded::LoadedModel;
pub use model::{Input, LoadOptions, Model, ModelConfig};
pub use sampling::{Distribution, Sampler, SamplingParams};
pub use tokenizer::Tokenizer;
