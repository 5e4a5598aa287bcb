//! Rendering a burst into text: what the commit after a burst does with its latent steps
//! (ARCHITECTURE.md, "Rendering"). Every step is accounted for in the text, or — `think` —
//! stays unspoken on purpose.

use crate::dream::{Frontier, Step};
use lm::candle::Tensor;
use lm::{
    ChatMessage, Decoder, Distribution, Input, InvalidParam, KvCache, LoadedModel, StopReason,
};
use serde::{Deserialize, Serialize};

/// Which token a latent step proposes in a draft render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proposal {
    /// The most probable token of the step's pre-noise `p`.
    Top,
    /// A draw from the step's pre-noise `p`, with the commit's sampler.
    Sample,
}

/// How plausible a proposal must stay under the hard (token) context to be kept.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Leash {
    /// Speculative sampling: keep with probability `min(1, p_hard/q)`, resample the first
    /// rejection from `max(0, p_hard − q)`. The text is distributed as plain sampling's.
    Exact,
    /// Keep when `p_hard ≥ epsilon` or `p_hard ≥ delta · max p_hard`: the dream pulls the text
    /// its way while every kept token stays plausible. `epsilon` 0 keeps every proposal.
    Typical { epsilon: f32, delta: f32 },
}

impl Leash {
    /// The leash a commit gets unless told otherwise.
    pub const DEFAULT: Leash = Leash::Typical {
        epsilon: 0.02,
        delta: 0.1,
    };

