//! `muse bench --shape NAME` or `--weights DIR`: the runtime's speed on a model of a given shape
//! with random weights (nothing to download: GPU machines often have no internet) or on a bare
//! safetensors directory, on any device. Reports batch-1 decode, latent steps per mode (the real
//! dream loop), batch-B aggregate decode, and the fraction of the memory-bandwidth bound. With
//! `--reference` it also checks logits and greedy tokens against a transformers run on the same
//! weights (`deploy/bench/hf_gpu_reference.py`).

use crate::bench::latent_rates;
use anyhow::{Context, Result};
use lm::candle::{Tensor, D};
use lm::{shape_named, Input, LoadOptions, Model};
use lm::{KvCache, LoadedModel};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a shape benchmark runs on and how long.
pub struct ShapeBench {
    pub shape: Option<String>,
    pub weights: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    pub device: String,
    pub seed: u64,
    pub batch: usize,
    pub steps: usize,
    pub repeats: usize,
}

/// A transformers run on the same weights: the prompt, the logits after it, greedy tokens.
#[derive(Deserialize)]
struct Reference {
    prompt: Vec<u32>,
    last_logits: Vec<f32>,
    greedy: Vec<u32>,
    /// transformers against itself (eager attention vs SDPA): the noise floor of bf16.
    #[serde(default)]
    self_check: serde_json::Value,
    #[serde(default)]
    timings: serde_json::Value,
}

pub fn run(b: &ShapeBench) -> Result<serde_json::Value> {
    let device = lm::open_device(&b.device).context("--device")?;
    let opts = LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let (model, name) = match (&b.shape, &b.weights) {
        (Some(s), None) => (
            Model::random(shape_named(s).context("--shape")?, b.seed, &opts)?,
            format!("{s} (random, seed {})", b.seed),
        ),
        (None, Some(dir)) => (
            Model::from_safetensors_dir(dir, &opts)
                .with_context(|| format!("--weights {}", dir.display()))?,
            dir.display().to_string(),
        ),
        _ => anyhow::bail!("give exactly one of --shape and --weights"),
    };
    let lm = LoadedModel::synthetic(model, &name)?;
    let load_s = t0.elapsed().as_secs_f64();
    let reference = b.reference.as_deref().map(read_reference).transpose()?;
    let vocab = lm.model.config().vocab as u32;
    let prompt: Vec<u32> = match &reference {
        Some(r) => r.prompt.clone(),
        None => (0..32u32).map(|i| (i * 7919 + 13) % vocab).collect(),
    };
    let mut report = serde_json::json!({
        "engine": "muse-lm",
        "model": name,
        "device": b.device,
        "dtype": format!("{:?}", lm.model.dtype()),
        "fused_cuda_path": lm.model.is_fused(),
        "hidden": lm.model.config().hidden,
        "layers": lm.model.config().layers,
        "vocab": vocab,
        "load_s": load_s,
        "weight_bytes_per_token": lm.model.weight_bytes_per_token(),
    });
    if let Some(r) = &reference {
        report["correctness"] = check(&lm.model, r)?;
        report["reference_timings"] = r.timings.clone();
        report["reference_self_check"] = r.self_check.clone();
    }
    let decode = decode_rate(&lm.model, &prompt, 1, b.steps, b.repeats)?;
    let batched = decode_rate(&lm.model, &prompt, b.batch, b.steps, b.repeats)?;
    report["decode_tokens_per_s"] = decode.into();
    report["batch"] = b.batch.into();
    report["batch_aggregate_tokens_per_s"] = batched.into();
    report["batch_speedup"] = (batched / decode).into();
    let latent = latent_rates(&lm, &prompt, b.steps, b.repeats)?;
    let sessions = concurrent_sessions_rate(&lm, &prompt, b.batch, b.steps)?;
    report["concurrent_sessions_aggregate_latent_steps_per_s"] = sessions.into();
    report["concurrent_sessions_speedup"] = (sessions / latent[0].1).into();
    for (mode, rate) in &latent {
        report[format!("latent_steps_per_s_{mode}")] = (*rate).into();
        report[format!("latent_step_vs_token_step_{mode}")] = (decode / rate).into();
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let bw = lm::copy_bandwidth(&device)?;
        let bound = bw / lm.model.weight_bytes_per_token() as f64;
        report["copy_bandwidth_bytes_per_s"] = bw.into();
        report["bandwidth_bound_tokens_per_s"] = bound.into();
        report["decode_fraction_of_bound"] = (decode / bound).into();
    }
    Ok(report)
}

fn read_reference(path: &Path) -> Result<Reference> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--reference {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("--reference {}: not a reference JSON", path.display()))
}

