//! One turn: prime the muse with the window, dream and commit per the session's policy, have
//! the majordomo critique each attempt, revise (bounded), and choose the reply by sober
//! signals — a clean draft first, then the fluent one, the critic breaking ties. If every
//! dream attempt is flagged by the deterministic checks, one more attempt decodes plainly.
//! A replica that fails mid-turn is replaced by another of the same model, re-primed from the
//! transcript; nothing committed is lost.

use crate::attempt::{self, Plan};
use crate::critic::{Critic, Rank};
use crate::failover::with_failover;
use crate::history;
use crate::metrics::Metrics;
use crate::policy::{fresh_seed, revise, Knobs, TurnPolicy};
use crate::replicas::Pool;
use mm_proto::majordomo::v1 as mpb;
use mm_proto::orchestrator::v1 as pb;
use pb::turn_event::Event as TE;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

/// What a turn needs besides the session.
pub struct TurnContext<'a> {
    pub metrics: &'a Metrics,
    pub muse: &'a Pool,
    pub majordomo: &'a Pool,
    pub call_timeout: Duration,
    pub history_chars: usize,
    pub events: mpsc::Sender<Result<pb::TurnEvent, Status>>,
    pub verbosity: pb::Verbosity,
}

impl TurnContext<'_> {
    /// Sends an event; an error means the client went away (the turn is abandoned).
    pub async fn emit(&self, e: TE) -> Result<(), Status> {
        self.events
            .send(Ok(pb::TurnEvent { event: Some(e) }))
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }
}

/// Runs one turn on `session` under `policy` and returns the finished turn (not yet persisted).
/// The reply ends before the first of the `stop` strings.
pub async fn run(
    ctx: &TurnContext<'_>,
    session: &pb::Session,
    policy: &TurnPolicy,
    user: &str,
    stop: &[String],
) -> Result<pb::Turn, Status> {
    let roles = session.roles.clone().unwrap_or_default();
    let index = session.turns.len() as u32;
    let seed = policy.seed.unwrap_or_else(fresh_seed);
    let messages = history::window(session, user, ctx.history_chars);
    let conversation: Vec<mpb::ChatMessage> = messages
        .iter()
        .map(|m| mpb::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let critic = Critic {
        majordomo: &roles.majordomo,
        user,
        conversation: &conversation,
    };
    let mut knobs = Knobs::of(policy);
    let mut attempts: Vec<pb::Attempt> = Vec::new();
    let mut ranks: Vec<Rank> = Vec::new();
    let started = std::sync::atomic::AtomicBool::new(false);
    // The replica that primed this conversation last keeps its KV prefix: the session's last
    // turn's, then this turn's previous attempt's (the same prompt again).
    let mut prefer = session
        .turns
        .last()
        .and_then(|t| t.attempts.get(t.chosen_attempt.saturating_sub(1) as usize))
        .map(|a| a.muse_replica.clone());
    for number in 1.. {
        let plain = !policy.dreams() || number > policy.max_attempts;
        let plan = Plan {
            number,
            messages: &messages,
            policy,
            knobs,
            seed,
            plain,
            stop,
        };
        let segments = policy.critique_each_segment.then_some(&critic);
        let t_queue = Instant::now();
        let (mut attempt, replica) =
            with_failover(ctx, ctx.muse, &roles.muse, prefer.as_deref(), |replica| {
                let (plan, started) = (&plan, &started);
                async move {
                    let queued = t_queue.elapsed().as_secs_f64() * 1e3;
                    if !started.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        ctx.emit(TE::Started(pb::TurnStarted {
                            turn: index,
                            roles: Some(pb::Roles {
                                muse: replica.model(),
                                majordomo: String::new(),
                            }),
                            muse_replica: replica.endpoint.clone(),
                            seed,
                        }))
                        .await?;
                    }
                    let mut a = attempt::run(ctx, &replica, plan, segments).await?;
                    a.queue_millis = queued;
                    Ok(a)
                }
            })
            .await?;
        attempt.muse_replica = replica.clone();
        prefer = Some(replica);
        let t_critique = Instant::now();
        let review = critic.review(ctx, &attempt.draft, &attempt.bursts).await?;
        attempt.critique_millis = t_critique.elapsed().as_secs_f64() * 1e3;
        attempt.critique_json = review.json.clone();
        attempt.verdict = review.verdict as i32;
        attempt.nll = review.nll.unwrap_or(f32::NAN);
        attempt.flags = review.flags.iter().map(|f| *f as i32).collect();
        ctx.emit(TE::Critique(review.event(number, false))).await?;
        ranks.push(review.rank());
        attempts.push(attempt);
        if review.is_clean() && review.verdict == pb::Verdict::Accept {
            break;
        }
        let any_clean = attempts.iter().any(|a| a.flags.is_empty());
        if number >= policy.max_attempts {
            if any_clean || plain {
                break;
            }
            ctx.emit(TE::Revision(pb::Revision {
                next_attempt: number + 1,
                noise: knobs.noise,
                steps: knobs.steps,
                reason: "every dream attempt was flagged by the checks: decoding plainly".into(),
                plain: true,
            }))
            .await?;
            continue;
        }
        knobs = revise(knobs, review.advice.noise(), review.advice.steps());
        ctx.emit(TE::Revision(pb::Revision {
            next_attempt: number + 1,
            noise: knobs.noise,
            steps: knobs.steps,
            reason: format!(
                "verdict {}",
                review
                    .verdict
                    .as_str_name()
                    .trim_start_matches("VERDICT_")
                    .to_lowercase()
            ),
            plain: false,
        }))
        .await?;
    }
    let chosen = (0..ranks.len())
        .max_by_key(|&i| (ranks[i], std::cmp::Reverse(i)))
        .unwrap_or(0);
    Ok(pb::Turn {
        index,
        user: user.to_string(),
        reply: attempts[chosen].draft.clone(),
        chosen_attempt: chosen as u32 + 1,
        attempts,
        roles: Some(roles),
        created_unix_ms: now_ms(),
        seed,
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
