//! How a session's turns dream, resolved once: the configured defaults (the `[policy]` table,
//! `MM_POLICY__*`) fill what a session's request leaves unset, the result is validated, and
//! the session stores it complete. Also what a turn derives from it: seeds and revisions.

use mm_proto::majordomo::v1::{NoiseAdvice, StepsAdvice};
use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;
use serde::{Deserialize, Serialize};

/// A policy field that is out of range: the field as the API names it, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy.{field} {why}")]
pub struct InvalidPolicy {
    pub field: &'static str,
    pub why: String,
}

/// The draft render's acceptance rule, as configured (`leash = "typical"` with
/// `leash_epsilon`, `leash_delta`; or `leash = "exact"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeashKind {
    Exact,
    Typical,
}

/// A complete dream policy. Its `Default` is the orchestrator's default policy: the one
/// place the defaults are written (`deploy/mm.example.toml` documents them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnPolicy {
    pub schedule: pb::Schedule,
    /// Most bursts per attempt.
    pub bursts: u32,
    /// Latent steps per burst (the budget).
    pub steps: u32,
    /// Fixed schedule: tokens between bursts.
    pub commit_tokens: u32,
    /// Most tokens in a reply.
    pub reply_tokens: u32,
    /// Entropy schedule: nats of next-token entropy that make a fork.
    pub fork_entropy: f32,
    pub mode: upb::LatentMode,
    /// Concept temperature (0: the argmax token alone).
    pub temperature: f32,
    pub top_k: u32,
    /// Gaussian noise on the vector, units of rms(E).
    pub noise: f32,
    /// Gumbel-softmax temperature on the concept weights (0: off).
    pub gumbel_tau: f32,
    pub blend_alpha: f32,
    pub moi_beta: f32,
    /// Cold stop: a burst ends once the model is confident.
    pub adaptive: bool,
    pub cold_threshold: f32,
    pub cold_patience: u32,
    pub render: upb::Render,
    pub proposal: upb::Proposal,
    pub leash: LeashKind,
    pub leash_epsilon: f32,
    pub leash_delta: f32,
    pub framing: upb::Framing,
    /// The commit sampler.
    pub commit_temperature: f32,
    pub commit_top_k: u32,
    pub commit_top_p: f32,
    pub commit_min_p: f32,
    pub repetition_penalty: f32,
    pub max_attempts: u32,
    pub critique_each_segment: bool,
    /// None: a fresh seed per turn, recorded in the turn.
    pub seed: Option<u64>,
}

impl Default for TurnPolicy {
    fn default() -> Self {
        Self {
            schedule: pb::Schedule::Fixed,
            bursts: 3,
            steps: 4,
            commit_tokens: 16,
            reply_tokens: 64,
            fork_entropy: 2.5,
            mode: upb::LatentMode::Concept,
            temperature: 0.8,
            top_k: 50,
            noise: 0.0,
            gumbel_tau: 0.0,
            blend_alpha: 0.5,
            moi_beta: 1.0,
            adaptive: false,
            cold_threshold: 0.5,
            cold_patience: 2,
            render: upb::Render::Draft,
            // Measured (EVAL.md): sampled proposals keep plain sampling's variety, top ones lose it.
            proposal: upb::Proposal::Sample,
            leash: LeashKind::Typical,
            leash_epsilon: 0.02,
            leash_delta: 0.1,
            framing: upb::Framing::Completion,
            commit_temperature: 0.7,
            commit_top_k: 40,
            commit_top_p: 0.95,
            commit_min_p: 0.0,
            repetition_penalty: 1.0,
            max_attempts: 2,
            critique_each_segment: false,
            seed: None,
        }
    }
}

/// An enum field of a request: unset takes the default; an unknown value is an error.
fn enum_or<E: TryFrom<i32>>(
    field: &'static str,
    v: Option<i32>,
    default: E,
) -> Result<E, InvalidPolicy> {
    match v {
        None => Ok(default),
        Some(x) => E::try_from(x).map_err(|_| InvalidPolicy {
            field,
            why: format!("{x} is not a known value"),
        }),
    }
}

