//! `muse dream`: one prime, one burst, one commit that renders it, shown as a table or JSON
//! lines.

use crate::{ModelArgs, PromptArgs};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use lm::{GenerateOptions, SamplingParams};
use muse::dream::{ColdStop, DreamParams, LatentMode, TelemetryLevel};
use muse::render::{Framing, Leash, Proposal, Render};
use muse::session::{CommitParams, DreamSession, Prime};
use muse::telemetry::LatentStep;
use serde::Serialize;
use std::io::Write;

/// How the commit renders the burst (see `muse::render`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RenderArg {
    Draft,
    Translate,
    Think,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LeashArg {
    Exact,
    Typical,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Concept,
    Hidden,
    Blend,
    Mixture,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct DreamArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// How a latent step's vector is formed.
    #[arg(long, value_enum, default_value = "concept")]
    mode: ModeArg,
    /// Weight of the concept vector in blend mode.
    #[arg(long, default_value_t = 0.5)]
    blend_alpha: f32,
    /// Weight of the sampled token in mixture mode (β).
    #[arg(long, default_value_t = 1.0)]
    moi_beta: f32,
    /// Latent steps (the burst's budget).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Concept temperature (0: the argmax token alone).
    #[arg(long, default_value_t = muse::dream::DEFAULT_CONCEPT_TEMPERATURE)]
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
    /// How the commit renders the latent steps: draft (the steps propose tokens the model
    /// verifies), translate (the model reads its vectors aloud), think (unspoken thought).
    #[arg(long, value_enum, default_value = "draft")]
    render: RenderArg,
    /// Draft: propose each step's most probable token (top) or a draw from it (sample).
    #[arg(long, default_value = "top", value_parser = ["top", "sample"])]
    proposal: String,
    /// Draft: exact speculative acceptance, or a typical-acceptance threshold.
    #[arg(long, value_enum, default_value = "typical")]
    leash: LeashArg,
    /// Typical leash: keep a proposal with at least this probability ...
    #[arg(long, default_value_t = 0.02)]
    leash_epsilon: f32,
    /// ... or at least this fraction of the most probable token's.
    #[arg(long, default_value_t = 0.1)]
    leash_delta: f32,
    /// Translate: frame the vectors as a completion or inside the chat template.
    #[arg(long, default_value = "completion", value_parser = ["completion", "instruction"])]
    framing: String,
    /// Tokens to decode when committing the dream to text (rendered tokens count).
    #[arg(long, default_value_t = 48)]
    commit_tokens: usize,
    /// Sampling temperature of the commit (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    commit_temperature: f32,
    /// Think: keep_latent (latent positions stay in context) or replace (swapped for the text).
    #[arg(long, default_value = "keep_latent", value_parser = ["keep_latent", "replace"])]
    commit_mode: String,
    /// Skip the nearest-token search (a vocabulary-sized product per step).
    #[arg(long)]
    no_nearest: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// The last JSON line: the commit and the burst it rendered.
#[derive(Serialize)]
struct Outcome<'a> {
    text: &'a str,
    rendered: &'a str,
    tokens: usize,
    proposed: usize,
    accepted: usize,
    commit_stop: &'static str,
    burst_steps: usize,
    burst_stop: &'static str,
    burst_ms: f64,
    commit_ms: f64,
    commit_tokens_per_s: f64,
}

/// One latent step as a JSON line.
#[derive(Serialize)]
struct StepLine<'a> {
    step: usize,
    entropy: f32,
    entropy_full: f32,
    top: &'a [muse::telemetry::TopToken],
    norm: f32,
    kl_prev: Option<f32>,
    micros: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nearest: Option<Nearest<'a>>,
}

#[derive(Serialize)]
struct Nearest<'a> {
    id: u32,
    text: &'a str,
    cosine: f32,
}

