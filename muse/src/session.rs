//! One dreaming sequence: prime, bursts, commits, checkpoints and rewinds over a KV cache.

use crate::dream::{self, DreamParams, Frontier};
use crate::telemetry::{BurstSummary, CommitSummary, LatentStep};
use lm::candle::Tensor;
use lm::generate::{self, GenerateOptions};
use lm::model::Input;
use lm::{ChatMessage, KvCache, LmError, LoadedModel};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// What a commit does with the latent positions of the burst before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitMode {
    /// The latent positions stay in context.
    #[default]
    KeepLatent,
    /// Rewind to the burst's start and re-feed the committed text: the context is text again.
    Replace,
}

/// A named point to rewind to.
#[derive(Debug, Clone)]
struct Checkpoint {
    position: usize,
    frontier: Frontier,
    history: Vec<u32>,
}

/// The checkpoint every prime sets.
pub const PRIMED: &str = "primed";

pub struct DreamSession<'m> {
    lm: &'m LoadedModel,
    cache: KvCache,
    frontier: Option<Frontier>,
    /// Committed token ids since the prime (repetition penalty, `replace` re-feed).
    history: Vec<u32>,
    checkpoints: HashMap<String, Checkpoint>,
    /// Where the last burst began, for `replace` commits.
    last_burst: Option<Checkpoint>,
}

/// How a prompt is given.
#[derive(Debug, Clone)]
pub enum Prime {
    Chat(Vec<ChatMessage>),
    Raw(String),
    Tokens(Vec<u32>),
}

impl<'m> DreamSession<'m> {
    pub fn new(lm: &'m LoadedModel) -> Self {
        Self {
            lm,
            cache: lm.model.new_cache(),
            frontier: None,
            history: Vec::new(),
            checkpoints: HashMap::new(),
            last_burst: None,
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

    /// Resets the sequence and feeds the prologue as token ids; sets the `primed` checkpoint.
    /// Returns the prompt's token count.
    pub fn prime(&mut self, prime: &Prime) -> lm::Result<usize> {
        let ids = match prime {
            Prime::Chat(messages) => self.lm.chat_prompt(messages)?,
            Prime::Raw(text) => self.lm.raw_prompt(text)?,
            Prime::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(LmError::InvalidInput("the prompt is empty".into()));
        }
        self.lm.check_fits(ids.len())?;
        self.cache.clear();
        self.history.clear();
        self.checkpoints.clear();
        self.last_burst = None;
        self.frontier = Some(Frontier::advance(
            self.lm,
            &mut self.cache,
            Input::Tokens(&ids),
        )?);
        self.checkpoint(PRIMED)?;
        Ok(ids.len())
    }

    fn frontier_mut(&mut self) -> lm::Result<&mut Frontier> {
        self.frontier.as_mut().ok_or_else(|| {
            LmError::InvalidInput("the session is not primed: send a prime first".into())
        })
    }

    fn snapshot(&self) -> lm::Result<Checkpoint> {
        let frontier = self.frontier.clone().ok_or_else(|| {
            LmError::InvalidInput("the session is not primed: send a prime first".into())
        })?;
        Ok(Checkpoint {
            position: self.cache.len(),
            frontier,
            history: self.history.clone(),
        })
    }

    /// Names the current position.
    pub fn checkpoint(&mut self, name: &str) -> lm::Result<()> {
        if name.is_empty() {
            return Err(LmError::InvalidInput(
                "checkpoint name must not be empty".into(),
            ));
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

    /// Rewinds to a named checkpoint (the KV cache is truncated, nothing recomputed).
    pub fn rewind(&mut self, name: &str) -> lm::Result<usize> {
        let cp = self.checkpoints.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.checkpoints.keys().map(String::as_str).collect();
            known.sort();
            LmError::InvalidInput(format!(
                "unknown checkpoint `{name}` (known: {})",
                known.join(", ")
            ))
        })?;
        if cp.position > self.cache.len() {
            return Err(LmError::InvalidInput(format!(
                "checkpoint `{name}` lies past the current position (it was rewound over)"
            )));
        }
        self.restore(cp);
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

    /// A burst of latent steps.
    pub fn burst(
        &mut self,
        params: &DreamParams,
        on_step: impl FnMut(&LatentStep) -> bool,
    ) -> lm::Result<BurstSummary> {
        let start = self.snapshot()?;
        let lm = self.lm;
        let mut frontier = self.frontier_mut()?.clone();
        let result = dream::burst(lm, &mut self.cache, &mut frontier, params, on_step);
        match result {
            Ok(summary) => {
                self.frontier = Some(frontier);
                self.last_burst = Some(start);
                Ok(summary)
            }
            Err(e) => {
                // Leave the session where it was before the burst.
                self.restore(start);
                Err(e)
            }
        }
    }

    /// Decodes text from the current position. With `Replace`, the last burst's latent
    /// positions are then swapped for the committed tokens.
    pub fn commit(
        &mut self,
        opts: &GenerateOptions,
        mode: CommitMode,
        mut on_text: impl FnMut(&str),
    ) -> lm::Result<CommitSummary> {
        let t0 = Instant::now();
        let logits = self.frontier_mut()?.host_logits()?;
        let before = self.snapshot()?;
        opts.sampling.validate()?;
        let d = match generate::decode(self.lm, &mut self.cache, logits, opts, &mut on_text) {
            Ok(d) => d,
            Err(e) => {
                self.restore(before);
                return Err(e);
            }
        };
        let elapsed = t0.elapsed().as_secs_f64();
        if let Some(hidden) = d.hidden {
            let n = d.logits.len();
            let logits = Tensor::from_vec(d.logits, (1, n), hidden.device())?;
            self.frontier = Some(Frontier { logits, hidden });
        }
        if mode == CommitMode::Replace {
            if let Some(start) = self.last_burst.take() {
                self.restore(start);
                if !d.tokens.is_empty() {
                    self.frontier = Some(Frontier::advance(
                        self.lm,
                        &mut self.cache,
                        Input::Tokens(&d.tokens),
                    )?);
                }
            }
        }
        // A later `replace` must not reach back past this commit.
        self.last_burst = None;
        self.history.extend(&d.tokens);
        let (tokens, text, stop) = (d.tokens, d.text, d.stop);
        Ok(CommitSummary {
            tokens_per_s: tokens.len() as f64 / elapsed.max(1e-9),
            tokens,
            text,
            stop: stop.as_str().to_string(),
            millis: elapsed * 1e3,
        })
    }
}
