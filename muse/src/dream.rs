//! The dream loop (DESIGN.md §4): latent steps that feed a vector, not a token, back into the
//! model, and the commit that renders the dream as text.
//!
//! One latent step: logits → concept temperature, top-k/top-p/min-p → `p`; optional Gumbel /
//! Dirichlet noise on `p`; a vector from `p` (concept), from the last hidden state (hidden) or
//! both (blend); optional Gaussian noise and renormalisation; a guard; the forward. Every
//! random draw comes from one seeded RNG per burst, so a dream replays bit for bit.

use crate::telemetry::{BurstSummary, LatentStep, StopReason, TopToken};
use lm::candle::{DType, Tensor};
use lm::model::Input;
use lm::sampling::{self, Distribution, SamplingParams};
use lm::{KvCache, LoadedModel};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution as _, Gamma, Gumbel, StandardNormal};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatentMode {
    /// Soft Thinking: `e = Σ pᵢ·E[i]` over the kept tokens.
    Concept,
    /// Coconut-style: the last final hidden state, rescaled to the embeddings' mean row RMS.
    Hidden,
    /// `α·concept + (1−α)·hidden`.
    Blend,
}

impl LatentMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "concept" => Some(Self::Concept),
            "hidden" => Some(Self::Hidden),
            "blend" => Some(Self::Blend),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Concept => "concept",
            Self::Hidden => "hidden",
            Self::Blend => "blend",
        }
    }
}

/// How much telemetry a latent step reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryLevel {
    /// Per-burst summary only.
    None,
    /// Entropies, top tokens, ‖e‖, KL.
    Basic,
    /// Also the nearest token to `e` by cosine (a vocabulary-sized product per step).
    Full,
}

/// Knobs of one burst. Validated by [`DreamParams::validate`]; errors name the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DreamParams {
    pub mode: LatentMode,
    /// Weight of the concept vector in `blend`.
    pub blend_alpha: f32,
    /// Concept temperature `T` (0: the argmax alone, i.e. greedy).
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Gumbel-softmax temperature τ on the kept weights (None: off).
    pub gumbel_tau: Option<f32>,
    /// Dirichlet concentration scale α: `p ← Dirichlet(α·p)` (None: off).
    pub dirichlet_alpha: Option<f32>,
    /// Gaussian noise σ, in units of the embeddings' mean row RMS (0: off).
    pub noise: f32,
    /// Renormalise `e` to this RMS (None: off).
    pub target_rms: Option<f32>,
    pub seed: u64,
    /// Step budget N.
    pub steps: usize,
    /// Cold stop: end when the kept entropy stays below `threshold` nats for `patience` steps.
    pub cold_stop: Option<ColdStop>,
    /// Guard: stop when ‖e‖ exceeds this multiple of a typical embedding's norm.
    pub max_norm_ratio: f32,
    pub telemetry: TelemetryLevel,
    /// Top tokens reported per step.
    pub top_n: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColdStop {
    pub threshold: f32,
    pub patience: usize,
}

impl Default for DreamParams {
    fn default() -> Self {
        Self {
            mode: LatentMode::Concept,
            blend_alpha: 0.5,
            temperature: 0.8,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            gumbel_tau: None,
            dirichlet_alpha: None,
            noise: 0.0,
            target_rms: None,
            seed: 0,
            steps: 8,
            cold_stop: None,
            max_norm_ratio: 50.0,
            telemetry: TelemetryLevel::Basic,
            top_n: 5,
        }
    }
}

/// The most latent steps one burst may take.
pub const MAX_STEPS: usize = 4096;