impl TurnPolicy {
    /// The policy a request asks for, unset fields from `defaults`, validated.
    pub fn resolve(p: &pb::DreamPolicy, defaults: &TurnPolicy) -> Result<Self, InvalidPolicy> {
        let d = defaults;
        let (leash, leash_epsilon, leash_delta) = match p.leash.as_ref().and_then(|l| l.rule) {
            None => (d.leash, d.leash_epsilon, d.leash_delta),
            Some(upb::leash::Rule::Exact(_)) => (LeashKind::Exact, d.leash_epsilon, d.leash_delta),
            Some(upb::leash::Rule::Typical(t)) => (LeashKind::Typical, t.epsilon, t.delta),
        };
        let policy = Self {
            schedule: enum_or("schedule", p.schedule, d.schedule)?,
            bursts: p.bursts.unwrap_or(d.bursts),
            steps: p.steps.unwrap_or(d.steps),
            commit_tokens: p.commit_tokens.unwrap_or(d.commit_tokens),
            reply_tokens: p.reply_tokens.unwrap_or(d.reply_tokens),
            fork_entropy: p.fork_entropy.unwrap_or(d.fork_entropy),
            mode: enum_or("mode", p.mode, d.mode)?,
            temperature: p.temperature.unwrap_or(d.temperature),
            top_k: p.top_k.unwrap_or(d.top_k),
            noise: p.noise.unwrap_or(d.noise),
            gumbel_tau: p.gumbel_tau.unwrap_or(d.gumbel_tau),
            blend_alpha: p.blend_alpha.unwrap_or(d.blend_alpha),
            moi_beta: p.moi_beta.unwrap_or(d.moi_beta),
            adaptive: p.adaptive.unwrap_or(d.adaptive),
            cold_threshold: p.cold_threshold.unwrap_or(d.cold_threshold),
            cold_patience: p.cold_patience.unwrap_or(d.cold_patience),
            render: enum_or("render", p.render, d.render)?,
            proposal: enum_or("proposal", p.proposal, d.proposal)?,
            leash,
            leash_epsilon,
            leash_delta,
            framing: enum_or("framing", p.framing, d.framing)?,
            commit_temperature: p.commit_temperature.unwrap_or(d.commit_temperature),
            commit_top_k: p.commit_top_k.unwrap_or(d.commit_top_k),
            commit_top_p: p.commit_top_p.unwrap_or(d.commit_top_p),
            commit_min_p: p.commit_min_p.unwrap_or(d.commit_min_p),
            repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
            max_attempts: p.max_attempts.unwrap_or(d.max_attempts),
            critique_each_segment: p.critique_each_segment.unwrap_or(d.critique_each_segment),
            seed: p.seed.or(d.seed),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The policy as the session stores it: every field set.
    pub fn to_pb(&self) -> pb::DreamPolicy {
        pb::DreamPolicy {
            bursts: Some(self.bursts),
            steps: Some(self.steps),
            commit_tokens: Some(self.commit_tokens),
            noise: Some(self.noise),
            gumbel_tau: Some(self.gumbel_tau),
            temperature: Some(self.temperature),
            adaptive: Some(self.adaptive),
            max_attempts: Some(self.max_attempts),
            critique_each_segment: Some(self.critique_each_segment),
            seed: self.seed,
            mode: Some(self.mode as i32),
            render: Some(self.render as i32),
            proposal: Some(self.proposal as i32),
            leash: Some(leash(self.leash, self.leash_epsilon, self.leash_delta)),
            schedule: Some(self.schedule as i32),
            fork_entropy: Some(self.fork_entropy),
            reply_tokens: Some(self.reply_tokens),
            commit_temperature: Some(self.commit_temperature),
            commit_top_k: Some(self.commit_top_k),
            commit_top_p: Some(self.commit_top_p),
            commit_min_p: Some(self.commit_min_p),
            repetition_penalty: Some(self.repetition_penalty),
            cold_threshold: Some(self.cold_threshold),
            cold_patience: Some(self.cold_patience),
            blend_alpha: Some(self.blend_alpha),
            moi_beta: Some(self.moi_beta),
            framing: Some(self.framing as i32),
            top_k: Some(self.top_k),
        }
    }

    /// Whether attempts dream (the schedule is not `off` and there are bursts to run).
    pub fn dreams(&self) -> bool {
        self.schedule != pb::Schedule::Off && self.bursts > 0
    }

    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let bad = |field, why: String| Err(InvalidPolicy { field, why });
        let within = |field, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bad(field, format!("must be in {lo}..={hi}, got {v}"))
            }
        };
        within("bursts", self.bursts, 0, 16)?;
        within("steps", self.steps, 1, 256)?;
        within("commit_tokens", self.commit_tokens, 1, 512)?;
        within("reply_tokens", self.reply_tokens, 1, 2048)?;
        within("max_attempts", self.max_attempts, 1, 5)?;
        within("cold_patience", self.cold_patience, 1, 64)?;
        within("top_k", self.top_k, 1, 1024)?;
        for (field, v) in [
            ("fork_entropy", self.fork_entropy),
            ("temperature", self.temperature),
            ("noise", self.noise),
            ("gumbel_tau", self.gumbel_tau),
            ("moi_beta", self.moi_beta),
            ("cold_threshold", self.cold_threshold),
            ("commit_temperature", self.commit_temperature),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("must be a finite number >= 0, got {v}"));
            }
        }
        for (field, v) in [
            ("blend_alpha", self.blend_alpha),
            ("leash.epsilon", self.leash_epsilon),
            ("leash.delta", self.leash_delta),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return bad(field, format!("must be in [0, 1], got {v}"));
            }
        }
        if !(self.commit_top_p > 0.0 && self.commit_top_p <= 1.0) {
            return bad(
                "commit_top_p",
                format!("must be in (0, 1], got {}", self.commit_top_p),
            );
        }
        if !(self.commit_min_p >= 0.0 && self.commit_min_p < 1.0) {
            return bad(
                "commit_min_p",
                format!("must be in [0, 1), got {}", self.commit_min_p),
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (field, v) in [
            ("schedule", self.schedule as i32),
            ("mode", self.mode as i32),
            ("render", self.render as i32),
            ("proposal", self.proposal as i32),
            ("framing", self.framing as i32),
        ] {
            if v == 0 {
                return bad(field, "must name a value, not UNSPECIFIED".into());
            }
        }
        Ok(())
    }
}

