//! Constrained decoding: the model's output always parses against a JSON schema.
//!
//! llguidance computes, per step, the set of tokens that keep the output a valid prefix of the
//! schema's language (over a token trie built from our tokenizer's bytes); disallowed logits
//! are masked before choosing. Tokens the grammar forces (JSON keys, punctuation) are fed
//! without sampling, several per forward.

use crate::error::{MajordomoError, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use lm::Input;
use lm::{KvCache, LoadedModel};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Our tokenizer seen as llguidance wants it: a trie of token bytes, and a tokenize function.
struct TrieEnv {
    trie: TokTrie,
    tokenizer: lm::Tokenizer,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer
            .encode_with(&text, false, false)
            .unwrap_or_default()
    }
}

/// Builds grammars for one model. Building the trie walks the whole vocabulary once.
pub struct Constrainer {
    factory: ParserFactory,
}

impl Constrainer {
    pub fn new(lm: &LoadedModel) -> Result<Self> {
        let t = &lm.tokenizer;
        let mut words = t.all_token_bytes();
        for (id, w) in words.iter_mut().enumerate() {
            if t.is_special(id as u32) {
                w.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
        }
        let eos = t.end_of_turn().first().copied().or(t.eos()).unwrap_or(0);
        let mut info = TokRxInfo::new(words.len() as u32, eos);
        info.tok_bos = t.bos();
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(TrieEnv {
            trie,
            tokenizer: t.clone(),
        });
        let caps = InferenceCapabilities {
            ff_tokens: true,
            ..Default::default()
        };
        let factory = ParserFactory::new(
            &env,
            caps,
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| MajordomoError::Grammar(e.to_string()))?;
        Ok(Self { factory })
    }

    /// A fresh matcher for `schema`.
    pub fn matcher(&self, schema: &serde_json::Value) -> Result<Matcher> {
        let grammar = TopLevelGrammar::from_json_schema(schema.clone());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| MajordomoError::Grammar(e.to_string()))?;
        Ok(Matcher::new(Ok(parser)))
    }
}

/// Figures of one constrained decode.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DecodeStats {
    /// The prompt's tokens, and those of them whose KV came from the prefix cache.
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub tokens: usize,
    /// Tokens the grammar forced (fed without sampling).
    pub forced: usize,
    pub forwards: usize,
    pub mask_time: Duration,
    pub total_time: Duration,
}

impl DecodeStats {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.total_time.as_secs_f64().max(1e-9)
    }

    pub fn mask_micros_per_token(&self) -> f64 {
        self.mask_time.as_secs_f64() * 1e6 / (self.tokens - self.forced).max(1) as f64
    }
}

/// Decodes greedily from `logits` (the frontier of `cache`) under `matcher`, at most
/// `max_tokens`. Returns the text, which the grammar guarantees complete when it stopped.
/// With `fast_forward`, tokens the grammar forces are fed in one forward without sampling.
pub fn decode(
    lm: &LoadedModel,
    cache: &mut KvCache,
    mut logits: Vec<f32>,
    matcher: &mut Matcher,
    max_tokens: usize,
    fast_forward: bool,
    mut on_text: impl FnMut(&str),
) -> Result<(String, DecodeStats)> {
    let started = Instant::now();
    let mut stats = DecodeStats::default();
    let mut tokens: Vec<u32> = Vec::new();
    let mut stream = lm::TextStream::new(&lm.tokenizer, &[]);
    let mut emit = |ids: &[u32], stream: &mut lm::TextStream| -> Result<()> {
        for &id in ids {
            let piece = stream.push(id)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
        }
        Ok(())
    };
    let eos = matcher
        .tok_env()
        .map(|e| e.tok_trie().eos_token())
        .map_err(|e| MajordomoError::Grammar(e.to_string()))?;
    if fast_forward {
        // What the grammar forces before any choice (`{"verdict":"`): one forward for all of it.
        let forced: Vec<u32> = matcher
            .consume_ff_tokens()
            .into_iter()
            .filter(|&t| t != eos)
            .take(max_tokens)
            .collect();
        if !forced.is_empty() {
            stats.forced += forced.len();
            tokens.extend(&forced);
            emit(&forced, &mut stream)?;
            logits = feed(lm, cache, &forced)?;
            stats.forwards += 1;
        }
    }
    while tokens.len() < max_tokens && !matcher.is_stopped() {
        let t = Instant::now();
        let mask = matcher
            .compute_mask()
            .map_err(|e| MajordomoError::Grammar(e.to_string()))?;
        stats.mask_time += t.elapsed();
        mask.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        // Model rows past the tokenizer's vocabulary (padding) are never valid.
        for l in logits.iter_mut().skip(mask.len()) {
            *l = f32::NEG_INFINITY;
        }
        let id = lm::argmax(&logits);
        if !mask.is_allowed(id) {
            return Err(MajordomoError::Grammar(
                "no token satisfies the grammar".into(),
            ));
        }
        if id == eos || lm.tokenizer.end_of_turn().contains(&id) {
            break; // the grammar only allows end-of-text once the JSON is complete
        }
        matcher
            .consume_token(id)
            .map_err(|e| MajordomoError::Grammar(e.to_string()))?;
        let mut batch = vec![id];
        // Tokens the grammar forces next: feed them with this one, no sampling.
        let forced = if fast_forward {
            matcher.consume_ff_tokens()
        } else {
            Vec::new()
        };
        let room = max_tokens.saturating_sub(tokens.len() + 1);
        batch.extend(forced.iter().take(room).filter(|&&t| t != eos));
        stats.forced += batch.len() - 1;
        tokens.extend(&batch);
        emit(&batch, &mut stream)?;
        logits = feed(lm, cache, &batch)?;
        stats.forwards += 1;
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    stats.tokens = tokens.len();
    stats.total_time = started.elapsed();
    let text = lm.tokenizer.decode(&tokens, true)?;
    Ok((text, stats))
}

/// Feeds `batch` (chosen tokens) into `cache`; returns the logits after its last.
fn feed(lm: &LoadedModel, cache: &mut KvCache, batch: &[u32]) -> Result<Vec<f32>> {
    if cache.len() + batch.len() > cache.max_len() {
        return Err(MajordomoError::Lm(lm::LmError::ContextOverflow {
            needed: cache.len() + batch.len(),
            limit: cache.max_len(),
        }));
    }
    Ok(if let [id] = batch[..] {
        // One position batches with concurrent critiques' steps.
        lm.model.step(Input::Tokens(&[id]), cache)?.host_logits()?
    } else {
        lm.model
            .last_logits(&lm.model.forward(Input::Tokens(batch), cache)?)?
    })
}
