//! One dreaming sequence: prime, bursts, commits, checkpoints and rewinds over a KV cache.
//!
//! A burst's steps stay pending until the next commit renders them (see [`crate::render`]);
//! a commit without a pending burst simply decodes.

use crate::dream::{self, DreamParams, Frontier, Step};
use crate::render::{self, Render};
use crate::telemetry::{BurstStop, BurstSummary, CommitSummary, LatentStep, PrimeSummary};
use lm::candle::Tensor;
use lm::PrefixCache;
use lm::{ChatMessage, Decoder, GenerateOptions, Input, KvCache, LmError, LoadedModel};
use std::collections::HashMap;
use std::time::Instant;

/// Prompts are evaluated in chunks of at most this many positions, so that a long prompt
/// batches with other sessions' steps instead of holding the forward queue. Where the chunks
/// fall does not change a bit of the result: every operation of the CPU forward gives a row
/// the same result whatever rows it is evaluated with (our kernels, and attention one query
/// row at a time), so a prime resumed from the prefix cache at any position equals a cold one
/// and a recorded seed replays its turn on any replica.
const PRIME_CHUNK: usize = 32;

/// Positions a prime from the prefix cache leaves room for after the prompt, so that a
/// reply's first commits do not grow (copy) the cache.
const REPLY_ROOM: usize = 256;

/// Characters of a checkpoint name.
const MAX_CHECKPOINT_CHARS: usize = 64;
/// Checkpoint names an unknown-checkpoint error lists.
const KNOWN_SHOWN: usize = 8;

/// A named point to rewind to.
#[derive(Debug, Clone)]
struct Checkpoint {
    position: usize,
    frontier: Frontier,
    history: Vec<u32>,
}

/// Latent steps not yet rendered, and where they began.
struct Pending {
    start: Checkpoint,
    steps: Vec<Step>,
}

/// The checkpoint every prime sets.
pub const PRIMED: &str = "primed";

/// What a commit does: decode (its options) after rendering the pending burst (its render).
#[derive(Debug, Clone, Default)]
pub struct CommitParams {
    pub decode: GenerateOptions,
    pub render: Render,
}

pub struct DreamSession<'m> {
    lm: &'m LoadedModel,
    cache: KvCache,
    frontier: Option<Frontier>,
    /// The prompt's last token (word boundaries and detokenization at the reply's start).
    prompt_last: Option<u32>,
    /// Committed token ids since the prime (the context is prompt + history once rendered).
    history: Vec<u32>,
    checkpoints: HashMap<String, Checkpoint>,
    pending: Option<Pending>,
    /// The prefix cache the prompt's KV goes back to, and the prompt: the first positions of
    /// `cache` until the session ends or primes again.
    lent: Option<(&'m PrefixCache, Vec<u32>)>,
}

impl Drop for DreamSession<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// How a prompt is given.
#[derive(Debug, Clone)]
pub enum Prime {
    Chat(Vec<ChatMessage>),
    Raw(String),
    Tokens(Vec<u32>),
}

fn not_primed() -> LmError {
    LmError::InvalidInput("the session is not primed: send a prime first".into())
}

impl<'m> DreamSession<'m> {
    pub fn new(lm: &'m LoadedModel) -> Self {
        Self {
            lm,
            cache: lm.model.new_cache(),
            frontier: None,
            prompt_last: None,
            history: Vec::new(),
            checkpoints: HashMap::new(),
            pending: None,
            lent: None,
        }
    }

    /// Stores the primed prompt's KV in the prefix cache it came from, moving the cache out
    /// (the session is ending or priming again).
    fn give_back(&mut self) {
        if let Some((prefixes, ids)) = self.lent.take() {
            if self.cache.len() >= ids.len() {
                let cache = std::mem::replace(&mut self.cache, self.lm.model.new_cache());
                prefixes.insert(ids, cache);
            }
        }
    }

