//! `lm`: the model runtime shared by the muse and the majordomo.
//!
//! Real GGUF (and safetensors) models behind a forward that takes token ids *or* vectors and
//! exposes the final hidden state and the logits as separate steps (ARCHITECTURE.md, `lm`).
//! The modules are private; this list is the API.

mod cache;
mod chat;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod error;
mod generate;
mod loaded;
mod model;
mod prefix;
mod sampling;
mod score;
mod source;
mod stream;
mod threads;
mod tokenizer;

pub use cache::KvCache;
/// The tensor library, re-exported so callers use the same version.
pub use candle_core as candle;
pub use chat::{ChatMessage, ChatTemplate};
#[cfg(feature = "cuda")]
pub use cuda::copy_bandwidth;
pub use device::open as open_device;
pub use error::{InvalidParam, LmError, Result};
pub use generate::{
    decode, generate, DecodeEnd, Decoded, Decoder, GenerateOptions, Generation, StopReason,
    WORD_TAIL,
};
pub use loaded::LoadedModel;
pub use mm_kernels::has_avx2;
pub use model::{
    shape_named, Architecture, Embedding, GgufFile, Input, LoadOptions, Model, ModelConfig,
    NamedShape, StepStats, Stepped, MAX_STEP_BATCH, SHAPES,
};
pub use prefix::PrefixCache;
pub use sampling::{
    analyze, argmax, distribution, entropy, softmax_in_place, Analysis, Distribution, Reference,
    Sampler, SamplingParams,
};
pub use score::{continuation_nll, rows_nll, Nll};
pub use source::{hub_cache_dir, verify, Alias, ALIASES};
pub use stream::TextStream;
pub use threads::{cpu_threads, set_cpu_threads};
pub use tokenizer::Tokenizer;