/// Logits after the prompt against the reference's, and greedy tokens step by step.
fn check(model: &Model, r: &Reference) -> Result<serde_json::Value> {
    let mut cache = model.new_cache();
    let h = model.forward(Input::Tokens(&r.prompt), &mut cache)?;
    let ours = model.last_logits(&h)?;
    anyhow::ensure!(
        ours.len() == r.last_logits.len(),
        "reference logits have {} entries, the model's vocabulary {}",
        r.last_logits.len(),
        ours.len()
    );
    let max_abs = ours
        .iter()
        .zip(&r.last_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = r.last_logits.iter().map(|x| x.abs()).fold(0f32, f32::max);
    anyhow::ensure!(!r.greedy.is_empty(), "the reference has no greedy tokens");
    // Teacher-forced: feed the reference's tokens; how often is each our top-1 as well? With
    // random weights the top-2 margin is often one bf16 step, so free-running greedy paths
    // part at the first near-tie; this measures agreement without that cascade.
    let mut forced = model.new_cache();
    model.forward(Input::Tokens(&r.prompt), &mut forced)?;
    let mut agree = usize::from(lm::argmax(&ours) == r.greedy[0]);
    for w in r.greedy.windows(2) {
        let h = model.forward(Input::Tokens(&w[..1]), &mut forced)?;
        agree += usize::from(argmax_rows(&model.logits(&h)?)?[0] == w[1]);
    }
    let mut greedy = Vec::with_capacity(r.greedy.len());
    let mut id = lm::argmax(&ours);
    for _ in 0..r.greedy.len() {
        greedy.push(id);
        let h = model.forward(Input::Tokens(&[id]), &mut cache)?;
        id = argmax_rows(&model.logits(&h)?)?[0];
    }
    let same = greedy
        .iter()
        .zip(&r.greedy)
        .take_while(|(a, b)| a == b)
        .count();
    Ok(serde_json::json!({
        "max_abs_logit_diff": max_abs,
        "max_abs_reference_logit": scale,
        "greedy_tokens": r.greedy.len(),
        "greedy_identical_prefix": same,
        "teacher_forced_top1_agreement": agree,
        "greedy_ours": greedy,
    }))
}

/// Greedy ids of each row of `logits [rows, vocab]`, reduced on the logits' device.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?)
}

/// Greedy decode tokens per second over `batch` sequences stepping together (best of
/// `repeats`); batch 1 is the plain per-sequence forward.
fn decode_rate(
    model: &Model,
    prompt: &[u32],
    batch: usize,
    steps: usize,
    repeats: usize,
) -> Result<f64> {
    anyhow::ensure!(
        batch >= 1 && steps >= 1,
        "--batch and --steps must be at least 1"
    );
    let mut best = f64::MAX;
    for round in 0..=repeats.max(1) {
        let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_cache()).collect();
        let mut ids = Vec::with_capacity(batch);
        for c in caches.iter_mut() {
            let h = model.forward(Input::Tokens(prompt), c)?;
            let n = h.dim(0)?;
            ids.push(argmax_rows(&model.logits(&h.narrow(0, n - 1, 1)?)?)?[0]);
        }
        let t = Instant::now();
        for _ in 0..steps {
            let h = if batch == 1 {
                model.forward(Input::Tokens(&ids), &mut caches[0])?
            } else {
                let x = model.embed(&ids)?;
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                model.forward_batch(&x, &mut refs)?
            };
            ids = argmax_rows(&model.logits(&h)?)?;
        }
        // The first round warms up (allocator pools, cuBLAS); it is not counted.
        if round > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok((batch * steps) as f64 / best)
}

/// Concept latent steps per second over `n` dream sessions bursting at once, each on its own
/// thread as the muse service runs them: on the fused CUDA path their steps are batched.
fn concurrent_sessions_rate(
    lm: &LoadedModel,
    prompt: &[u32],
    n: usize,
    steps: usize,
) -> Result<f64> {
    use muse::dream::{DreamParams, LatentMode, TelemetryLevel};
    use muse::session::{DreamSession, Prime};
    let params = DreamParams {
        mode: LatentMode::Concept,
        steps,
        telemetry: TelemetryLevel::Basic,
        ..DreamParams::default()
    };
    let barrier = std::sync::Barrier::new(n);
    let done: Vec<Result<(usize, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| -> Result<(usize, f64)> {
                    let mut s = DreamSession::new(lm);
                    s.prime(&Prime::Tokens(prompt.to_vec()))?;
                    barrier.wait();
                    let started = Instant::now();
                    let b = s.burst(&params, |_| true)?;
                    Ok((b.steps, started.elapsed().as_secs_f64()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a session thread panicked")))
            })
            .collect()
    });
    let mut total = 0;
    let mut longest = 0f64;
    for r in done {
        let (steps, secs) = r?;
        total += steps;
        longest = longest.max(secs);
    }
    Ok(total as f64 / longest)
}
