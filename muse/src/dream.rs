//! The dream loop (ARCHITECTURE.md, "The dream"): latent steps that feed a vector, not a
//! token, back into the model.
//!
//! One latent step: logits → concept temperature, top-k/top-p/min-p → `p`; optional Gumbel /
//! Dirichlet noise on `p`; a vector from `p` (concept), from the last hidden state (hidden),
//! both (blend), or `p` leaning on a sampled token (mixture); optional Gaussian noise and
//! renormalisation; a guard; the forward. Every random draw comes from one seeded RNG per
//! burst, so a dream replays bit for bit. Each step is kept (its pre-noise `p` and its vector)
//! so that the commit after the burst can render it into text.

use crate::telemetry::{BurstStop, BurstSummary, LatentStep, TopToken};
use lm::candle::{DType, Tensor};
use lm::{Distribution, Input, InvalidParam, KvCache, LoadedModel, SamplingParams};
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
    /// Mixture of Inputs: `(H·p + (β+1−H)·onehot(sampled)) / (β+1)` mixed like a concept, with
    /// `H` the entropy of `p` normalised by `log(kept)`: a confident step stays near its token.
    Mixture,
}

impl LatentMode {
    pub const ALL: [LatentMode; 4] = [Self::Concept, Self::Hidden, Self::Blend, Self::Mixture];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Concept => "concept",
            Self::Hidden => "hidden",
            Self::Blend => "blend",
            Self::Mixture => "mixture",
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

/// Knobs of one burst, valid by construction once [`DreamParams::validate`] passed (each
/// edge — gRPC, CLI — builds them once and validates once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DreamParams {
    pub mode: LatentMode,
    /// Weight of the concept vector in `blend`.
    pub blend_alpha: f32,
    /// Weight of the sampled token in `mixture` (β).
    pub moi_beta: f32,
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

/// The concept temperature a dream runs at unless told otherwise.
pub const DEFAULT_CONCEPT_TEMPERATURE: f32 = 0.8;

impl Default for DreamParams {
    fn default() -> Self {
        Self {
            mode: LatentMode::Concept,
            blend_alpha: 0.5,
            moi_beta: 1.0,
            temperature: DEFAULT_CONCEPT_TEMPERATURE,
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
    /// Checks every knob; the error names the field (as the burst's fields are named).
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |field, why: String| Err(InvalidParam::new(field, why));
        let positive = |field, v: Option<f32>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                bad(field, format!("must be a finite number > 0, got {x}"))
            }
            _ => Ok(()),
        };
        self.sampling().validate()?;
        if self.top_k == 0 {
            return bad(
                "top_k",
                "must be >= 1: a concept mixes the k most probable tokens".into(),
            );
        }
        positive("gumbel_tau", self.gumbel_tau)?;
        positive("dirichlet_alpha", self.dirichlet_alpha)?;
        positive("target_rms", self.target_rms)?;
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return bad(
                "noise",
                format!("must be a finite number >= 0, got {}", self.noise),
            );
        }
        if !(self.blend_alpha.is_finite() && (0.0..=1.0).contains(&self.blend_alpha)) {
            return bad(
                "blend_alpha",
                format!("must be in [0, 1], got {}", self.blend_alpha),
            );
        }
        if !(self.moi_beta.is_finite() && self.moi_beta >= 0.0) {
            return bad(
                "moi_beta",
                format!("must be a finite number >= 0, got {}", self.moi_beta),
            );
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(
                "steps",
                format!("must be in 1..={MAX_STEPS}, got {}", self.steps),
            );
        }
        if let Some(c) = self.cold_stop {
            if !(c.threshold.is_finite() && c.threshold >= 0.0) || c.patience == 0 {
                return bad(
                    "cold_stop",
                    format!(
                        "needs threshold >= 0 and patience >= 1, got {} and {}",
                        c.threshold, c.patience
                    ),
                );
            }
        }
        if !(self.max_norm_ratio.is_finite() && self.max_norm_ratio > 0.0) {
            return bad(
                "max_norm_ratio",
                format!("must be > 0, got {}", self.max_norm_ratio),
            );
        }
        Ok(())
    }

    /// The concept distribution's truncation, as sampling parameters.
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
    /// Feeds `input` and returns the new frontier. One position is a step, batched with
    /// other sessions' steps.
    pub fn advance(lm: &LoadedModel, cache: &mut KvCache, input: Input) -> lm::Result<Self> {
        let one = match input {
            Input::Tokens(ids) => ids.len() == 1,
            Input::Vectors(v) => v.dim(0)? == 1,
        };
        if one {
            let lm::Stepped { hidden, logits } = lm.model.step(input, cache)?;
            return Ok(Self { logits, hidden });
        }
        let h = lm.model.forward(input, cache)?;
        let n = h.dim(0)?;
        Self::at_row(lm, &h, n - 1)
    }

    /// The frontier after row `row` of a forward's hidden states `[n, hidden]`.
    pub fn at_row(lm: &LoadedModel, hidden: &Tensor, row: usize) -> lm::Result<Self> {
        let hidden = hidden.narrow(0, row, 1)?;
        let logits = lm.model.logits(&hidden)?;
        Ok(Self { logits, hidden })
    }

    /// The logits as a host vector (token sampling and tests).
    pub fn host_logits(&self) -> lm::Result<Vec<f32>> {
        Ok(self.logits.squeeze(0)?.to_vec1()?)
    }

    /// The most probable next token.
    pub fn top(&self) -> lm::Result<u32> {
        Ok(self
            .logits
            .argmax_keepdim(1)?
            .flatten_all()?
            .to_vec1::<u32>()?[0])
    }
}

