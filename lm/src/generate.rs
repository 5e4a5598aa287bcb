//! Token-space decoding: sample from the model's distribution, feed the token, stream its
//! text, stop. One [`Decoder`] serves plain generation, the muse's commits (which first take
//! tokens a dream proposed) and the stop conditions the dream's schedule needs: a word
//! boundary after the budget, and a fork (a high-entropy word boundary).

use crate::cache::KvCache;
use crate::error::{LmError, Result};
use crate::loaded::LoadedModel;
use crate::model::Input;
use crate::sampling::{Distribution, Sampler, SamplingParams};
use crate::stream::TextStream;
use candle_core::Tensor;
use std::time::{Duration, Instant};

/// The most tokens a commit with `end_at_word` decodes past its budget to reach a word boundary.
pub const WORD_TAIL: usize = 8;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Stop on EOS and end-of-turn ids.
    pub stop_on_eos: bool,
    /// After `max_tokens`, go on to the next word boundary (at most [`WORD_TAIL`] more
    /// tokens), so that what follows (a dream burst) starts between words.
    pub end_at_word: bool,
    /// Stop at a word boundary where the next token's entropy (nats, at the sampling
    /// temperature) exceeds this: a fork, where the model faces a real choice.
    pub fork_entropy: Option<f32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop_strings: Vec::new(),
            stop_on_eos: true,
            end_at_word: false,
            fork_entropy: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    EndOfText,
    StopString,
    ContextFull,
    /// `fork_entropy` was exceeded at a word boundary.
    Fork,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::EndOfText => "end_of_text",
            Self::StopString => "stop_string",
            Self::ContextFull => "context_full",
            Self::Fork => "fork",
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

/// Where decoding left the sequence: the logits after the last fed token (the input logits
/// when nothing was fed) and that token's final hidden state `[1, hidden]`, if any was fed.
#[derive(Debug, Clone)]
pub struct DecodeEnd {
    pub logits: Vec<f32>,
    pub hidden: Option<Tensor>,
}

/// One decoding: the sampler, the text so far (with stop strings), the tokens taken.
pub struct Decoder<'a> {
    lm: &'a LoadedModel,
    opts: &'a GenerateOptions,
    sampler: Sampler,
    stream: TextStream<'a>,
    tokens: Vec<u32>,
    /// The token before this decoding (word boundaries at its start).
    before: Option<u32>,
    fork_entropy: Option<f32>,
    /// Asked before each token is taken: true once nobody waits for the text, so a long
    /// decode stops within a step rather than running on for a client that is gone.
    cancelled: Option<&'a dyn Fn() -> bool>,
}

impl<'a> Decoder<'a> {
    /// `before`: the last token already in context (it decides whether the first token starts
    /// a word, and is the text's left context when detokenizing).
    pub fn new(
        lm: &'a LoadedModel,
        opts: &'a GenerateOptions,
        before: Option<u32>,
    ) -> Result<Self> {
        if let Some(h) = opts.fork_entropy {
            if !(h.is_finite() && h >= 0.0) {
                return Err(LmError::InvalidParam(crate::InvalidParam::new(
                    "fork_entropy",
                    format!("must be a finite number >= 0, got {h}"),
                )));
            }
        }
        Ok(Self {
            lm,
            opts,
            sampler: Sampler::new(opts.sampling.clone())?,
            stream: TextStream::after(&lm.tokenizer, &opts.stop_strings, before),
            tokens: Vec::new(),
            before,
            fork_entropy: None,
            cancelled: None,
        })
    }

