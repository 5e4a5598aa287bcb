//! The runtime's typed errors. Messages say what went wrong *and* what to do about it,
//! because they surface unchanged in CLI output and gRPC statuses.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("unknown model alias `{0}`: use one of {aliases}, `hf:<org>/<repo>/<file>`, or a path to a .gguf file or a safetensors model directory", aliases = crate::source::ALIASES.iter().map(|a| a.alias).collect::<Vec<_>>().join(", "))]
    UnknownAlias(String),

    #[error("invalid model spec `{spec}`: {why}")]
    BadSpec { spec: String, why: String },

    #[error("model file not found: {}: check the path, or fetch the default models with `python3 deploy/fetch_models.py`", .0.display())]
    NotFound(PathBuf),

    /// A default model is not in the local cache. The library does not fetch (that runs
    /// Python): the `muse`, `majordomo` and `mm` commands do, or the user runs the script.
    #[error("default model `{alias}` is not in the local cache: run `python3 deploy/fetch_models.py {alias}` (the muse, majordomo and mm commands fetch it on first use)")]
    DefaultModelMissing { alias: &'static str },

    #[error("model `{spec}` is not in the local cache and could not be fetched: {why}")]
    Fetch { spec: String, why: String },

    #[error("sha256 of {} is {actual}, expected {expected}: the file is corrupt or a different version; delete it and fetch again", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("cannot read model {}: {why}; the file may be truncated or not a GGUF/safetensors model — fetch it again", path.display())]
    Corrupt { path: PathBuf, why: String },

    #[error("unsupported architecture `{0}`: this runtime loads llama (incl. SmolLM, Qwen2-style) and gemma3 models")]
    UnsupportedArchitecture(String),

    #[error("model metadata is missing `{0}`; the file is incomplete or not a supported model")]
    MissingMetadata(String),

    /// The model's metadata contradicts itself or its tensors, or lies outside any sane range:
    /// a damaged or hostile file. Found before anything is built from it, so it never
    /// surfaces later as a panic, a shape error mid-request or silently empty text.
    #[error("inconsistent model: {0}; the file is damaged or not a model this runtime supports")]
    BadModel(String),

    /// The forward produced NaN or infinite logits: broken weights. Sampling them would give
    /// garbage or empty text with no reason given.
    #[error("the model produced NaN or infinite logits: its weights or metadata (norm epsilon, rope base) are broken; load another model file")]
    NonFiniteLogits,

    /// Whoever waited for the text went away: the work stopped within a step.
    #[error("cancelled: the client went away")]
    Cancelled,

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("context overflow: {needed} positions needed but the context holds {limit}; shorten the prompt or lower --max-tokens")]
    ContextOverflow { needed: usize, limit: usize },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A parameter out of range: the caller's mistake, named.
    #[error(transparent)]
    InvalidParam(#[from] InvalidParam),

    /// The device failed (a server fault: another replica may serve the request).
    #[error("device error: {0}")]
    Device(String),

    /// Tensors or weights are not laid out as the runtime expects (a server fault).
    #[error("internal layout error: {0}")]
    Layout(String),

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, LmError>;

/// A parameter that is out of range: the field as its API names it, and why. Each edge
/// formats it its own way (`burst.top_p must be …` over gRPC, `--top-p must be …` on a CLI).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {why}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub why: String,
}

impl InvalidParam {
    pub fn new(field: &'static str, why: impl Into<String>) -> Self {
        Self {
            field,
            why: why.into(),
        }
    }

    /// As a command-line flag: `--top-p must be …`.
    pub fn as_flag(&self) -> String {
        format!("--{} {}", self.field.replace(['_', '.'], "-"), self.why)
    }
}