/// A latent step as the commit after the burst needs it: what it stood for (the pre-noise
/// kept distribution) and what was fed (the vector, `[1, hidden]`).
#[derive(Debug, Clone)]
pub struct Step {
    pub p: Distribution,
    pub vector: Tensor,
}

/// Runs one burst from `frontier`, calling `on_step` after each latent step (return false to
/// cancel). Updates `frontier` and the cache in place; returns the summary and the steps fed.
pub fn burst(
    lm: &LoadedModel,
    cache: &mut KvCache,
    frontier: &mut Frontier,
    params: &DreamParams,
    mut on_step: impl FnMut(&LatentStep) -> bool,
) -> lm::Result<(BurstSummary, Vec<Step>)> {
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
    let emb = lm.model.embedding();
    let rms_e = emb.mean_row_rms();
    let norm_limit = params.max_norm_ratio * rms_e * (emb.hidden() as f32).sqrt();
    let sampling = params.sampling();
    let mut prev = None;
    let mut cold = 0usize;
    let mut entropies = Vec::new();
    let mut steps = Vec::new();
    let start_pos = cache.len();
    let mut stop = BurstStop::Budget;
    for step in 0..params.steps {
        if cache.len() >= cache.max_len() {
            stop = BurstStop::ContextFull;
            break;
        }
        let t0 = Instant::now();
        let a = lm::analyze(&frontier.logits, &sampling, prev.as_ref())?;
        let kept_entropy = a.kept.entropy();
        let mixed = add_noise(&a.kept, params, &mut rng);
        let e = latent_vector(lm, frontier, &mixed, params, rms_e, &mut rng)?;
        let norm = e.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        entropies.push(kept_entropy);
        let mut record = LatentStep {
            step,
            entropy_full: a.kept.full_entropy,
            entropy: kept_entropy,
            top: top_tokens(lm, &mixed, params.top_n),
            norm,
            kl_prev: a.kl_prev,
            nearest: None,
            micros: 0,
        };
        if !norm.is_finite() {
            stop = BurstStop::NonFinite;
            emit(&mut record, t0, params, &mut on_step);
            break;
        }
        if norm > norm_limit {
            stop = BurstStop::NormBlowup;
            emit(&mut record, t0, params, &mut on_step);
            break;
        }
        if params.telemetry == TelemetryLevel::Full {
            let (id, cos) = emb.nearest(&e)?;
            record.nearest = Some((token_text(lm, id), id, cos));
        }
        *frontier = Frontier::advance(lm, cache, Input::Vectors(&e))?;
        steps.push(Step {
            p: a.kept,
            vector: e,
        });
        prev = Some(a.reference);
        if !emit(&mut record, t0, params, &mut on_step) {
            stop = BurstStop::Cancelled;
            break;
        }
        if let Some(c) = params.cold_stop {
            cold = if kept_entropy < c.threshold {
                cold + 1
            } else {
                0
            };
            if cold >= c.patience {
                stop = BurstStop::ColdStop;
                break;
            }
        }
    }
    let summary = BurstSummary {
        steps: cache.len() - start_pos,
        stop,
        millis: started.elapsed().as_secs_f64() * 1e3,
        mean_entropy: if entropies.is_empty() {
            0.0
        } else {
            entropies.iter().sum::<f32>() / entropies.len() as f32
        },
        start_position: start_pos,
    };
    Ok((summary, steps))
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

/// Gumbel-softmax, then Dirichlet, on the kept weights (each optional); then, in mixture
/// mode, the lean towards one token sampled from the result.
fn add_noise(kept: &Distribution, params: &DreamParams, rng: &mut impl Rng) -> Distribution {
    let mut d = kept.clone();
    if let Some(tau) = params.gumbel_tau {
        let g = Gumbel::new(0.0f32, 1.0).expect("valid gumbel");
        let mut logits: Vec<f32> = d
            .probs
            .iter()
            .map(|&p| (p.max(1e-30).ln() + g.sample(rng)) / tau)
            .collect();
        lm::softmax_in_place(&mut logits, 1.0);
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
    if params.mode == LatentMode::Mixture && d.ids.len() > 1 {
        let h = d.entropy() / (d.ids.len() as f32).ln();
        let r: f32 = rng.random();
        let mut acc = 0.0;
        let sampled = d
            .probs
            .iter()
            .position(|&p| {
                acc += p;
                r < acc
            })
            .unwrap_or(d.probs.len() - 1);
        let beta = params.moi_beta;
        for (i, p) in d.probs.iter_mut().enumerate() {
            let onehot = if i == sampled { 1.0 } else { 0.0 };
            *p = (h * *p + (beta + 1.0 - h) * onehot) / (beta + 1.0);
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
        LatentMode::Concept | LatentMode::Mixture => concept()?,
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
    lm.tokenizer.token_text(id)
}
