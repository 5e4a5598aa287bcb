//! The muse's gRPC edge: proto messages to domain types (validated once, here) and back.
//! Validation errors name the proto field, so a client sees INVALID_ARGUMENT saying what to fix.

use crate::dream::{ColdStop, DreamParams, LatentMode, TelemetryLevel};
use crate::render::{Framing, Leash, Proposal, Render};
use crate::session::{CommitParams, Prime};
use crate::telemetry::{BurstStop, LatentStep};
use lm::{ChatMessage, GenerateOptions, InvalidParam, SamplingParams, StopReason};
use mm_proto::muse::v1 as pb;
use tonic::Status;

/// A field's error as the client's status: the field path, then what is wrong.
pub fn invalid(prefix: &str, e: InvalidParam) -> Status {
    Status::invalid_argument(format!("{prefix}.{e}"))
}

fn bad_enum(field: &str, value: i32, kind: &str) -> Status {
    Status::invalid_argument(format!("{field} {value} is not a {kind}"))
}

pub fn prime(p: &pb::Prime) -> Result<Prime, Status> {
    use pb::prime::Prompt;
    match &p.prompt {
        Some(Prompt::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(Status::invalid_argument(
                    "prime.chat.messages is empty: give at least one message",
                ));
            }
            if let Some(i) = c.messages.iter().position(|m| m.role.is_empty()) {
                return Err(Status::invalid_argument(format!(
                    "prime.chat.messages[{i}].role is empty (system, user or assistant)"
                )));
            }
            Ok(Prime::Chat(
                c.messages
                    .iter()
                    .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                    .collect(),
            ))
        }
        Some(Prompt::Raw(t)) if t.is_empty() => Err(Status::invalid_argument("prime.raw is empty")),
        Some(Prompt::Raw(t)) => Ok(Prime::Raw(t.clone())),
        Some(Prompt::Tokens(t)) if t.ids.is_empty() => {
            Err(Status::invalid_argument("prime.tokens.ids is empty"))
        }
        Some(Prompt::Tokens(t)) => Ok(Prime::Tokens(t.ids.clone())),
        None => Err(Status::invalid_argument(
            "prime needs one of chat, raw or tokens",
        )),
    }
}

/// A rough upper bound of a prime's token count, for KV admission before tokenizing.
pub fn prime_len_hint(p: &Prime) -> usize {
    match p {
        Prime::Chat(m) => {
            m.iter()
                .map(|m| m.content.len() + m.role.len() + 8)
                .sum::<usize>()
                / 2
        }
        Prime::Raw(t) => t.len() / 2,
        Prime::Tokens(t) => t.len(),
    }
}

impl TryFrom<&pb::DreamBurst> for DreamParams {
    type Error = Status;

    fn try_from(b: &pb::DreamBurst) -> Result<Self, Status> {
        let d = DreamParams::default();
        let mode = match pb::LatentMode::try_from(b.mode) {
            Ok(pb::LatentMode::Unspecified | pb::LatentMode::Concept) => LatentMode::Concept,
            Ok(pb::LatentMode::Hidden) => LatentMode::Hidden,
            Ok(pb::LatentMode::Blend) => LatentMode::Blend,
            Ok(pb::LatentMode::Mixture) => LatentMode::Mixture,
            Err(_) => return Err(bad_enum("burst.mode", b.mode, "LatentMode")),
        };
        let telemetry = match pb::TelemetryLevel::try_from(b.telemetry) {
            Ok(pb::TelemetryLevel::Unspecified | pb::TelemetryLevel::Basic) => {
                TelemetryLevel::Basic
            }
            Ok(pb::TelemetryLevel::None) => TelemetryLevel::None,
            Ok(pb::TelemetryLevel::Full) => TelemetryLevel::Full,
            Err(_) => return Err(bad_enum("burst.telemetry", b.telemetry, "TelemetryLevel")),
        };
        let params = DreamParams {
            mode,
            blend_alpha: b.blend_alpha.unwrap_or(d.blend_alpha),
            moi_beta: b.moi_beta.unwrap_or(d.moi_beta),
            temperature: b.temperature.unwrap_or(d.temperature),
            top_k: b.top_k.map_or(d.top_k, |k| k as usize),
            top_p: b.top_p.unwrap_or(d.top_p),
            min_p: b.min_p.unwrap_or(d.min_p),
            gumbel_tau: b.gumbel_tau,
            dirichlet_alpha: b.dirichlet_alpha,
            noise: b.noise.unwrap_or(d.noise),
            target_rms: b.target_rms,
            seed: b.seed,
            steps: b.steps as usize,
            cold_stop: b.cold_stop.map(|c| ColdStop {
                threshold: c.threshold,
                patience: c.patience as usize,
            }),
            max_norm_ratio: b.max_norm_ratio.unwrap_or(d.max_norm_ratio),
            telemetry,
            top_n: b.top_n.map_or(d.top_n, |n| n as usize),
        };
        params.validate().map_err(|e| invalid("burst", e))?;
        Ok(params)
    }
}

