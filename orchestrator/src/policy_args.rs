//! The dream policy as `mm run` / `mm chat` flags: each one set overrides the orchestrator's
//! default for the new session; unset ones leave it.

use clap::{Args, ValueEnum};
use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;
use orchestrator::policy::TurnPolicy;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RenderArg {
    Draft,
    Translate,
    Think,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProposalArg {
    Top,
    Sample,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LeashArg {
    Exact,
    Typical,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleArg {
    Fixed,
    Entropy,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Concept,
    Hidden,
    Blend,
    Mixture,
}

#[derive(Args, Clone, Debug, Default)]
pub struct PolicyArgs {
    /// Replay: every draw of the turn derives from this seed (default: a fresh one per turn).
    #[arg(long)]
    pub seed: Option<u64>,
    /// When to dream: fixed (every --commit-tokens), entropy (at forks), off (plain sampling).
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// How latent steps reach the text: draft (proposals the model verifies), translate, think.
    #[arg(long, value_enum)]
    pub render: Option<RenderArg>,
    /// What a latent step proposes to the draft: its most probable token, or a sample.
    #[arg(long, value_enum)]
    pub proposal: Option<ProposalArg>,
    /// Draft acceptance: exact (plain sampling's distribution) or typical (the dream pulls).
    #[arg(long, value_enum)]
    pub leash: Option<LeashArg>,
    /// Typical leash: keep proposals with at least this probability ... (implies --leash typical)
    #[arg(long)]
    pub leash_epsilon: Option<f32>,
    /// ... or this fraction of the most probable token's.
    #[arg(long)]
    pub leash_delta: Option<f32>,
    /// How a latent step's vector is formed.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Bursts per attempt.
    #[arg(long)]
    pub bursts: Option<u32>,
    /// Latent steps per burst.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Gaussian noise on the latent vector.
    #[arg(long)]
    pub noise: Option<f32>,
    /// Most tokens in a reply.
    #[arg(long)]
    pub reply_tokens: Option<u32>,
    /// The commit sampler's temperature.
    #[arg(long)]
    pub commit_temperature: Option<f32>,
    /// Attempts per turn.
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

impl PolicyArgs {
    pub fn to_pb(&self) -> pb::DreamPolicy {
        // An epsilon or delta alone asks for the typical leash; the other bound keeps its default.
        let typical = self.leash_epsilon.is_some() || self.leash_delta.is_some();
        let defaults = TurnPolicy::default();
        let leash = match (self.leash, typical) {
            (Some(LeashArg::Exact), _) => Some(upb::leash::Rule::Exact(upb::Exact {})),
            (Some(LeashArg::Typical), _) | (None, true) => {
                Some(upb::leash::Rule::Typical(upb::Typical {
                    epsilon: self.leash_epsilon.unwrap_or(defaults.leash_epsilon),
                    delta: self.leash_delta.unwrap_or(defaults.leash_delta),
                }))
            }
            (None, false) => None,
        }
        .map(|rule| upb::Leash { rule: Some(rule) });
        pb::DreamPolicy {
            seed: self.seed,
            schedule: self.schedule.map(|s| {
                (match s {
                    ScheduleArg::Fixed => pb::Schedule::Fixed,
                    ScheduleArg::Entropy => pb::Schedule::Entropy,
                    ScheduleArg::Off => pb::Schedule::Off,
                }) as i32
            }),
            render: self.render.map(|r| {
                (match r {
                    RenderArg::Draft => upb::Render::Draft,
                    RenderArg::Translate => upb::Render::Translate,
                    RenderArg::Think => upb::Render::Think,
                }) as i32
            }),
            proposal: self.proposal.map(|p| {
                (match p {
                    ProposalArg::Top => upb::Proposal::Top,
                    ProposalArg::Sample => upb::Proposal::Sample,
                }) as i32
            }),
            leash,
            mode: self.mode.map(|m| {
                (match m {
                    ModeArg::Concept => upb::LatentMode::Concept,
                    ModeArg::Hidden => upb::LatentMode::Hidden,
                    ModeArg::Blend => upb::LatentMode::Blend,
                    ModeArg::Mixture => upb::LatentMode::Mixture,
                }) as i32
            }),
            bursts: self.bursts,
            steps: self.steps,
            noise: self.noise,
            reply_tokens: self.reply_tokens,
            commit_temperature: self.commit_temperature,
            max_attempts: self.max_attempts,
            ..Default::default()
        }
    }
}