impl DreamArgs {
    fn params(&self) -> Result<(DreamParams, CommitParams)> {
        let params = DreamParams {
            mode: match self.mode {
                ModeArg::Concept => LatentMode::Concept,
                ModeArg::Hidden => LatentMode::Hidden,
                ModeArg::Blend => LatentMode::Blend,
                ModeArg::Mixture => LatentMode::Mixture,
            },
            blend_alpha: self.blend_alpha,
            moi_beta: self.moi_beta,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            gumbel_tau: self.gumbel_tau,
            dirichlet_alpha: self.dirichlet_alpha,
            noise: self.noise,
            target_rms: self.target_rms,
            seed: self.seed,
            steps: self.steps,
            cold_stop: self.cold_stop.map(|threshold| ColdStop {
                threshold,
                patience: self.cold_patience,
            }),
            telemetry: if self.no_nearest {
                TelemetryLevel::Basic
            } else {
                TelemetryLevel::Full
            },
            ..DreamParams::default()
        };
        params
            .validate()
            .map_err(|e| anyhow::anyhow!(e.as_flag()))?;
        let render = match self.render {
            RenderArg::Draft => Render::Draft {
                proposal: if self.proposal == "sample" {
                    Proposal::Sample
                } else {
                    Proposal::Top
                },
                leash: match self.leash {
                    LeashArg::Exact => Leash::Exact,
                    LeashArg::Typical => Leash::Typical {
                        epsilon: self.leash_epsilon,
                        delta: self.leash_delta,
                    },
                },
            },
            RenderArg::Translate => Render::Translate {
                framing: if self.framing == "instruction" {
                    Framing::Instruction
                } else {
                    Framing::Completion
                },
            },
            RenderArg::Think => Render::Think {
                replace: self.commit_mode == "replace",
            },
        };
        if let Render::Draft { leash, .. } = render {
            leash.validate().map_err(|e| anyhow::anyhow!(e.as_flag()))?;
        }
        let commit = CommitParams {
            decode: GenerateOptions {
                sampling: SamplingParams {
                    temperature: self.commit_temperature,
                    seed: self.seed,
                    ..SamplingParams::default()
                },
                max_tokens: self.commit_tokens,
                ..GenerateOptions::default()
            },
            render,
        };
        commit
            .decode
            .sampling
            .validate()
            .map_err(|e| anyhow::anyhow!(e.as_flag().replacen("--", "--commit-", 1)))?;
        anyhow::ensure!(
            self.commit_tokens >= 1,
            "--commit-tokens must be at least 1"
        );
        Ok((params, commit))
    }
}

pub fn run(a: DreamArgs) -> Result<()> {
    let (params, commit) = a.params()?;
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
            serde_json::to_string(&step_line(s)).expect("json")
        } else {
            table_row(s)
        };
        io_err = writeln!(out, "{line}").err();
        io_err.is_none()
    })?;
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    let c = session.commit(&commit, |_| {})?;
    if a.json {
        let last = Outcome {
            text: &c.text,
            rendered: &c.rendered,
            tokens: c.tokens.len(),
            proposed: c.proposed,
            accepted: c.accepted,
            commit_stop: c.stop.as_str(),
            burst_steps: burst.steps,
            burst_stop: burst.stop.as_str(),
            burst_ms: burst.millis,
            commit_ms: c.millis,
            commit_tokens_per_s: c.tokens_per_s,
        };
        writeln!(out, "{}", serde_json::to_string(&last)?)?;
    } else {
        writeln!(
            out,
            "-- {} latent steps ({}), {} of {} rendered as {:?}, then {} tokens in all:",
            burst.steps,
            burst.stop.as_str(),
            c.accepted,
            c.proposed,
            c.rendered,
            c.tokens.len()
        )?;
        writeln!(out, "{}", c.text)?;
    }
    Ok(())
}

fn step_line(s: &LatentStep) -> StepLine<'_> {
    StepLine {
        step: s.step,
        entropy: s.entropy,
        entropy_full: s.entropy_full,
        top: &s.top,
        norm: s.norm,
        kl_prev: s.kl_prev,
        micros: s.micros,
        nearest: s.nearest.as_ref().map(|(text, id, cosine)| Nearest {
            id: *id,
            text,
            cosine: *cosine,
        }),
    }
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