    pub fn validate(&self) -> Result<(), InvalidParam> {
        if let Leash::Typical { epsilon, delta } = *self {
            for (field, v) in [("leash.epsilon", epsilon), ("leash.delta", delta)] {
                if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                    return Err(InvalidParam::new(
                        field,
                        format!("must be in [0, 1], got {v}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `proposal`, drawn from `q`, is kept where the hard distribution is `p`.
    fn keeps(&self, p: &Distribution, q: &Distribution, proposal: u32, u: f32) -> bool {
        let p_x = p.prob(proposal);
        match *self {
            Leash::Exact => u * q.prob(proposal) < p_x,
            Leash::Typical { epsilon, delta } => p_x >= epsilon || p_x >= delta * p.probs[0],
        }
    }
}

/// How a translate render frames the vectors for its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// "The meaning of ⟨vectors⟩ in plain English is"
    Completion,
    /// The chat template, with the vectors inside the user turn.
    Instruction,
}

/// What a commit does with the burst before it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Render {
    Draft {
        proposal: Proposal,
        leash: Leash,
    },
    Translate {
        framing: Framing,
    },
    /// The steps stay in context as unspoken thought (`replace`: swapped for the text after).
    Think {
        replace: bool,
    },
}

impl Default for Render {
    fn default() -> Self {
        Render::Draft {
            proposal: Proposal::Top,
            leash: Leash::DEFAULT,
        }
    }
}

/// What a draft render kept, and where the text goes on from.
pub struct Drafted {
    pub accepted: usize,
    /// The text of the kept proposals.
    pub rendered: String,
    /// A stop the kept tokens caused (end of text among the proposals, a stop string, the budget).
    pub stop: Option<StopReason>,
    /// The logits after the last kept token, unless decoding stopped.
    pub frontier: Frontier,
}

/// The draft render. The cache is rewound to the burst's start (`start`: its position and
/// frontier); the proposals are fed as ids in one forward and kept while the leash allows;
/// the first rejection is resampled. Leaves the cache holding exactly the tokens taken.
#[allow(clippy::too_many_arguments)]
pub fn draft(
    lm: &LoadedModel,
    cache: &mut KvCache,
    start: (usize, &Frontier),
    steps: &[Step],
    proposal: Proposal,
    leash: Leash,
    dec: &mut Decoder,
    on_text: &mut impl FnMut(&str),
) -> lm::Result<Drafted> {
    let (start_pos, start_frontier) = start;
    cache.truncate(start_pos);
    let n = steps.len().min(dec.budget_left());
    if n == 0 {
        return Ok(Drafted {
            accepted: 0,
            rendered: String::new(),
            stop: None,
            frontier: start_frontier.clone(),
        });
    }
    let proposals: Vec<u32> = steps[..n]
        .iter()
        .map(|s| match proposal {
            Proposal::Top => s.p.top(),
            Proposal::Sample => dec.sampler().draw(&s.p),
        })
        .collect();
    let hidden = lm.model.forward(Input::Tokens(&proposals), cache)?;
    let all_logits = lm.model.logits(&hidden)?;
    let rows: Vec<Vec<f32>> = all_logits.to_vec2()?;
    // The frontier after the first `kept` proposals.
    let after = |kept: usize| -> lm::Result<Frontier> {
        Ok(match kept {
            0 => start_frontier.clone(),
            k => Frontier {
                logits: all_logits.narrow(0, k - 1, 1)?,
                hidden: hidden.narrow(0, k - 1, 1)?,
            },
        })
    };
    let budget_stop = |dec: &Decoder| (dec.budget_left() == 0).then_some(StopReason::MaxTokens);
    let mut p_logits = start_frontier.host_logits()?;
    for (i, &x) in proposals.iter().enumerate() {
        let p = dec.distribution(&p_logits);
        let q = match proposal {
            Proposal::Top => Distribution {
                ids: vec![x],
                probs: vec![1.0],
                full_entropy: 0.0,
            },
            Proposal::Sample => steps[i].p.clone(),
        };
        let u = dec.sampler().uniform();
        if !leash.keeps(&p, &q, x, u) {
            // Cut: keep the proposals before this one, and resample here.
            cache.truncate(start_pos + i);
            let rendered = dec.text().to_string();
            let y = match leash {
                Leash::Exact => p
                    .residual(&q)
                    .map_or_else(|| p.top(), |r| dec.sampler().draw(&r)),
                Leash::Typical { .. } => dec.sampler().draw(&p),
            };
            return Ok(match dec.take(y, on_text)? {
                Some(StopReason::EndOfText) => Drafted {
                    accepted: i,
                    rendered,
                    stop: Some(StopReason::EndOfText),
                    frontier: after(i)?,
                },
                stop => Drafted {
                    accepted: i,
                    rendered,
                    frontier: Frontier::advance(lm, cache, Input::Tokens(&[y]))?,
                    stop: stop.or(budget_stop(dec)),
                },
            });
        }
        if let Some(stop) = dec.take(x, on_text)? {
            // End of text is not taken: the cache must not hold it either.
            let kept = if stop == StopReason::EndOfText {
                i
            } else {
                i + 1
            };
            cache.truncate(start_pos + kept);
            return Ok(Drafted {
                accepted: kept,
                rendered: dec.text().to_string(),
                stop: Some(stop),
                frontier: after(kept)?,
            });
        }
        p_logits = rows[i].clone();
    }
    Ok(Drafted {
        accepted: n,
        rendered: dec.text().to_string(),
        stop: budget_stop(dec),
        frontier: after(n)?,
    })
}

/// The most tokens a reader writes per latent step (and a floor for short bursts).
const READ_TOKENS_PER_STEP: usize = 3;
const READ_TOKENS_MIN: usize = 8;

/// The translate render's reader: this model reads the steps' vectors, spliced into a framing
/// prompt of real token ids, and says in plain words what they mean. Greedy, one line; an
/// empty reading falls back to the steps' top tokens.
pub fn translate(lm: &LoadedModel, steps: &[Step], framing: Framing) -> lm::Result<String> {
    if steps.is_empty() {
        return Ok(String::new());
    }
    let vectors = Tensor::cat(
        &steps.iter().map(|s| s.vector.clone()).collect::<Vec<_>>(),
        0,
    )?;
    let (before, after) = framing_ids(lm, framing)?;
    let mut cache = lm.model.new_cache();
    lm.check_fits(before.len() + steps.len() + after.len() + READ_TOKENS_MIN)?;
    lm.model.forward(Input::Tokens(&before), &mut cache)?;
    lm.model.forward(Input::Vectors(&vectors), &mut cache)?;
    let h = lm.model.forward(Input::Tokens(&after), &mut cache)?;
    let opts = lm::GenerateOptions {
        sampling: lm::SamplingParams::greedy(),
        max_tokens: (READ_TOKENS_PER_STEP * steps.len()).max(READ_TOKENS_MIN),
        stop_strings: vec!["\n".into()],
        ..Default::default()
    };
    let read = lm::decode(
        lm,
        &mut cache,
        lm.model.last_logits(&h)?,
        &opts,
        after.last().copied(),
        |_| {},
    )?;
    let text = clean_reading(&read.text);
    Ok(if text.is_empty() {
        steps
            .iter()
            .map(|s| lm.tokenizer.token_text(s.p.top()))
            .collect::<String>()
            .trim()
            .to_string()
    } else {
        text
    })
}

/// The framing prompt's ids before and after the vectors.
fn framing_ids(lm: &LoadedModel, framing: Framing) -> lm::Result<(Vec<u32>, Vec<u32>)> {
    match framing {
        Framing::Completion => Ok((
            lm.raw_prompt("The meaning of")?,
            lm.tokenizer
                .encode_with(" in plain English is", false, false)?,
        )),
        Framing::Instruction => {
            // Rendered around a placeholder, then split: the markers stay real special ids.
            const SLOT: &str = "\u{1F}VECTORS\u{1F}";
            let text = lm.chat.render(
                &[ChatMessage::user(format!(
                    "What do these words mean, in plain English? {SLOT}"
                ))],
                true,
            )?;
            let (head, tail) = text.split_once(SLOT).ok_or_else(|| {
                lm::LmError::ChatTemplate("the template dropped the user text".into())
            })?;
            Ok((
                lm.encode_rendered(head)?,
                lm.tokenizer.encode_with(tail, true, false)?,
            ))
        }
    }
}

/// A reading as text to splice in: one line, without the quotes and colons readers put
/// around an answer, without a trailing full stop.
fn clean_reading(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.trim_matches(|c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '"' | '“' | '”' | '\'' | '`' | '*' | ':' | '-' | '—' | '.'
            )
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(ids: &[u32], probs: &[f32]) -> Distribution {
        Distribution {
            ids: ids.to_vec(),
            probs: probs.to_vec(),
            full_entropy: 0.0,
        }
    }

    #[test]
    fn leashes_keep_what_they_promise() {
        let p = dist(&[1, 2, 3], &[0.6, 0.3, 0.1]);
        let point = |x| dist(&[x], &[1.0]);
        // Exact, point proposal: kept with probability p(x).
        assert!(Leash::Exact.keeps(&p, &point(2), 2, 0.29));
        assert!(!Leash::Exact.keeps(&p, &point(2), 2, 0.31));
        assert!(!Leash::Exact.keeps(&p, &point(9), 9, 0.0));
        let t = Leash::Typical {
            epsilon: 0.2,
            delta: 0.5,
        };
        assert!(t.keeps(&p, &point(2), 2, 0.99));
        assert!(!t.keeps(&p, &point(3), 3, 0.0));
        let all = Leash::Typical {
            epsilon: 0.0,
            delta: 0.0,
        };
        assert!(
            all.keeps(&p, &point(9), 9, 0.99),
            "epsilon 0 keeps every proposal"
        );
        assert!(Leash::Typical {
            epsilon: 1.5,
            delta: 0.0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn readings_are_cleaned_to_one_plain_line() {
        assert_eq!(clean_reading(" \"a lighthouse\".\nMore"), "a lighthouse");
        assert_eq!(clean_reading(": Paris."), "Paris");
        assert_eq!(clean_reading("\n"), "");
    }
}