impl DreamParams {
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: Option<f32>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(format!("{name} must be a finite number > 0, got {x}"))
            }
            _ => Ok(()),
        };
        self.sampling()
            .validate()
            .map_err(|e| e.to_string().replace("invalid input: ", ""))?;
        if self.top_k == 0 {
            return Err("top_k must be >= 1: a concept mixes the k most probable tokens".into());
        }
        positive("gumbel_tau", self.gumbel_tau)?;
        positive("dirichlet_alpha", self.dirichlet_alpha)?;
        positive("target_rms", self.target_rms)?;
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(format!(
                "noise must be a finite number >= 0, got {}",
                self.noise
            ));
        }
        if !(self.blend_alpha.is_finite() && (0.0..=1.0).contains(&self.blend_alpha)) {
            return Err(format!(
                "blend_alpha must be in [0, 1], got {}",
                self.blend_alpha
            ));
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(format!(
                "steps must be in 1..={MAX_STEPS}, got {}",
                self.steps
            ));
        }
        if let Some(c) = self.cold_stop {
            if !(c.threshold.is_finite() && c.threshold >= 0.0) || c.patience == 0 {
                return Err(format!(
                    "cold_stop needs threshold >= 0 and patience >= 1, got {} and {}",
                    c.threshold, c.patience
                ));
            }
        }
        if !(self.max_norm_ratio.is_finite() && self.max_norm_ratio > 0.0) {
            return Err(format!(
                "max_norm_ratio must be > 0, got {}",
                self.max_norm_ratio
            ));
        }
        Ok(())
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: 1.0,
            seed: self.seed,
        }
    }
}

/// Where a sequence stands: what the model said last. Both stay on the model's device, so a
/// latent step on a GPU never copies the vocabulary-sized logits to the host.
#[derive(Debug, Clone)]
pub struct Frontier {
    /// Logits `[1, vocab]` (f32) at the last position.
    pub logits: Tensor,
    /// Final hidden state `[1, hidden]` at the last position.
    pub hidden: Tensor,
}

impl Frontier {
    /// Feeds `input` and returns the new frontier.
    pub fn advance(lm: &LoadedModel, cache: &mut KvCache, input: Input) -> lm::Result<Self> {
        let h = lm.model.forward(input, cache)?;
        let n = h.dim(0)?;
        let hidden = h.narrow(0, n - 1, 1)?;
        let logits = lm.model.logits(&hidden)?;
        Ok(Self { logits, hidden })
    }

    /// The logits as a host vector (token sampling and tests).
    pub fn host_logits(&self) -> lm::Result<Vec<f32>> {
        Ok(self.logits.squeeze(0)?.to_vec1()?)
    }
}

/// Runs one burst from `frontier`, calling `on_step` after each latent step (return false to
/// cancel). Updates `frontier` and the cache in place.
pub fn burst(
    lm: &LoadedModel,
    cache: &mut KvCache,
    frontier: &mut Frontier,
    params: &DreamParams,
    mut on_step: impl FnMut(&LatentStep) -> bool,
) -> lm::Result<BurstSummary> {
    params.validate().map_err(lm::LmError::InvalidInput)?;
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
    let emb = lm.model.embedding();
    let rms_e = emb.mean_row_rms();
    let norm_limit = params.max_norm_ratio * rms_e * (emb.hidden() as f32).sqrt();
    let sampling = params.sampling();
    let mut prev: Option<Previous> = None;
    let mut cold = 0usize;
    let mut entropies = Vec::new();
    let start_pos = cache.len();
    let mut stop = StopReason::Budget;
    for step in 0..params.steps {
        if cache.len() >= cache.max_len() {
            stop = StopReason::ContextFull;
            break;
        }
        let t0 = Instant::now();
        let (kept, kl, this) = analyze(&frontier.logits, params, &sampling, prev.as_ref())?;
        let kept_entropy = kept.entropy();
        let mixed = add_noise(&kept, params, &mut rng);
        let e = latent_vector(lm, frontier, &mixed, params, rms_e, &mut rng)?;
        let norm = e.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        entropies.push(kept_entropy);
        let mut record = LatentStep {
            step,
            entropy_full: kept.full_entropy,
            entropy: kept_entropy,
            top: top_tokens(lm, &mixed, params.top_n),
            norm,
            kl_prev: kl,
            nearest: None,
            micros: 0,
        };
        if !norm.is_finite() {
            stop = StopReason::NonFinite;
            emit(&mut record, t0, params, &mut on_step);
            break;
        }
        if norm > norm_limit {
            stop = StopReason::NormBlowup;
            emit(&mut record, t0, params, &mut on_step);
            break;
        }
        if params.telemetry == TelemetryLevel::Full {
            let (id, cos) = emb.nearest(&e)?;
            record.nearest = Some((token_text(lm, id), id, cos));
        }
        *frontier = Frontier::advance(lm, cache, Input::Vectors(&e))?;
        prev = Some(this);
        if !emit(&mut record, t0, params, &mut on_step) {
            stop = StopReason::Cancelled;
            break;
        }
        if let Some(c) = params.cold_stop {
            cold = if kept_entropy < c.threshold {
                cold + 1
            } else {
                0
            };
            if cold >= c.patience {
                stop = StopReason::ColdStop;
                break;
            }
        }
    }
    Ok(BurstSummary {
        steps: cache.len() - start_pos,
        stop,
        millis: started.elapsed().as_secs_f64() * 1e3,
        mean_entropy: if entropies.is_empty() {
            0.0
        } else {
            entropies.iter().sum::<f32>() / entropies.len() as f32
        },
        start_position: start_pos,
    })
}