/// A commit command as commit parameters; `context` is the model's context (the most tokens).
pub fn commit(c: &pb::Commit, context: usize) -> Result<CommitParams, Status> {
    let d = SamplingParams::default();
    let s = c.sampling.unwrap_or_default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: s.top_k.map_or(d.top_k, |k| k as usize),
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: s.seed,
    };
    sampling
        .validate()
        .map_err(|e| invalid("commit.sampling", e))?;
    if c.max_tokens == 0 || c.max_tokens as usize > context {
        return Err(Status::invalid_argument(format!(
            "commit.max_tokens must be in 1..={context}, got {}",
            c.max_tokens
        )));
    }
    if let Some(h) = c.fork_entropy {
        if !(h.is_finite() && h >= 0.0) {
            return Err(Status::invalid_argument(format!(
                "commit.fork_entropy must be a finite number >= 0 (nats), got {h}"
            )));
        }
    }
    Ok(CommitParams {
        decode: GenerateOptions {
            sampling,
            max_tokens: c.max_tokens as usize,
            stop_strings: c.stop.clone(),
            stop_on_eos: !c.ignore_eos,
            end_at_word: c.end_at_word,
            fork_entropy: c.fork_entropy,
        },
        render: render(c)?,
    })
}

fn render(c: &pb::Commit) -> Result<Render, Status> {
    Ok(match pb::Render::try_from(c.render) {
        Ok(pb::Render::Unspecified | pb::Render::Draft) => Render::Draft {
            proposal: match pb::Proposal::try_from(c.proposal) {
                Ok(pb::Proposal::Unspecified | pb::Proposal::Top) => Proposal::Top,
                Ok(pb::Proposal::Sample) => Proposal::Sample,
                Err(_) => return Err(bad_enum("commit.proposal", c.proposal, "Proposal")),
            },
            leash: leash(c.leash.as_ref())?,
        },
        Ok(pb::Render::Translate) => Render::Translate {
            framing: match pb::Framing::try_from(c.framing) {
                Ok(pb::Framing::Unspecified | pb::Framing::Completion) => Framing::Completion,
                Ok(pb::Framing::Instruction) => Framing::Instruction,
                Err(_) => return Err(bad_enum("commit.framing", c.framing, "Framing")),
            },
        },
        Ok(pb::Render::Think) => Render::Think {
            replace: match pb::CommitMode::try_from(c.mode) {
                Ok(pb::CommitMode::Unspecified | pb::CommitMode::KeepLatent) => false,
                Ok(pb::CommitMode::Replace) => true,
                Err(_) => return Err(bad_enum("commit.mode", c.mode, "CommitMode")),
            },
        },
        Err(_) => return Err(bad_enum("commit.render", c.render, "Render")),
    })
}

fn leash(l: Option<&pb::Leash>) -> Result<Leash, Status> {
    let leash = match l.and_then(|l| l.rule.as_ref()) {
        None => Leash::DEFAULT,
        Some(pb::leash::Rule::Exact(_)) => Leash::Exact,
        Some(pb::leash::Rule::Typical(t)) => Leash::Typical {
            epsilon: t.epsilon,
            delta: t.delta,
        },
    };
    leash.validate().map_err(|e| invalid("commit", e))?;
    Ok(leash)
}

impl From<BurstStop> for pb::BurstStop {
    fn from(s: BurstStop) -> Self {
        match s {
            BurstStop::Budget => Self::Budget,
            BurstStop::ColdStop => Self::ColdStop,
            BurstStop::NonFinite => Self::NonFinite,
            BurstStop::NormBlowup => Self::NormBlowup,
            BurstStop::ContextFull => Self::ContextFull,
            BurstStop::Cancelled => Self::Cancelled,
            BurstStop::MidWord => Self::MidWord,
        }
    }
}

pub fn commit_stop(s: StopReason) -> pb::CommitStop {
    match s {
        StopReason::MaxTokens => pb::CommitStop::MaxTokens,
        StopReason::EndOfText => pb::CommitStop::EndOfText,
        StopReason::StopString => pb::CommitStop::StopString,
        StopReason::ContextFull => pb::CommitStop::ContextFull,
        StopReason::Fork => pb::CommitStop::Fork,
    }
}

pub fn latent_step(s: &LatentStep) -> pb::LatentStep {
    pb::LatentStep {
        step: s.step as u32,
        entropy: s.entropy,
        entropy_full: s.entropy_full,
        top: s
            .top
            .iter()
            .map(|t| pb::TopToken {
                id: t.id,
                text: t.text.clone(),
                p: t.p,
            })
            .collect(),
        norm: s.norm,
        kl_prev: s.kl_prev,
        nearest: s
            .nearest
            .as_ref()
            .map(|(text, id, cosine)| pb::NearestToken {
                id: *id,
                text: text.clone(),
                cosine: *cosine,
            }),
        micros: s.micros,
    }
}
