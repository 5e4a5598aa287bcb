//! One attempt on one muse replica: prime with the windowed transcript, then the schedule's
//! bursts and commits, streaming latent steps and text as they come.
//!
//! - fixed: a burst at the start of the reply and after every `commit_tokens` tokens (each
//!   commit ends at a word boundary, so every burst starts between words), then the rest;
//! - entropy: decode until a fork (a word boundary where the next token's entropy exceeds
//!   `fork_entropy`), dream there until the model is confident again, repeat;
//! - off, or a plain attempt: decode the reply in one commit.

use crate::critic::Critic;
use crate::failover::deadline;
use crate::policy::{derive_seed, Knobs, Site, TurnPolicy};
use crate::replicas::Replica;
use crate::turn::TurnContext;
use mm_proto::muse::v1 as upb;
use mm_proto::muse_session::SessionClient;
use mm_proto::orchestrator::v1 as pb;
use pb::turn_event::Event as TE;
use std::time::Instant;
use tonic::{Code, Status};
use upb::client_command::Command as C;
use upb::server_event::Event as E;

/// What one attempt runs.
pub struct Plan<'a> {
    pub number: u32,
    pub messages: &'a [upb::ChatMessage],
    pub policy: &'a TurnPolicy,
    pub knobs: Knobs,
    pub seed: u64,
    /// No dream: the schedule is off, or this is the plain last resort.
    pub plain: bool,
    /// Stop strings: every commit ends before the first (the muse does not include it).
    pub stop: &'a [String],
}

/// One muse session stream and what the attempt has made so far.
struct Run<'c, 'a> {
    ctx: &'c TurnContext<'a>,
    plan: &'c Plan<'c>,
    session: SessionClient,
    attempt: pb::Attempt,
    /// Latent steps reported: every n-th (0: none).
    every: u32,
}

pub async fn run(
    ctx: &TurnContext<'_>,
    replica: &Replica,
    plan: &Plan<'_>,
    segments: Option<&Critic<'_>>,
) -> Result<pb::Attempt, Status> {
    let timeout = ctx.call_timeout;
    let t_prime = Instant::now();
    let mut client = upb::muse_client::MuseClient::new(replica.channel.clone());
    let mut session = deadline(
        timeout,
        "opening a muse session",
        SessionClient::open(&mut client),
    )
    .await?;
    let prime = upb::Prime {
        prompt: Some(upb::prime::Prompt::Chat(upb::ChatMessages {
            messages: plan.messages.to_vec(),
        })),
    };
    let Some(E::Primed(primed)) =
        last(deadline(timeout, "the prime", session.run(C::Prime(prime))).await?)?
    else {
        return Err(Status::internal("the muse answered a prime without Primed"));
    };
    let attempt = pb::Attempt {
        prime_millis: t_prime.elapsed().as_secs_f64() * 1e3,
        number: plan.number,
        noise: plan.knobs.noise,
        steps: plan.knobs.steps,
        prompt_tokens: primed.prompt_tokens,
        prompt_cached_tokens: primed.cached_tokens,
        plain: plan.plain,
        ..Default::default()
    };
    let every = match ctx.verbosity {
        pb::Verbosity::Quiet => 0,
        pb::Verbosity::Full => 1,
        _ => 4,
    };
    let mut r = Run {
        ctx,
        plan,
        session,
        attempt,
        every,
    };
    let p = plan.policy;
    let mut budget = p.reply_tokens;
    let bursts = if plan.plain { 0 } else { p.bursts };
    match p.schedule {
        pb::Schedule::Entropy if bursts > 0 => {
            let mut b = 0;
            loop {
                let fork = (b < bursts).then_some(p.fork_entropy);
                let c = r.commit(b, budget, false, fork).await?;
                budget = budget.saturating_sub(c.tokens.len() as u32);
                if c.stop() != upb::CommitStop::Fork || budget == 0 {
                    break;
                }
                r.burst(b, c.fork_entropy).await?;
                b += 1;
            }
        }
        _ if bursts > 0 => {
            let mut ended = false;
            for b in 0..bursts {
                if budget == 0 {
                    break;
                }
                r.burst(b, 0.0).await?;
                let c = r.commit(b, budget.min(p.commit_tokens), true, None).await?;
                budget = budget.saturating_sub(c.tokens.len() as u32);
                if c.stop() != upb::CommitStop::MaxTokens {
                    ended = true; // the muse finished its reply, or ran out of context
                    break;
                }
                if let (Some(critic), true) = (segments, b + 1 < bursts) {
                    let review = critic
                        .review(ctx, r.attempt.draft.trim(), &r.attempt.bursts)
                        .await?;
                    ctx.emit(TE::Critique(review.event(plan.number, true)))
                        .await?;
                    if review.verdict == pb::Verdict::Reject {
                        ended = true; // no point dreaming on: let the attempt be judged and revised
                        break;
                    }
                }
            }
            if !ended && budget > 0 {
                r.commit(bursts, budget, false, None).await?;
            }
        }
        _ => {
            r.commit(0, budget, false, None).await?;
        }
    }
    let _ = r.session.run(C::Close(upb::Close {})).await;
    let mut attempt = r.attempt;
    // A stop string split across two commits is not seen by the muse: cut it here.
    if let Some(cut) = plan
        .stop
        .iter()
        .filter_map(|s| attempt.draft.find(s.as_str()))
        .min()
    {
        attempt.draft.truncate(cut);
    }
    attempt.draft = attempt.draft.trim().to_string();
    Ok(attempt)
}