fn emit(
    record: &mut LatentStep,
    t0: Instant,
    params: &DreamParams,
    on_step: &mut impl FnMut(&LatentStep) -> bool,
) -> bool {
    record.micros = t0.elapsed().as_micros() as u64;
    if params.telemetry == TelemetryLevel::None {
        return true;
    }
    on_step(record)
}

/// Gumbel-softmax, then Dirichlet, on the kept weights (each optional).
fn add_noise(kept: &Distribution, params: &DreamParams, rng: &mut impl Rng) -> Distribution {
    let mut d = kept.clone();
    if let Some(tau) = params.gumbel_tau {
        let g = Gumbel::new(0.0f32, 1.0).expect("valid gumbel");
        let mut logits: Vec<f32> = d
            .probs
            .iter()
            .map(|&p| (p.max(1e-30).ln() + g.sample(rng)) / tau)
            .collect();
        sampling::softmax_in_place(&mut logits, 1.0);
        d.probs = logits;
    }
    if let Some(alpha) = params.dirichlet_alpha {
        let draws: Vec<f32> = d
            .probs
            .iter()
            .map(|&p| {
                Gamma::new((alpha * p).max(1e-6), 1.0)
                    .map(|g| g.sample(rng))
                    .unwrap_or(0.0)
            })
            .collect();
        let sum: f32 = draws.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            d.probs = draws.iter().map(|x| x / sum).collect();
        }
    }
    // Keep "most probable first" for reporting.
    let mut order: Vec<usize> = (0..d.ids.len()).collect();
    order.sort_by(|&a, &b| d.probs[b].total_cmp(&d.probs[a]));
    Distribution {
        ids: order.iter().map(|&i| d.ids[i]).collect(),
        probs: order.iter().map(|&i| d.probs[i]).collect(),
        full_entropy: d.full_entropy,
    }
}