/// A leash as the muse takes it.
fn leash(kind: LeashKind, epsilon: f32, delta: f32) -> upb::Leash {
    upb::Leash {
        rule: Some(match kind {
            LeashKind::Exact => upb::leash::Rule::Exact(upb::Exact {}),
            LeashKind::Typical => upb::leash::Rule::Typical(upb::Typical { epsilon, delta }),
        }),
    }
}

/// One seed per draw site of a turn, all from the turn's seed (SplitMix64 over the site), so
/// a turn replays from `Turn.seed` alone.
pub fn derive_seed(turn_seed: u64, attempt: u32, burst: u32, site: Site) -> u64 {
    let mut z = turn_seed
        ^ (attempt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (burst as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (site as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where a seed is used.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    Burst = 1,
    Commit = 2,
}

/// A fresh turn seed, from the OS's randomness (via std's hasher keys) and the clock.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The dream knobs one attempt runs with; revisions move them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    pub noise: f32,
    pub steps: u32,
    pub leash: LeashKind,
    pub leash_epsilon: f32,
    pub leash_delta: f32,
}

impl Knobs {
    pub fn of(p: &TurnPolicy) -> Self {
        Self {
            noise: p.noise,
            steps: p.steps,
            leash: p.leash,
            leash_epsilon: p.leash_epsilon,
            leash_delta: p.leash_delta,
        }
    }

    /// The leash as the muse takes it.
    pub fn muse_leash(&self) -> upb::Leash {
        leash(self.leash, self.leash_epsilon, self.leash_delta)
    }

    /// A tighter leash: a typical threshold rises towards the exact rule; exact stays.
    fn tighter(self) -> Self {
        match self.leash {
            LeashKind::Exact => self,
            LeashKind::Typical if self.leash_delta >= 0.5 => Self {
                leash: LeashKind::Exact,
                ..self
            },
            LeashKind::Typical => Self {
                leash_epsilon: (self.leash_epsilon * 2.0).clamp(0.05, 1.0),
                leash_delta: (self.leash_delta * 2.0).clamp(0.2, 1.0),
                ..self
            },
        }
    }

    /// Fewer steps, or — at one step — a tighter leash.
    fn calmer(self) -> Self {
        if self.steps > 1 {
            Self {
                steps: (self.steps / 2).max(1),
                ..self
            }
        } else {
            self.tighter()
        }
    }
}

/// Applies the majordomo's advice to the next attempt's knobs. Advice that cannot change
/// anything (lower noise at 0, fewer steps at 1) becomes a change that can: fewer steps, then a
/// tighter leash.
pub fn revise(k: Knobs, noise: NoiseAdvice, steps: StepsAdvice) -> Knobs {
    let k = match noise {
        NoiseAdvice::Lower if k.noise > 0.0 => Knobs {
            noise: k.noise * 0.5,
            ..k
        },
        NoiseAdvice::Lower => k.calmer(),
        NoiseAdvice::Raise => Knobs {
            noise: (k.noise + 0.1).min(2.0),
            ..k
        },
        NoiseAdvice::Keep | NoiseAdvice::Unspecified => k,
    };
    match steps {
        StepsAdvice::Fewer => k.calmer(),
        StepsAdvice::More => Knobs {
            steps: (k.steps * 2).min(64),
            ..k
        },
        StepsAdvice::Keep | StepsAdvice::Unspecified => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_take_the_defaults_and_zero_is_a_value() {
        let defaults = TurnPolicy {
            noise: 0.3,
            commit_temperature: 0.9,
            ..Default::default()
        };
        let asked = pb::DreamPolicy {
            noise: Some(0.0),
            commit_temperature: Some(0.0),
            ..Default::default()
        };
        let p = TurnPolicy::resolve(&asked, &defaults).unwrap();
        assert_eq!((p.noise, p.commit_temperature), (0.0, 0.0));
        let p = TurnPolicy::resolve(&pb::DreamPolicy::default(), &defaults).unwrap();
        assert_eq!((p.noise, p.commit_temperature), (0.3, 0.9));
        // What is stored resolves to itself whatever the defaults become.
        let stored = p.to_pb();
        assert_eq!(
            TurnPolicy::resolve(&stored, &TurnPolicy::default()).unwrap(),
            p
        );
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let e = TurnPolicy::resolve(
            &pb::DreamPolicy {
                steps: Some(0),
                ..Default::default()
            },
            &TurnPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "policy.steps must be in 1..=256, got 0");
        let e = TurnPolicy::resolve(
            &pb::DreamPolicy {
                render: Some(42),
                ..Default::default()
            },
            &TurnPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "render");
        let e = TurnPolicy::resolve(
            &pb::DreamPolicy {
                leash: Some(upb::Leash {
                    rule: Some(upb::leash::Rule::Typical(upb::Typical {
                        epsilon: 2.0,
                        delta: 0.1,
                    })),
                }),
                ..Default::default()
            },
            &TurnPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "leash.epsilon");
    }

    #[test]
    fn seeds_differ_per_site_and_replay() {
        let a = derive_seed(7, 1, 0, Site::Burst);
        assert_eq!(a, derive_seed(7, 1, 0, Site::Burst));
        for other in [
            derive_seed(7, 1, 0, Site::Commit),
            derive_seed(7, 2, 0, Site::Burst),
            derive_seed(7, 1, 1, Site::Burst),
            derive_seed(8, 1, 0, Site::Burst),
        ] {
            assert_ne!(a, other);
        }
        assert_ne!(fresh_seed(), fresh_seed());
    }

    #[test]
    fn advice_that_cannot_act_becomes_one_that_can() {
        let k = Knobs::of(&TurnPolicy::default());
        assert_eq!(k.noise, 0.0);
        // Lower noise at 0: fewer steps instead.
        let k2 = revise(k, NoiseAdvice::Lower, StepsAdvice::Keep);
        assert_eq!((k2.noise, k2.steps), (0.0, k.steps / 2));
        // At one step: a tighter leash, then the exact rule.
        let one = Knobs { steps: 1, ..k };
        let t = revise(one, NoiseAdvice::Lower, StepsAdvice::Keep);
        assert!(t.leash_delta > one.leash_delta && t.leash == LeashKind::Typical);
        let exact = revise(
            Knobs {
                leash_delta: 0.6,
                ..one
            },
            NoiseAdvice::Keep,
            StepsAdvice::Fewer,
        );
        assert_eq!(exact.leash, LeashKind::Exact);
        let raised = revise(
            Knobs { noise: 1.95, ..k },
            NoiseAdvice::Raise,
            StepsAdvice::More,
        );
        assert_eq!((raised.noise, raised.steps), (2.0, k.steps * 2));
    }
}
