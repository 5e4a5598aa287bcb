//! Plain token-space generation: prefill, then decode until a stop condition.

use crate::cache::KvCache;
use crate::error::Result;
use crate::loaded::LoadedModel;
use crate::model::Input;
use crate::sampling::{Sampler, SamplingParams};
use crate::stream::TextStream;
use candle_core::Tensor;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Stop on EOS and end-of-turn ids.
    pub stop_on_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop_strings: Vec::new(),
            stop_on_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    EndOfText,
    StopString,
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::EndOfText => "end_of_text",
            Self::StopString => "stop_string",
            Self::ContextFull => "context_full",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub decode_time: Duration,
}

/// What [`decode`] produced, and where it left the sequence.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// Logits after the last fed token (the input logits when nothing was fed).
    pub logits: Vec<f32>,
    /// Final hidden state `[1, hidden]` after the last fed token, if any was fed.
    pub hidden: Option<Tensor>,
}

/// Decodes from the cache's current state, whose last logits are `logits`, calling `on_text`
/// with each releasable piece of text. Every returned token has been fed to the model (so the
/// cache holds the committed text); the end-of-text token itself is not fed.
pub fn decode(
    lm: &LoadedModel,
    cache: &mut KvCache,
    mut logits: Vec<f32>,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Decoded> {
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut stream = TextStream::new(&lm.tokenizer, &opts.stop_strings);
    let mut tokens = Vec::new();
    let mut hidden = None;
    let stop = loop {
        if tokens.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        let (id, _) = sampler.sample(&logits, &tokens);
        if opts.stop_on_eos && lm.tokenizer.end_of_turn().contains(&id) {
            break StopReason::EndOfText;
        }
        if cache.len() >= cache.max_len() {
            break StopReason::ContextFull;
        }
        tokens.push(id);
        let h = lm.model.forward(Input::Tokens(&[id]), cache)?;
        logits = lm.model.last_logits(&h)?;
        hidden = Some(h);
        let piece = stream.push(id)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stream.stopped() {
            break StopReason::StopString;
        }
    };
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Decoded {
        tokens,
        text: stream.text().to_string(),
        stop,
        logits,
        hidden,
    })
}

/// Prefills `prompt` into a fresh cache and decodes.
pub fn generate(
    lm: &LoadedModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    lm.check_fits(prompt.len())?;
    let mut cache = lm.model.new_cache();
    let t0 = Instant::now();
    let h = lm.model.forward(Input::Tokens(prompt), &mut cache)?;
    let logits = lm.model.last_logits(&h)?;
    let prompt_time = t0.elapsed();
    let t1 = Instant::now();
    let d = decode(lm, &mut cache, logits, opts, on_text)?;
    Ok(Generation {
        tokens: d.tokens,
        text: d.text,
        stop: d.stop,
        prompt_tokens: prompt.len(),
        prompt_time,
        decode_time: t1.elapsed(),
    })
}
