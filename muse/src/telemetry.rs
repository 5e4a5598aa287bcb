//! What the dream reports: per latent step, per burst, per commit. Serialisable, so the CLI's
//! `--json` lines and the gRPC events carry the same fields.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopToken {
    pub id: u32,
    pub text: String,
    pub p: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatentStep {
    pub step: usize,
    /// Entropy (nats) of the kept, renormalised `p` (before noise).
    pub entropy: f32,
    /// Entropy (nats) of the full softmax at the concept temperature.
    pub entropy_full: f32,
    /// The weights the vector was mixed from (after noise), most probable first.
    pub top: Vec<TopToken>,
    /// ‖e‖ of the vector fed.
    pub norm: f32,
    /// KL(p_t ‖ p_{t−1}) over the full distributions; none at the first step.
    pub kl_prev: Option<f32>,
    /// Nearest token to `e` by cosine: (text, id, cosine). Only at telemetry level `full`.
    pub nearest: Option<(String, u32, f32)>,
    pub micros: u64,
}

/// What a prime did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PrimeSummary {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of a forward.
    pub cached_tokens: usize,
}

/// Why a burst ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BurstStop {
    /// The step budget was spent.
    Budget,
    /// The kept entropy stayed below the threshold for `patience` steps.
    ColdStop,
    /// The vector had a NaN or an infinity.
    NonFinite,
    /// ‖e‖ grew past the guard.
    NormBlowup,
    /// The sequence reached its context limit.
    ContextFull,
    /// The client went away or asked to stop.
    Cancelled,
    /// Not at a word boundary: no step was taken (bursts start between words).
    MidWord,
}

impl BurstStop {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::ColdStop => "cold_stop",
            Self::NonFinite => "non_finite",
            Self::NormBlowup => "norm_blowup",
            Self::ContextFull => "context_full",
            Self::Cancelled => "cancelled",
            Self::MidWord => "mid_word",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurstSummary {
    pub steps: usize,
    pub stop: BurstStop,
    pub millis: f64,
    pub mean_entropy: f32,
    /// Cache position where the burst began.
    pub start_position: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommitSummary {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: lm::StopReason,
    pub millis: f64,
    pub tokens_per_s: f64,
    /// Latent steps the commit rendered, and how many of them reached the text (draft: the
    /// proposals kept; translate: the reader's tokens).
    pub proposed: usize,
    pub accepted: usize,
    /// The text standing for the latent steps.
    pub rendered: String,
    /// At a fork stop: the entropy that made it one.
    pub fork_entropy: Option<f32>,
}
