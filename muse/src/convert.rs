//! Proto messages to domain types and back. Validation errors name the proto field, so a
//! client sees INVALID_ARGUMENT with a message saying what to fix.

use crate::dream::{ColdStop, DreamParams, LatentMode, TelemetryLevel};
use crate::session::{CommitMode, Prime};
use crate::telemetry::LatentStep;
use lm::generate::GenerateOptions;
use lm::{ChatMessage, LoadedModel, SamplingParams};
use mm_proto::muse::v1 as pb;
use tonic::Status;

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

pub fn dream_params(b: &pb::DreamBurst) -> Result<DreamParams, Status> {
    let d = DreamParams::default();
    let mode = match pb::LatentMode::try_from(b.mode) {
        Ok(pb::LatentMode::Unspecified | pb::LatentMode::Concept) => LatentMode::Concept,
        Ok(pb::LatentMode::Hidden) => LatentMode::Hidden,
        Ok(pb::LatentMode::Blend) => LatentMode::Blend,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "burst.mode {} is not a LatentMode",
                b.mode
            )))
        }
    };
    let telemetry = match pb::TelemetryLevel::try_from(b.telemetry) {
        Ok(pb::TelemetryLevel::Unspecified | pb::TelemetryLevel::Basic) => TelemetryLevel::Basic,
        Ok(pb::TelemetryLevel::None) => TelemetryLevel::None,
        Ok(pb::TelemetryLevel::Full) => TelemetryLevel::Full,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "burst.telemetry {} is not a TelemetryLevel",
                b.telemetry
            )))
        }
    };
    let params = DreamParams {
        mode,
        blend_alpha: b.blend_alpha.unwrap_or(d.blend_alpha),
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
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("burst.{e}")))?;
    Ok(params)
}

pub fn commit(c: &pb::Commit, lm: &LoadedModel) -> Result<(GenerateOptions, CommitMode), Status> {
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
    sampling.validate().map_err(|e| {
        Status::invalid_argument(format!(
            "commit.sampling.{}",
            e.to_string().replace("invalid input: ", "")
        ))
    })?;
    let limit = lm.model.max_context();
    if c.max_tokens == 0 || c.max_tokens as usize > limit {
        return Err(Status::invalid_argument(format!(
            "commit.max_tokens must be in 1..={limit}, got {}",
            c.max_tokens
        )));
    }
    let mode = match pb::CommitMode::try_from(c.mode) {
        Ok(pb::CommitMode::Unspecified | pb::CommitMode::KeepLatent) => CommitMode::KeepLatent,
        Ok(pb::CommitMode::Replace) => CommitMode::Replace,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "commit.mode {} is not a CommitMode",
                c.mode
            )))
        }
    };
    let opts = GenerateOptions {
        sampling,
        max_tokens: c.max_tokens as usize,
        stop_strings: c.stop.clone(),
        stop_on_eos: !c.ignore_eos,
    };
    Ok((opts, mode))
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