    /// Stops the decode with [`LmError::Cancelled`] once `cancelled` says so.
    pub fn cancel_when(mut self, cancelled: &'a dyn Fn() -> bool) -> Self {
        self.cancelled = Some(cancelled);
        self
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The text of the tokens taken so far (whole characters).
    pub fn text(&self) -> &str {
        self.stream.text()
    }

    pub fn sampler(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    /// Tokens the budget still allows.
    pub fn budget_left(&self) -> usize {
        self.opts.max_tokens.saturating_sub(self.tokens.len())
    }

    /// The entropy at the fork that stopped decoding, if one did.
    pub fn fork_entropy(&self) -> Option<f32> {
        self.fork_entropy
    }

    /// The distribution the next token is drawn from (repetition penalty over this decoding).
    pub fn distribution(&self, logits: &[f32]) -> Distribution {
        self.sampler.distribution(logits, &self.tokens)
    }

    /// Whether a token `next` would start a new word here.
    fn at_word_boundary(&self, next: u32) -> bool {
        let last = self.tokens.last().copied().or(self.before);
        self.lm.tokenizer.at_word_boundary(last, next)
    }

    /// Takes `id` as the next token of the text (the caller has fed it or feeds it next).
    /// Returns the stop it causes: end of text (then it is not taken) or a stop string.
    pub fn take(&mut self, id: u32, on_text: &mut impl FnMut(&str)) -> Result<Option<StopReason>> {
        if self.cancelled.is_some_and(|gone| gone()) {
            return Err(LmError::Cancelled);
        }
        if self.opts.stop_on_eos && self.lm.tokenizer.end_of_turn().contains(&id) {
            return Ok(Some(StopReason::EndOfText));
        }
        self.tokens.push(id);
        let piece = self.stream.push(id)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        Ok(self.stream.stopped().then_some(StopReason::StopString))
    }

    /// Samples and feeds tokens from `logits` (the model's output at the cache's end) until a
    /// stop. Every taken token has been fed, so the cache holds the text.
    pub fn run(
        &mut self,
        cache: &mut KvCache,
        mut logits: Vec<f32>,
        on_text: &mut impl FnMut(&str),
    ) -> Result<(StopReason, DecodeEnd)> {
        let mut hidden = None;
        let mut tail = 0;
        let stop = loop {
            let next = self.distribution(&logits);
            if self.tokens.len() >= self.opts.max_tokens {
                if !self.opts.end_at_word || tail >= WORD_TAIL || self.at_word_boundary(next.top())
                {
                    break StopReason::MaxTokens;
                }
                tail += 1;
            }
            if let Some(h) = self.opts.fork_entropy {
                if next.full_entropy > h && self.at_word_boundary(next.top()) {
                    self.fork_entropy = Some(next.full_entropy);
                    break StopReason::Fork;
                }
            }
            let id = self.sampler.draw(&next);
            if self.opts.stop_on_eos && self.lm.tokenizer.end_of_turn().contains(&id) {
                break StopReason::EndOfText;
            }
            if cache.len() >= cache.max_len() {
                break StopReason::ContextFull;
            }
            let s = self.lm.model.step(Input::Tokens(&[id]), cache)?;
            logits = s.host_logits()?;
            hidden = Some(s.hidden);
            if let Some(stop) = self.take(id, on_text)? {
                break stop;
            }
        };
        Ok((stop, DecodeEnd { logits, hidden }))
    }

    /// The tokens taken and their text (a held-back stop-string prefix released).
    pub fn finish(mut self, on_text: &mut impl FnMut(&str)) -> (Vec<u32>, String) {
        let rest = self.stream.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        (self.tokens, self.stream.text().to_string())
    }
}

/// What [`decode`] produced, and where it left the sequence.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub end: DecodeEnd,
}

/// Decodes from the cache's current state, whose last logits are `logits`, calling `on_text`
/// with each releasable piece of text. Every returned token has been fed to the model (so the
/// cache holds the committed text); the end-of-text token itself is not fed.
pub fn decode(
    lm: &LoadedModel,
    cache: &mut KvCache,
    logits: Vec<f32>,
    opts: &GenerateOptions,
    before: Option<u32>,
    mut on_text: impl FnMut(&str),
) -> Result<Decoded> {
    let mut d = Decoder::new(lm, opts, before)?;
    let (stop, end) = d.run(cache, logits, &mut on_text)?;
    let (tokens, text) = d.finish(&mut on_text);
    Ok(Decoded {
        tokens,
        text,
        stop,
        end,
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
    let d = decode(
        lm,
        &mut cache,
        logits,
        opts,
        prompt.last().copied(),
        on_text,
    )?;
    Ok(Generation {
        tokens: d.tokens,
        text: d.text,
        stop: d.stop,
        prompt_tokens: prompt.len(),
        prompt_time,
        decode_time: t1.elapsed(),
    })
}
