//! Turning logits into a distribution and a token.
//!
//! The distribution is returned, not only the token: dream steps mix embeddings by it and
//! telemetry reports it. Order of operations: repetition penalty → temperature → softmax →
//! top-k → top-p → min-p → renormalise.

use crate::error::{LmError, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off. Keeps tokens with `p >= min_p · p_max`.
    pub min_p: f32,
    /// 1 = off. Divides positive (multiplies negative) logits of tokens already seen.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every knob; the error names the field and its valid range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(LmError::InvalidInput(format!("{field} {why}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                &format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", &format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", &format!("must be in [0, 1), got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                &format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        Ok(())
    }
}

/// A renormalised distribution over the kept tokens, most probable first.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
    /// Entropy (nats) of the full softmax before any truncation.
    pub full_entropy: f32,
}

impl Distribution {
    /// Entropy (nats) of the kept distribution.
    pub fn entropy(&self) -> f32 {
        entropy(&self.probs)
    }
}

pub fn entropy(p: &[f32]) -> f32 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.ln())
        .sum::<f32>()
}

/// Softmax of `logits / temperature` (temperature > 0), in place.
pub fn softmax_in_place(xs: &mut [f32], temperature: f32) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = ((*x - max) / temperature).exp();
        sum += *x;
    }
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

/// The kept distribution for `logits` under `params` (`history`: tokens for the repetition
/// penalty). Greedy (temperature 0) keeps the argmax alone.
pub fn distribution(logits: &[f32], params: &SamplingParams, history: &[u32]) -> Distribution {
    truncate(&full_softmax(logits, params, history), params)
}

/// The whole softmax after the repetition penalty and temperature (1 when greedy).
pub fn full_softmax(logits: &[f32], params: &SamplingParams, history: &[u32]) -> Vec<f32> {
    let mut l = logits.to_vec();
    if params.repetition_penalty != 1.0 {
        for &id in history {
            if let Some(x) = l.get_mut(id as usize) {
                *x = if *x > 0.0 {
                    *x / params.repetition_penalty
                } else {
                    *x * params.repetition_penalty
                };
            }
        }
    }
    let t = if params.temperature > 0.0 {
        params.temperature
    } else {
        1.0
    };
    softmax_in_place(&mut l, t);
    l
}

/// Applies top-k, top-p and min-p to a full softmax and renormalises what is kept.
pub fn truncate(full: &[f32], params: &SamplingParams) -> Distribution {
    let full_entropy = entropy(full);
    if params.temperature == 0.0 {
        return Distribution {
            ids: vec![argmax(full)],
            probs: vec![1.0],
            full_entropy,
        };
    }
    let mut idx: Vec<u32> = (0..full.len() as u32).collect();
    let by_prob = |a: &u32, b: &u32| full[*b as usize].total_cmp(&full[*a as usize]);
    if params.top_k > 0 && params.top_k < idx.len() {
        idx.select_nth_unstable_by(params.top_k - 1, by_prob);
        idx.truncate(params.top_k);
    }
    idx.sort_unstable_by(by_prob);
    if params.top_p < 1.0 {
        let mut acc = 0f32;
        let mut keep = idx.len();
        for (i, &id) in idx.iter().enumerate() {
            acc += full[id as usize];
            if acc >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    if params.min_p > 0.0 {
        let floor = params.min_p * full[idx[0] as usize];
        idx.retain(|&id| full[id as usize] >= floor);
    }
    let sum: f32 = idx.iter().map(|&id| full[id as usize]).sum();
    let probs = idx.iter().map(|&id| full[id as usize] / sum).collect();
    Distribution {
        ids: idx,
        probs,
        full_entropy,
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// A seeded sampler: the same seed and inputs give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draws a token; returns it with the distribution it was drawn from.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> (u32, Distribution) {
        let d = distribution(logits, &self.params, history);
        let id = self.draw(&d);
        (id, d)
    }

    /// Draws an id from `d` (the first when it holds one).
    pub fn draw(&mut self, d: &Distribution) -> u32 {
        if d.ids.len() == 1 {
            return d.ids[0];
        }
        let r: f32 = self.rng.random();
        let mut acc = 0f32;
        for (&id, &p) in d.ids.iter().zip(&d.probs) {
            acc += p;
            if r < acc {
                return id;
            }
        }
        *d.ids
            .last()
            .expect("a distribution keeps at least one token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            repetition_penalty: 1.0,
            seed: 7,
        }
    }

    #[test]
    fn truncations_keep_the_right_tokens() {
        let logits = [2.0f32, 1.0, 0.5, -1.0, 3.0];
        let d = distribution(&logits, &params(1.0, 2, 1.0, 0.0), &[]);
        assert_eq!(d.ids, vec![4, 0]);
        assert!((d.probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let d = distribution(&logits, &params(1.0, 0, 0.5, 0.0), &[]);
        assert_eq!(d.ids, vec![4]);
        let d = distribution(&logits, &params(1.0, 0, 1.0, 0.3), &[]);
        assert_eq!(d.ids, vec![4, 0]); // e^-1 = 0.37 >= 0.3 keeps id 0; e^-2 < 0.3 drops id 1
        let d = distribution(&logits, &params(0.0, 0, 1.0, 0.0), &[]);
        assert_eq!((d.ids, d.probs), (vec![4], vec![1.0]));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let logits = [2.0f32, 1.9];
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0, 0, 1.0, 0.0)
        };
        assert_eq!(distribution(&logits, &p, &[0]).ids, vec![1]);
    }

    #[test]
    fn seeded_sampling_repeats_and_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0, 0, 1.0, 0.0)
            })
            .unwrap();
            (0..20)
                .map(|_| s.sample(&logits, &[]).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
    }
}
