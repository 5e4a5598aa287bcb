//! From logits to a distribution and a token: the one home of distribution analysis.
//!
//! The distribution is returned, not only the token: dream steps mix embeddings by it, draft
//! renders test proposals against it, and telemetry reports it. Order of operations:
//! repetition penalty → temperature → softmax → top-k → top-p → min-p → renormalise. The full
//! softmax is never materialised: the temperature-scaled logits `z` and `log Z` describe it, so
//! entropy and KL cost one `exp` per vocabulary entry (`H = log Z − Σ p·z`), which keeps a
//! latent step on Gemma's 262k vocabulary as cheap as a token step.

use crate::error::{InvalidParam, LmError, Result};
use candle_core::Tensor;
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
    pub fn validate(&self) -> std::result::Result<(), InvalidParam> {
        let bad = |field, why: String| Err(InvalidParam::new(field, why));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", format!("must be in [0, 1), got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!(
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
    /// Entropy (nats) of the full softmax (at the temperature; at 1 when greedy) before any
    /// truncation.
    pub full_entropy: f32,
}

impl Distribution {
    /// Entropy (nats) of the kept distribution.
    pub fn entropy(&self) -> f32 {
        entropy(&self.probs)
    }

    /// The probability of `id` (0 when it was not kept).
    pub fn prob(&self, id: u32) -> f32 {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map_or(0.0, |k| self.probs[k])
    }

    /// The most probable token.
    pub fn top(&self) -> u32 {
        self.ids[0]
    }

    /// `max(0, self − other)` renormalised, over this distribution's support: what speculative
    /// sampling draws from after rejecting a proposal drawn from `other`. `None` when nothing
    /// is left (the two are equal).
    pub fn residual(&self, other: &Distribution) -> Option<Distribution> {
        let rest: Vec<f32> = self
            .ids
            .iter()
            .zip(&self.probs)
            .map(|(&id, &p)| (p - other.prob(id)).max(0.0))
            .collect();
        let sum: f32 = rest.iter().sum();
        (sum > 0.0 && sum.is_finite()).then(|| Distribution {
            ids: self.ids.clone(),
            probs: rest.iter().map(|r| r / sum).collect(),
            full_entropy: self.full_entropy,
        })
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

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The kept distribution for host `logits` under `params` (`history`: tokens for the
/// repetition penalty). Greedy (temperature 0) keeps the argmax alone.
pub fn distribution(logits: &[f32], params: &SamplingParams, history: &[u32]) -> Distribution {
    let penalised;
    let logits = if params.repetition_penalty != 1.0 && !history.is_empty() {
        let mut l = logits.to_vec();
        for &id in history {
            if let Some(x) = l.get_mut(id as usize) {
                *x = if *x > 0.0 {
                    *x / params.repetition_penalty
                } else {
                    *x * params.repetition_penalty
                };
            }
        }
        penalised = l;
        &penalised
    } else {
        logits
    };
    let (scaled, full_entropy, _) = Scaled::new(logits, params.temperature, None);
    scaled.keep(params, full_entropy)
}

/// The analysis of one step's logits: the kept distribution, the KL of the full distribution
/// to the previous step's, and what the next step compares against.
pub struct Analysis {
    pub kept: Distribution,
    /// `KL(p ‖ p_prev)` over the full distributions; none without a previous step.
    pub kl_prev: Option<f32>,
    pub reference: Reference,
}

/// A step's full distribution, kept for the next step's KL: on the host for CPU models, as
/// device log-probabilities for CUDA ones (then only `k` candidates reach the host).
pub struct Reference(Ref);

enum Ref {
    Host(Scaled),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(Tensor),
}

/// Analyses logits `[1, vocab]` (f32, on any device) under `params` (its repetition penalty
/// and seed are not used: a latent step has no history and draws nothing here).
pub fn analyze(
    logits: &Tensor,
    params: &SamplingParams,
    prev: Option<&Reference>,
) -> Result<Analysis> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return analyze_on_device(logits, params, prev);
    }
    let prev = match prev {
        Some(Reference(Ref::Host(s))) => Some(s),
        _ => None,
    };
    let host = logits.flatten_all()?.to_vec1::<f32>()?;
    let (scaled, full_entropy, kl_prev) = Scaled::new(&host, params.temperature, prev);
    Ok(Analysis {
        kept: scaled.keep(params, full_entropy),
        kl_prev,
        reference: Reference(Ref::Host(scaled)),
    })
}

#[cfg(feature = "cuda")]
fn analyze_on_device(
    logits: &Tensor,
    params: &SamplingParams,
    prev: Option<&Reference>,
) -> Result<Analysis> {
    use candle_core::DType;
    let greedy = params.temperature == 0.0;
    let inv_t = if greedy {
        1.0
    } else {
        1.0 / params.temperature
    };
    let prev_logp = match prev {
        Some(Reference(Ref::Device(t))) => Some(t),
        _ => None,
    };
    let (stats, logp) = crate::cuda::softmax_stats(logits, inv_t, prev_logp, true)?;
    let vocab = logits.dim(1)?;
    let k = if greedy {
        1
    } else {
        top_k_of(params, vocab).min(1024)
    };
    let (vals, idx) = crate::cuda::topk(logits, k)?;
    // One small copy to the host: statistics, values and ids (exact as f32 below 2^24).
    let all: Vec<f32> = Tensor::cat(
        &[
            stats.flatten_all()?,
            vals.flatten_all()?,
            idx.flatten_all()?.to_dtype(DType::F32)?,
        ],
        0,
    )?
    .to_vec1()?;
    let (log_z, full_entropy, kl) = (all[0], all[1], all[2]);
    let vals = &all[3..3 + k];
    let idx: Vec<u32> = all[3 + k..].iter().map(|&i| i as u32).collect();
    let kept = if greedy {
        Distribution {
            ids: vec![idx[0]],
            probs: vec![1.0],
            full_entropy,
        }
    } else {
        let top: Vec<(f32, u32)> = vals.iter().map(|&v| v * inv_t).zip(idx).collect();
        keep_top(&top, log_z, params, full_entropy)
    };
    let logp =
        logp.ok_or_else(|| LmError::Layout("softmax_stats kept no log-probabilities".into()))?;
    Ok(Analysis {
        kept,
        kl_prev: prev_logp.map(|_| kl),
        reference: Reference(Ref::Device(logp)),
    })
}

/// Top-k as a count: 0 (off) keeps the whole vocabulary.
fn top_k_of(params: &SamplingParams, vocab: usize) -> usize {
    if params.top_k == 0 {
        vocab
    } else {
        params.top_k.clamp(1, vocab)
    }
}

/// Temperature-scaled logits `z = l / T` and `log Z = log Σ exp z`: the full distribution
/// `p = exp(z − log Z)` without materialising it.
struct Scaled {
    z: Vec<f32>,
    log_z: f32,
    greedy: bool,
}

impl Scaled {
    /// Scales, and in the same single `exp` pass measures the full distribution: its
    /// entropy, and `KL(p ‖ p_prev)` when a previous step is given.
    fn new(logits: &[f32], temperature: f32, prev: Option<&Scaled>) -> (Self, f32, Option<f32>) {
        let greedy = temperature == 0.0;
        let inv_t = if greedy { 1.0 } else { 1.0 / temperature };
        let z: Vec<f32> = logits.iter().map(|&l| l * inv_t).collect();
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // One vectorised exp pass over the vocabulary (262k entries for Gemma, every step).
        let (sum, ez, ediff) = mm_kernels::exp_moments(&z, max, prev.map(|q| &q.z[..]));
        let log_z = max as f64 + sum.ln();
        let entropy = (log_z - ez / sum).max(0.0) as f32;
        let kl = prev.map(|q| (ediff / sum - log_z + q.log_z as f64).max(0.0) as f32);
        (
            Self {
                z,
                log_z: log_z as f32,
                greedy,
            },
            entropy,
            kl,
        )
    }

    /// The kept distribution: the top-k candidates (a bounded heap for small k, a selection
    /// for large k; never a sort of the vocabulary), then top-p and min-p, renormalised.
    fn keep(&self, params: &SamplingParams, full_entropy: f32) -> Distribution {
        if self.greedy {
            return Distribution {
                ids: vec![argmax(&self.z)],
                probs: vec![1.0],
                full_entropy,
            };
        }
        let k = top_k_of(params, self.z.len());
        let mut top: Vec<(f32, u32)> = if k <= 1024 {
            top_by_heap(&self.z, k)
        } else {
            let mut all: Vec<(f32, u32)> = self
                .z
                .iter()
                .enumerate()
                .map(|(i, &z)| (z, i as u32))
                .collect();
            if k < all.len() {
                all.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
                all.truncate(k);
            }
            all
        };
        top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        keep_top(&top, self.log_z, params, full_entropy)
    }
}

/// The `k` largest `(z, id)`, unordered.
fn top_by_heap(z: &[f32], k: usize) -> Vec<(f32, u32)> {
    use std::cmp::Reverse;
    let mut heap: std::collections::BinaryHeap<Reverse<(OrdF32, u32)>> =
        std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, &x) in z.iter().enumerate() {
        if heap.len() < k {
            heap.push(Reverse((OrdF32(x), i as u32)));
        } else if x > heap.peek().expect("k >= 1").0 .0 .0 {
            heap.pop();
            heap.push(Reverse((OrdF32(x), i as u32)));
        }
    }
    heap.into_iter().map(|Reverse((z, i))| (z.0, i)).collect()
}

/// The kept distribution from the top candidates `(z, id)` (sorted, most probable first) of a
/// distribution with log-normaliser `log_z`: top-p and min-p, renormalised.
fn keep_top(
    top: &[(f32, u32)],
    log_z: f32,
    params: &SamplingParams,
    full_entropy: f32,
) -> Distribution {
    let full: Vec<f32> = top.iter().map(|&(z, _)| (z - log_z).exp()).collect();
    let mut keep = top.len();
    if params.top_p < 1.0 {
        let mut acc = 0f32;
        for (i, p) in full.iter().enumerate() {
            acc += p;
            if acc >= params.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let floor = params.min_p * full[0];
        keep = keep.min(full.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let sum: f32 = full[..keep].iter().sum();
    Distribution {
        ids: top[..keep].iter().map(|&(_, i)| i).collect(),
        probs: full[..keep].iter().map(|p| p / sum).collect(),
        full_entropy,
    }
}

/// A float with a total order, for the top-k heap.
#[derive(Clone, Copy, PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}

impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A seeded sampler: the same seed and inputs give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate().map_err(LmError::InvalidParam)?;
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The kept distribution for the next token after `history`.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Distribution {
        distribution(logits, &self.params, history)
    }

    /// Draws a token; returns it with the distribution it was drawn from.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> (u32, Distribution) {
        let d = self.distribution(logits, history);
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

    /// A uniform draw in [0, 1) from the same stream (acceptance tests).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
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
        let d = distribution(&logits, &params(1.0, 0, 1.0, 0.0), &[]);
        assert_eq!(d.ids, vec![4, 0, 1, 2, 3], "top_k 0 keeps everything");
    }

    #[test]
    fn the_kept_distribution_matches_a_plain_softmax() {
        let logits: Vec<f32> = (0..3000)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        for k in [0, 5, 2000] {
            let p = params(0.8, k, 0.9, 0.05);
            let d = distribution(&logits, &p, &[]);
            let mut full = logits.clone();
            softmax_in_place(&mut full, 0.8);
            let mut idx: Vec<u32> = (0..full.len() as u32).collect();
            idx.sort_by(|a, b| {
                full[*b as usize]
                    .total_cmp(&full[*a as usize])
                    .then(a.cmp(b))
            });
            if k > 0 {
                idx.truncate(k);
            }
            let mut acc = 0.0;
            let cut = idx
                .iter()
                .position(|&i| {
                    acc += full[i as usize];
                    acc >= 0.9
                })
                .map_or(idx.len(), |n| n + 1);
            idx.truncate(cut);
            let floor = 0.05 * full[idx[0] as usize];
            idx.retain(|&i| full[i as usize] >= floor);
            assert_eq!(d.ids, idx, "top_k {k}");
            assert!((d.full_entropy - entropy(&full)).abs() < 1e-3);
        }
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
    fn the_residual_removes_what_the_proposal_covered() {
        let p = Distribution {
            ids: vec![1, 2, 3],
            probs: vec![0.5, 0.3, 0.2],
            full_entropy: 0.0,
        };
        let point = Distribution {
            ids: vec![1],
            probs: vec![1.0],
            full_entropy: 0.0,
        };
        let r = p.residual(&point).unwrap();
        assert_eq!(r.ids, vec![1, 2, 3]);
        assert!((r.probs[0]).abs() < 1e-6 && (r.probs[1] - 0.6).abs() < 1e-6);
        assert!(p.residual(&p).is_none());
        assert_eq!(p.prob(3), 0.2);
        assert_eq!(p.prob(9), 0.0);
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "temperature");
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().starts_with("top_p must be"), "{e}");
    }
}