    pub fn model(&self) -> &'m LoadedModel {
        self.lm
    }

    /// Positions in context.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The next-token logits at the frontier (after a prime), copied to the host.
    pub fn logits(&self) -> Option<Vec<f32>> {
        self.frontier.as_ref().and_then(|f| f.host_logits().ok())
    }

    /// The last token of text in context (latent steps are not text).
    fn last_token(&self, history: &[u32]) -> Option<u32> {
        history.last().copied().or(self.prompt_last)
    }

    /// Resets the sequence and feeds the prologue as token ids; sets the `primed` checkpoint.
    /// Returns the prompt's token count.
    pub fn prime(&mut self, prime: &Prime) -> lm::Result<usize> {
        Ok(self.prime_with(prime, None)?.prompt_tokens)
    }

    /// [`Self::prime`] that takes the KV of the longest prefix of the prompt from `prefixes`
    /// and gives the primed prompt's back when the session ends or primes again (for the next
    /// turn, or a retry), by move: the session's cache, forgetting what followed the prompt.
    pub fn prime_with(
        &mut self,
        prime: &Prime,
        prefixes: Option<&'m PrefixCache>,
    ) -> lm::Result<PrimeSummary> {
        let ids = match prime {
            Prime::Chat(messages) => self.lm.chat_prompt(messages)?,
            Prime::Raw(text) => self.lm.raw_prompt(text)?,
            Prime::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(LmError::InvalidInput("the prompt is empty".into()));
        }
        self.lm.check_fits(ids.len())?;
        self.history.clear();
        self.checkpoints.clear();
        self.pending = None;
        self.frontier = None;
        self.give_back();
        let prefixes = prefixes.filter(|p| p.is_enabled());
        // The last prompt token is always forwarded: its row gives the frontier.
        let room = ids.len() + REPLY_ROOM;
        let hit = match prefixes {
            Some(p) => p.checkout(&ids, ids.len() - 1, room)?,
            None => None,
        };
        let cached = match hit {
            Some((cache, cached)) => {
                self.cache = cache;
                cached
            }
            None => {
                self.cache.clear();
                self.cache.reserve(room.min(self.cache.max_len()))?;
                0
            }
        };
        // Whole chunks, then the rest (1 to PRIME_CHUNK positions) gives the frontier.
        let last = cached + (ids.len() - cached - 1) / PRIME_CHUNK * PRIME_CHUNK;
        for start in (cached..last).step_by(PRIME_CHUNK) {
            self.lm.model.forward(
                Input::Tokens(&ids[start..start + PRIME_CHUNK]),
                &mut self.cache,
            )?;
        }
        self.frontier = Some(Frontier::advance(
            self.lm,
            &mut self.cache,
            Input::Tokens(&ids[last..]),
        )?);
        self.prompt_last = ids.last().copied();
        self.checkpoint(PRIMED)?;
        let prompt_tokens = ids.len();
        self.lent = prefixes.map(|p| (p, ids));
        Ok(PrimeSummary {
            prompt_tokens,
            cached_tokens: cached,
        })
    }

    fn snapshot(&self) -> lm::Result<Checkpoint> {
        let frontier = self.frontier.clone().ok_or_else(not_primed)?;
        Ok(Checkpoint {
            position: self.cache.len(),
            frontier,
            history: self.history.clone(),
        })
    }

    /// Names the current position.
    pub fn checkpoint(&mut self, name: &str) -> lm::Result<()> {
        if name.is_empty() || name.chars().count() > MAX_CHECKPOINT_CHARS {
            return Err(LmError::InvalidInput(format!(
                "checkpoint name must have 1 to {MAX_CHECKPOINT_CHARS} characters"
            )));
        }
        let cp = self.snapshot()?;
        self.checkpoints.insert(name.to_string(), cp);
        Ok(())
    }

    /// Checkpoint names, sorted.
    pub fn checkpoint_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.checkpoints.keys().cloned().collect();
        names.sort();
        names
    }

    /// Rewinds to a named checkpoint (the KV cache is truncated, nothing recomputed). A
    /// pending burst is abandoned.
    pub fn rewind(&mut self, name: &str) -> lm::Result<usize> {
        let cp = self.checkpoints.get(name).cloned().ok_or_else(|| {
            // Bounded: a prefix of the name asked for, and the first few names known.
            let asked = mm_kit::text::clip(name, MAX_CHECKPOINT_CHARS);
            let known = self.checkpoint_names();
            let shown = known.len().min(KNOWN_SHOWN);
            LmError::InvalidInput(format!(
                "unknown checkpoint `{asked}` ({} known: {}{})",
                known.len(),
                known[..shown].join(", "),
                if known.len() > shown { ", …" } else { "" }
            ))
        })?;
        if cp.position > self.cache.len() {
            return Err(LmError::InvalidInput(format!(
                "checkpoint `{name}` lies past the current position (it was rewound over)"
            )));
        }
        self.restore(cp);
        self.pending = None;
        // Checkpoints past the new end point at positions that no longer exist.
        let len = self.cache.len();
        self.checkpoints.retain(|_, c| c.position <= len);
        Ok(len)
    }

    fn restore(&mut self, cp: Checkpoint) {
        self.cache.truncate(cp.position);
        self.frontier = Some(cp.frontier);
        self.history = cp.history;
    }

    /// A burst of latent steps. It starts only at a word boundary (the last token ends a word,
    /// or the most probable next one begins one): elsewhere it takes no step and says
    /// `mid_word`. A burst right after a burst continues the same dream.
    pub fn burst(
        &mut self,
        params: &DreamParams,
        on_step: impl FnMut(&LatentStep) -> bool,
    ) -> lm::Result<BurstSummary> {
        let start = self.snapshot()?;
        let lm = self.lm;
        let mut frontier = start.frontier.clone();
        if self.pending.is_none()
            && !lm
                .tokenizer
                .at_word_boundary(self.last_token(&self.history), frontier.top()?)
        {
            return Ok(BurstSummary {
                steps: 0,
                stop: BurstStop::MidWord,
                millis: 0.0,
                mean_entropy: 0.0,
                start_position: start.position,
            });
        }
        match dream::burst(lm, &mut self.cache, &mut frontier, params, on_step) {
            Ok((summary, steps)) => {
                self.frontier = Some(frontier);
                if !steps.is_empty() {
                    match &mut self.pending {
                        Some(p) => p.steps.extend(steps),
                        None => self.pending = Some(Pending { start, steps }),
                    }
                }
                Ok(summary)
            }
            Err(e) => {
                // Leave the session where it was before the burst.
                self.restore(start);
                Err(e)
            }
        }
    }

    /// Renders the pending burst (if any) as `params.render` says, then decodes. On an error
    /// the session is left as it was.
    pub fn commit(
        &mut self,
        params: &CommitParams,
        on_text: impl FnMut(&str),
    ) -> lm::Result<CommitSummary> {
        self.commit_until(params, on_text, &|| false)
    }

    /// [`Self::commit`] that stops with [`lm::LmError::Cancelled`] within a token of
    /// `cancelled` turning true, leaving the session as it was before the commit.
    pub fn commit_until(
        &mut self,
        params: &CommitParams,
        mut on_text: impl FnMut(&str),
        cancelled: &dyn Fn() -> bool,
    ) -> lm::Result<CommitSummary> {
        let before = self.snapshot()?;
        let pending = self.pending.take();
        match self.render_and_decode(params, pending.as_ref(), &mut on_text, cancelled) {
            Ok(s) => Ok(s),
            Err(e) => {
                self.restore(before);
                self.pending = pending;
                Err(e)
            }
        }
    }

    fn render_and_decode(
        &mut self,
        params: &CommitParams,
        pending: Option<&Pending>,
        on_text: &mut impl FnMut(&str),
        cancelled: &dyn Fn() -> bool,
    ) -> lm::Result<CommitSummary> {
        let t0 = Instant::now();
        let lm = self.lm;
        let opts = &params.decode;
        opts.sampling.validate()?;
        let mut frontier = self.frontier.clone().ok_or_else(not_primed)?;
        let mut dec =
            Decoder::new(lm, opts, self.last_token(&self.history))?.cancel_when(cancelled);
        let (mut accepted, mut rendered, mut stop) = (0, String::new(), None);
        let mut think_start = None;
        if let Some(p) = pending {
            match params.render {
                Render::Think { replace } => {
                    think_start = replace.then(|| p.start.clone());
                }
                Render::Draft { proposal, leash } => {
                    let d = render::draft(
                        lm,
                        &mut self.cache,
                        (p.start.position, &p.start.frontier),
                        &p.steps,
                        proposal,
                        leash,
                        &mut dec,
                        on_text,
                    )?;
                    accepted = d.accepted;
                    rendered = d.rendered;
                    stop = d.stop;
                    frontier = d.frontier;
                }
                Render::Translate { framing } => {
                    rendered = render::translate(lm, &p.steps, framing)?;
                    self.cache.truncate(p.start.position);
                    frontier = p.start.frontier.clone();
                    let ids = self.reading_ids(&rendered, &p.start.history)?;
                    let ids = &ids[..ids.len().min(dec.budget_left())];
                    accepted = ids.len();
                    if !ids.is_empty() {
                        frontier = Frontier::advance(lm, &mut self.cache, Input::Tokens(ids))?;
                        for &id in ids {
                            if let Some(s) = dec.take(id, on_text)? {
                                stop = Some(s);
                                break;
                            }
                        }
                    }
                }
            }
        }
        let stop = match stop {
            Some(s) => s,
            None => {
                let (s, f) = dec.run(&mut self.cache, frontier.host_logits()?, on_text)?;
                if let Some(hidden) = f.hidden {
                    let n = f.logits.len();
                    frontier = Frontier {
                        logits: Tensor::from_vec(f.logits, (1, n), hidden.device())?,
                        hidden,
                    };
                }
                s
            }
        };
        if let Some(p) = pending {
            if !matches!(params.render, Render::Think { replace: false }) {
                // The burst's positions were rewritten as text: checkpoints inside them are gone.
                let start = p.start.position;
                self.checkpoints.retain(|_, c| c.position <= start);
            }
        }
        let fork_entropy = dec.fork_entropy();
        let (tokens, text) = dec.finish(on_text);
        if let Some(start) = think_start {
            // `replace`: the latent positions give way to the text (the context is text again).
            self.restore(start);
            if !tokens.is_empty() {
                frontier = Frontier::advance(lm, &mut self.cache, Input::Tokens(&tokens))?;
            } else {
                frontier = self.frontier.clone().ok_or_else(not_primed)?;
            }
        }
        self.frontier = Some(frontier);
        self.history.extend(&tokens);
        let elapsed = t0.elapsed().as_secs_f64();
        Ok(CommitSummary {
            tokens_per_s: tokens.len() as f64 / elapsed.max(1e-9),
            tokens,
            text,
            stop,
            millis: elapsed * 1e3,
            proposed: pending.map_or(0, |p| p.steps.len()),
            accepted,
            rendered,
            fork_entropy,
        })
    }

    /// A reader's text as ids to splice in after `history`: a space first where the text
    /// before does not end a word.
    fn reading_ids(&self, reading: &str, history: &[u32]) -> lm::Result<Vec<u32>> {
        if reading.is_empty() {
            return Ok(Vec::new());
        }
        let needs_space = !reading
            .starts_with(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
            && !self
                .last_token(history)
                .is_some_and(|t| self.lm.tokenizer.ends_with_whitespace(t));
        let text = if needs_space {
            format!(" {reading}")
        } else {
            reading.to_string()
        };
        self.lm.tokenizer.encode_with(&text, false, false)
    }
}
