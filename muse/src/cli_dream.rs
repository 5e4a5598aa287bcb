//! `muse dream`: one prime, one burst, one commit, shown as a table or JSON lines.

use crate::{ModelArgs, PromptArgs};
use anyhow::{Context, Result};
use clap::Args;
use lm::generate::GenerateOptions;
use lm::SamplingParams;
use muse::dream::{ColdStop, DreamParams, LatentMode, TelemetryLevel};
use muse::session::{CommitMode, DreamSession, Prime};
use muse::telemetry::LatentStep;
use std::io::Write;

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct DreamArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// How a latent step's vector is formed.
    #[arg(long, default_value = "concept", value_parser = ["concept", "hidden", "blend"])]
    mode: String,
    /// Weight of the concept vector in blend mode.
    #[arg(long, default_value_t = 0.5)]
    blend_alpha: f32,
    /// Latent steps (the burst's budget).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Concept temperature (0: the argmax token alone).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Gumbel-softmax temperature on the kept weights (off when absent).
    #[arg(long)]
    gumbel_tau: Option<f32>,
    /// Dirichlet concentration scale on the kept weights (off when absent).
    #[arg(long)]
    dirichlet_alpha: Option<f32>,
    /// Gaussian noise on the vector, in units of the embeddings' mean row RMS.
    #[arg(long, default_value_t = 0.0)]
    noise: f32,
    /// Renormalise each vector to this RMS (off when absent).
    #[arg(long)]
    target_rms: Option<f32>,
    /// Cold stop: end the burst when the entropy stays below this many nats ...
    #[arg(long)]
    cold_stop: Option<f32>,
    /// ... for this many consecutive steps.
    #[arg(long, default_value_t = 2)]
    cold_patience: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens to decode when committing the dream to text.
    #[arg(long, default_value_t = 48)]
    commit_tokens: usize,
    /// Sampling temperature of the commit (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    commit_temperature: f32,
    /// keep_latent: latent positions stay in context; replace: swapped for the text.
    #[arg(long, default_value = "keep_latent", value_parser = ["keep_latent", "replace"])]
    commit_mode: String,
    /// Skip the nearest-token search (a vocabulary-sized product per step).
    #[arg(long)]
    no_nearest: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DreamArgs) -> Result<()> {
    let params = DreamParams {
        mode: LatentMode::parse(&a.mode).expect("clap checked the mode"),
        blend_alpha: a.blend_alpha,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        gumbel_tau: a.gumbel_tau,
        dirichlet_alpha: a.dirichlet_alpha,
        noise: a.noise,
        target_rms: a.target_rms,
        seed: a.seed,
        steps: a.steps,
        cold_stop: a.cold_stop.map(|threshold| ColdStop {
            threshold,
            patience: a.cold_patience,
        }),
        telemetry: if a.no_nearest {
            TelemetryLevel::Basic
        } else {
            TelemetryLevel::Full
        },
        ..DreamParams::default()
    };
    params
        .validate()
        .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    let commit = GenerateOptions {
        sampling: SamplingParams {
            temperature: a.commit_temperature,
            seed: a.seed,
            ..SamplingParams::default()
        },
        max_tokens: a.commit_tokens,
        ..GenerateOptions::default()
    };
    commit.sampling.validate().map_err(|e| {
        anyhow::anyhow!("--commit-{}", e.to_string().replace("invalid input: ", ""))
    })?;
    let mode = if a.commit_mode == "replace" {
        CommitMode::Replace
    } else {
        CommitMode::KeepLatent
    };
    let lm = a.model.load()?;
    let prime = match (&a.prompt.chat, &a.prompt.prompt) {
        (Some(msg), _) => Prime::Chat(vec![lm::ChatMessage::user(msg.clone())]),
        (None, Some(text)) => Prime::Raw(text.clone()),
        (None, None) => unreachable!("clap requires --chat or --prompt"),
    };
    let mut session = DreamSession::new(&lm);
    session.prime(&prime).context("priming the dream")?;
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "{:>4}  {:>7}  {:<44}  {:<16}  {:>6}",
            "step", "entropy", "top tokens", "nearest", "cosine"
        )?;
    }
    let mut io_err = None;
    let burst = session.burst(&params, |s| {
        let line = if a.json {
            serde_json::to_string(&step_json(s)).expect("json")
        } else {
            table_row(s)
        };
        io_err = writeln!(out, "{line}").err();
        io_err.is_none()
    })?;
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    let c = session.commit(&commit, mode, |_| {})?;
    if a.json {
        let last = serde_json::json!({
            "text": c.text, "tokens": c.tokens.len(), "commit_stop": c.stop,
            "burst_steps": burst.steps, "burst_stop": burst.stop.as_str(), "burst_ms": burst.millis,
            "commit_ms": c.millis, "commit_tokens_per_s": c.tokens_per_s,
        });
        writeln!(out, "{last}")?;
    } else {
        writeln!(
            out,
            "-- {} latent steps ({}), then {} tokens:",
            burst.steps,
            burst.stop.as_str(),
            c.tokens.len()
        )?;
        writeln!(out, "{}", c.text)?;
    }
    Ok(())
}

fn step_json(s: &LatentStep) -> serde_json::Value {
    let mut v = serde_json::json!({
        "step": s.step, "entropy": s.entropy, "entropy_full": s.entropy_full, "top": s.top,
        "norm": s.norm, "kl_prev": s.kl_prev, "micros": s.micros,
    });
    if let Some((text, id, cos)) = &s.nearest {
        v["nearest"] = serde_json::json!({"id": id, "text": text, "cosine": cos});
    }
    v
}

fn table_row(s: &LatentStep) -> String {
    let top: Vec<String> = s
        .top
        .iter()
        .take(3)
        .map(|t| format!("{:?} {:.2}", t.text, t.p))
        .collect();
    let (near, cos) = match &s.nearest {
        Some((text, _, cos)) => (format!("{text:?}"), format!("{cos:.3}")),
        None => ("-".into(), "-".into()),
    };
    format!(
        "{:>4}  {:>7.3}  {:<44}  {:<16}  {:>6}",
        s.step + 1,
        s.entropy,
        top.join("  "),
        near,
        cos
    )
}