impl Run<'_, '_> {
    /// A burst; `fork_entropy`: the entropy of the fork that called for it (entropy schedule).
    async fn burst(&mut self, b: u32, fork_entropy: f32) -> Result<(), Status> {
        let (p, k) = (self.plan.policy, self.plan.knobs);
        let cold = p.adaptive || p.schedule == pb::Schedule::Entropy;
        let burst = upb::DreamBurst {
            mode: p.mode as i32,
            blend_alpha: Some(p.blend_alpha),
            moi_beta: Some(p.moi_beta),
            temperature: Some(p.temperature),
            top_k: Some(p.top_k),
            noise: Some(k.noise),
            gumbel_tau: (p.gumbel_tau > 0.0).then_some(p.gumbel_tau),
            seed: derive_seed(self.plan.seed, self.plan.number, b, Site::Burst),
            steps: k.steps,
            cold_stop: cold.then_some(upb::ColdStop {
                threshold: p.cold_threshold,
                patience: p.cold_patience,
            }),
            // The nearest token costs a vocabulary-sized product per step: only when every
            // step is reported.
            telemetry: if self.every == 1 {
                upb::TelemetryLevel::Full
            } else {
                upb::TelemetryLevel::Basic
            } as i32,
            ..Default::default()
        };
        let (number, every) = (self.plan.number, self.every);
        let mut steps = Vec::new();
        let t_burst = Instant::now();
        let events = deadline(
            self.ctx.call_timeout,
            "a burst",
            self.session.run_with(C::Burst(burst), |e| {
                if let E::LatentStep(l) = e {
                    if every > 0 && l.step % every == 0 {
                        steps.push(pb::LatentStep {
                            attempt: number,
                            burst: b,
                            step: l.step,
                            entropy: l.entropy,
                            top: l
                                .top
                                .iter()
                                .map(|t| pb::TopToken {
                                    text: t.text.clone(),
                                    p: t.p,
                                })
                                .collect(),
                            norm: l.norm,
                            nearest: l.nearest.clone(),
                            kl_prev: l.kl_prev,
                        });
                    }
                }
                true
            }),
        )
        .await?;
        for st in steps {
            self.ctx.emit(TE::LatentStep(st)).await?;
        }
        let Some(E::BurstDone(done)) = last(events)? else {
            return Err(Status::internal(
                "the muse answered a burst without BurstDone",
            ));
        };
        let summary = pb::Burst {
            steps: done.steps,
            stop: done.stop,
            mean_entropy: done.mean_entropy,
            millis: done.millis,
            wall_millis: t_burst.elapsed().as_secs_f64() * 1e3,
            fork_entropy,
            ..Default::default()
        };
        self.ctx
            .emit(TE::BurstEnded(pb::BurstEnded {
                attempt: number,
                burst: b,
                summary: Some(summary.clone()),
            }))
            .await?;
        self.attempt.bursts.push(summary);
        Ok(())
    }

    /// A commit of at most `max_tokens`, rendering the burst before it.
    async fn commit(
        &mut self,
        b: u32,
        max_tokens: u32,
        end_at_word: bool,
        fork_entropy: Option<f32>,
    ) -> Result<upb::CommitDone, Status> {
        let (p, k) = (self.plan.policy, self.plan.knobs);
        let commit = upb::Commit {
            max_tokens,
            sampling: Some(upb::Sampling {
                temperature: Some(p.commit_temperature),
                top_k: Some(p.commit_top_k),
                top_p: Some(p.commit_top_p),
                min_p: Some(p.commit_min_p),
                repetition_penalty: Some(p.repetition_penalty),
                seed: derive_seed(self.plan.seed, self.plan.number, b, Site::Commit),
            }),
            mode: upb::CommitMode::Replace as i32,
            render: p.render as i32,
            proposal: p.proposal as i32,
            leash: Some(k.muse_leash()),
            framing: p.framing as i32,
            end_at_word,
            fork_entropy,
            stop: self.plan.stop.to_vec(),
            ..Default::default()
        };
        let t_commit = Instant::now();
        let events = deadline(
            self.ctx.call_timeout,
            "a commit",
            self.session.run(C::Commit(commit)),
        )
        .await?;
        let Some(E::CommitDone(c)) = last(events)? else {
            return Err(Status::internal(
                "the muse answered a commit without CommitDone",
            ));
        };
        if c.proposed > 0 {
            if let Some(burst) = self.attempt.bursts.last_mut() {
                burst.accepted = c.accepted;
                burst.rendered = c.rendered.clone();
            }
        }
        if !c.text.is_empty() {
            self.ctx
                .emit(TE::Commit(pb::CommitDelta {
                    attempt: self.plan.number,
                    text: c.text.clone(),
                    rendered: c.rendered.clone(),
                }))
                .await?;
        }
        self.attempt.commit_millis += t_commit.elapsed().as_secs_f64() * 1e3;
        self.attempt.draft.push_str(&c.text);
        self.attempt.reply_tokens += c.tokens.len() as u32;
        Ok(c)
    }
}

/// The final event of a command, or its error as a status.
fn last(mut events: Vec<E>) -> Result<Option<E>, Status> {
    match events.pop() {
        Some(E::Error(e)) => Err(Status::new(
            Code::from(e.code),
            format!("muse: {}", e.message),
        )),
        other => Ok(other),
    }
}