/// The vector fed at the next position, `[1, hidden]`.
fn latent_vector(
    lm: &LoadedModel,
    frontier: &Frontier,
    p: &Distribution,
    params: &DreamParams,
    rms_e: f32,
    rng: &mut impl Rng,
) -> lm::Result<Tensor> {
    let emb = lm.model.embedding();
    // In f32 whatever the model's dtype (bf16 on a GPU): noise, blending and norms are f32.
    let concept = || -> lm::Result<Tensor> { Ok(emb.mix(&p.ids, &p.probs)?.to_dtype(DType::F32)?) };
    let hidden = || -> lm::Result<Tensor> {
        // Rescaled on the model's device: no round trip to the host for the rms.
        let h = frontier.hidden.to_dtype(DType::F32)?;
        let rms = (h.sqr()?.mean_all()?.sqrt()? + 1e-12)?;
        Ok((h.broadcast_div(&rms)? * rms_e as f64)?)
    };
    let mut e = match params.mode {
        LatentMode::Concept => concept()?,
        LatentMode::Hidden => hidden()?,
        LatentMode::Blend => {
            let a = params.blend_alpha as f64;
            ((concept()? * a)? + (hidden()? * (1.0 - a))?)?
        }
    };
    if params.noise > 0.0 {
        let n = emb.hidden();
        let eps: Vec<f32> = (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let eps = Tensor::from_vec(eps, (1, n), e.device())?.to_dtype(e.dtype())?;
        e = (e + (eps * (params.noise * rms_e) as f64)?)?;
    }
    if let Some(target) = params.target_rms {
        let rms = e.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        if rms > 0.0 && rms.is_finite() {
            e = (e * (target / rms) as f64)?;
        }
    }
    Ok(e)
}

/// Temperature-scaled logits `z = l / T` and `log Z = log Σ exp z`: the full distribution
/// `p = exp(z − log Z)` without materialising it. Entropy and KL then need one `exp` per
/// vocabulary entry and no `ln` (`H = log Z − Σ p·z`), which keeps a latent step on a 262k
/// vocabulary as cheap as a token step.
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
        let (mut sum, mut ez, mut ediff) = (0f64, 0f64, 0f64);
        for (i, &x) in z.iter().enumerate() {
            let e = (x - max).exp() as f64;
            sum += e;
            ez += e * x as f64;
            if let Some(q) = prev {
                ediff += e * (x - q.z[i]) as f64;
            }
        }
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

    /// The kept distribution: top-k by a bounded heap (no sort of the vocabulary), then top-p
    /// and min-p, renormalised.
    fn keep(&self, params: &SamplingParams, full_entropy: f32) -> Distribution {
        if self.greedy {
            return Distribution {
                ids: vec![sampling::argmax(&self.z)],
                probs: vec![1.0],
                full_entropy,
            };
        }
        let k = params.top_k.clamp(1, self.z.len());
        let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(OrdF32, u32)>> =
            std::collections::BinaryHeap::with_capacity(k + 1);
        for (i, &z) in self.z.iter().enumerate() {
            if heap.len() < k {
                heap.push(std::cmp::Reverse((OrdF32(z), i as u32)));
            } else if z > heap.peek().expect("k >= 1").0 .0 .0 {
                heap.pop();
                heap.push(std::cmp::Reverse((OrdF32(z), i as u32)));
            }
        }
        let mut top: Vec<(f32, u32)> = heap
            .into_iter()
            .map(|std::cmp::Reverse((z, i))| (z.0, i))
            .collect();
        top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        keep_top(&top, self.log_z, params, full_entropy)
    }
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

/// What the next step's KL is measured against: the previous step's distribution, where it
/// was computed (host for CPU models, device log-probabilities for CUDA ones).
enum Previous {
    Host(Scaled),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device(Tensor),
}

/// One step's distribution work: the kept distribution, `KL(p ‖ p_prev)`, and what the next
/// step compares against. On a CUDA device only `k` candidates and three statistics reach
/// the host.
fn analyze(
    logits: &Tensor,
    params: &DreamParams,
    sampling: &SamplingParams,
    prev: Option<&Previous>,
) -> lm::Result<(Distribution, Option<f32>, Previous)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return analyze_on_device(logits, params, sampling, prev);
    }
    let prev = match prev {
        Some(Previous::Host(s)) => Some(s),
        _ => None,
    };
    let host = logits.flatten_all()?.to_vec1::<f32>()?;
    let (scaled, full_entropy, kl) = Scaled::new(&host, params.temperature, prev);
    let kept = scaled.keep(sampling, full_entropy);
    Ok((kept, kl, Previous::Host(scaled)))
}

#[cfg(feature = "cuda")]
fn analyze_on_device(
    logits: &Tensor,
    params: &DreamParams,
    sampling: &SamplingParams,
    prev: Option<&Previous>,
) -> lm::Result<(Distribution, Option<f32>, Previous)> {
    let greedy = params.temperature == 0.0;
    let inv_t = if greedy {
        1.0
    } else {
        1.0 / params.temperature
    };
    let prev_logp = match prev {
        Some(Previous::Device(t)) => Some(t),
        _ => None,
    };
    let (stats, logp) = lm::cuda::softmax_stats(logits, inv_t, prev_logp, true)?;
    let vocab = logits.dim(1)?;
    let k = if greedy {
        1
    } else {
        sampling.top_k.clamp(1, 1024).min(vocab)
    };
    let (vals, idx) = lm::cuda::topk(logits, k)?;
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
        keep_top(&top, log_z, sampling, full_entropy)
    };
    let logp = logp.expect("asked for log-probabilities");
    Ok((kept, prev_logp.map(|_| kl), Previous::Device(logp)))
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

fn top_tokens(lm: &LoadedModel, d: &Distribution, n: usize) -> Vec<TopToken> {
    d.ids
        .iter()
        .zip(&d.probs)
        .take(n)
        .map(|(&id, &p)| TopToken {
            id,
            text: token_text(lm, id),
            p,
        })
        .collect()
}

/// A token as people read it (`" Paris"`, not `ĠParis`).
pub fn token_text(lm: &LoadedModel, id: u32) -> String {
    lm.tokenizer.decode(&[id], false).unwrap_or_default()
}
