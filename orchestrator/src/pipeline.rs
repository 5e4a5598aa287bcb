//! The turn pipeline: prime the muse with the windowed transcript, dream in bursts and commit,
//! have the majordomo critique the draft, accept or revise (bounded attempts, best draft kept),
//! persist, stream. A muse or majordomo replica that fails mid-turn is replaced by another of
//! the same model, re-primed from the transcript; nothing committed is lost.

use crate::replicas::{Lease, Pool};
use mm_proto::majordomo::v1 as mpb;
use mm_proto::muse::v1 as upb;
use mm_proto::muse_session::SessionClient;
use mm_proto::orchestrator::v1 as pb;
use pb::turn_event::Event as TE;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use upb::client_command::Command as C;
use upb::server_event::Event as E;

/// What a turn needs besides the session.
pub struct TurnContext<'a> {
    pub muse: &'a Pool,
    pub majordomo: &'a Pool,
    pub call_timeout: Duration,
    pub history_chars: usize,
    pub events: mpsc::Sender<Result<pb::TurnEvent, Status>>,
    pub verbosity: pb::Verbosity,
}

impl TurnContext<'_> {
    /// Sends an event; an error means the client went away (the turn is abandoned).
    async fn emit(&self, e: TE) -> Result<(), Status> {
        self.events
            .send(Ok(pb::TurnEvent { event: Some(e) }))
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }
}

/// The dream knobs of one attempt.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    noise: f32,
    steps: u32,
}

/// The chat the muse is primed with: the session's summary, the last turns that fit in
/// `history_chars`, and the new message.
pub fn window(session: &pb::Session, user: &str, history_chars: usize) -> Vec<upb::ChatMessage> {
    let msg = |role: &str, content: &str| upb::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let turns = &session.turns[first_in_window(session, history_chars)..];
    let mut out = Vec::new();
    if !session.summary.is_empty() {
        out.push(msg(
            "system",
            &format!("Summary of the conversation so far: {}", session.summary),
        ));
    }
    for t in turns {
        out.push(msg("user", &t.user));
        out.push(msg("assistant", &t.reply));
    }
    out.push(msg("user", user));
    out
}

/// Index of the oldest turn given verbatim: the latest turns whose text fits in
/// `history_chars` (at least the last one).
pub fn first_in_window(session: &pb::Session, history_chars: usize) -> usize {
    let mut used = 0;
    let mut first = session.turns.len();
    for (i, t) in session.turns.iter().enumerate().rev() {
        let len = t.user.len() + t.reply.len();
        if used + len > history_chars && first < session.turns.len() {
            break;
        }
        used += len;
        first = i;
    }
    first
}

/// When turns have left the window since the last fold, asks the majordomo to fold them (and
/// the previous summary) into a new summary: `(summary, summarized_turns)`. A failure only
/// costs the summary (the older turns stay out of the prompt); the turn goes on.
pub async fn fold_history(
    ctx: &TurnContext<'_>,
    session: &pb::Session,
    majordomo_model: &str,
) -> Option<(String, u32)> {
    let first = first_in_window(session, ctx.history_chars) as u32;
    if first <= session.summarized_turns {
        return None;
    }
    let mut text = session.summary.clone();
    for t in &session.turns[session.summarized_turns as usize..first as usize] {
        text.push_str(&format!("\nUser: {}\nAssistant: {}", t.user, t.reply));
    }
    let text: String = text
        .chars()
        .rev()
        .take(6000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let lease = ctx.majordomo.lease(majordomo_model, &[]).await?;
    let mut client = mpb::majordomo_client::MajordomoClient::new(lease.replica.channel.clone());
    let call = client.structure(mpb::StructureRequest {
        draft: text.into_bytes(),
    });
    match tokio::time::timeout(ctx.call_timeout, call).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            let summary = if r.summary.trim().is_empty() {
                r.title
            } else {
                format!("{} — {}", r.title, r.summary)
            };
            Some((summary, first))
        }
        other => {
            tracing::warn!(?other, "could not fold old turns into a summary");
            None
        }
    }
}

/// What the majordomo needs to critique a draft of this turn.
struct Review<'a> {
    majordomo: &'a str,
    user: &'a str,
    conversation: &'a [mpb::ChatMessage],
}

impl Review<'_> {
    /// Critiques `draft` (made by `bursts`); returns the result and its verdict word.
    async fn critique(
        &self,
        ctx: &TurnContext<'_>,
        draft: &str,
        bursts: &[pb::Burst],
    ) -> Result<(mpb::CritiqueResult, &'static str), Status> {
        let telemetry = mpb::TelemetrySummary {
            bursts: bursts.len() as u32,
            latent_steps: bursts.iter().map(|b| b.steps).sum(),
            mean_entropy: mean(bursts.iter().map(|b| b.mean_entropy)),
            stop_reasons: bursts.iter().map(|b| b.stop_reason.clone()).collect(),
        };
        let result = critique_with_failover(
            ctx,
            self.majordomo,
            self.user,
            self.conversation,
            draft,
            telemetry,
        )
        .await?;
        let verdict = match result
            .critique
            .as_ref()
            .map(|c| mpb::Verdict::try_from(c.verdict))
        {
            Some(Ok(mpb::Verdict::Accept)) => "accept",
            Some(Ok(mpb::Verdict::Reject)) => "reject",
            _ => "revise",
        };
        Ok((result, verdict))
    }
}

/// Whether an error is the replica's fault (retry elsewhere) rather than the request's.
fn replica_failed(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::DeadlineExceeded | Code::Aborted
    )
}

/// Runs one turn on `session` and returns the finished turn (not yet persisted).
pub async fn run_turn(
    ctx: &TurnContext<'_>,
    session: &pb::Session,
    user: &str,
) -> Result<pb::Turn, Status> {
    let roles = session.roles.clone().unwrap_or_default();
    let policy = session.policy.unwrap_or_default();
    let index = session.turns.len() as u32;
    let messages = window(session, user, ctx.history_chars);
    let conversation: Vec<mpb::ChatMessage> = messages
        .iter()
        .map(|m| mpb::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let mut knobs = Knobs {
        noise: policy.noise,
        steps: policy.steps,
    };
    let review = Review {
        majordomo: &roles.majordomo,
        user,
        conversation: &conversation,
    };
    let mut attempts: Vec<pb::Attempt> = Vec::new();
    let mut best: Option<(i32, usize)> = None;
    let mut started = false;
    for number in 1..=policy.max_attempts.max(1) {
        let segments = policy.critique_each_segment.then_some(&review);
        let (mut attempt, replica) = dream_with_failover(
            ctx,
            &roles.muse,
            &messages,
            &policy,
            knobs,
            number,
            index,
            &mut started,
            segments,
        )
        .await?;
        attempt.muse_replica = replica;
        let t_critique = std::time::Instant::now();
        let (result, verdict) = review
            .critique(ctx, &attempt.draft, &attempt.bursts)
            .await?;
        let critique = result.critique.clone().unwrap_or_default();
        attempt.critique_millis = t_critique.elapsed().as_secs_f64() * 1e3;
        attempt.critique_json = result.json.clone();
        attempt.verdict = verdict.into();
        ctx.emit(TE::Critique(pb::CritiqueEvent {
            attempt: number,
            verdict: verdict.into(),
            json: result.json,
            segment: false,
        }))
        .await?;
        let score = score(verdict, &critique);
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, attempts.len()));
        }
        attempts.push(attempt);
        if verdict == "accept" || number == policy.max_attempts.max(1) {
            break;
        }
        let advice = critique.advice.unwrap_or_default();
        knobs = revise(knobs, &advice);
        ctx.emit(TE::Revision(pb::Revision {
            next_attempt: number + 1,
            noise: knobs.noise,
            steps: knobs.steps,
            reason: format!("verdict {verdict}"),
        }))
        .await?;
    }
    let chosen = best.map_or(0, |(_, i)| i);
    let reply = attempts[chosen].draft.clone();
    Ok(pb::Turn {
        index,
        user: user.to_string(),
        attempts,
        reply,
        chosen_attempt: chosen as u32 + 1,
        roles: Some(roles),
        created_unix_ms: now_ms(),
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn mean(xs: impl Iterator<Item = f32>) -> f32 {
    let v: Vec<f32> = xs.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

/// Higher is better: the verdict first, then coherence and novelty.
fn score(verdict: &str, c: &mpb::Critique) -> i32 {
    let v = match verdict {
        "accept" => 200,
        "revise" => 100,
        _ => 0,
    };
    v + 2 * c.coherence as i32 + c.novelty as i32
}

/// Applies the majordomo's advice to the next attempt's knobs.
fn revise(k: Knobs, advice: &mpb::Advice) -> Knobs {
    let noise = match mpb::NoiseAdvice::try_from(advice.noise) {
        Ok(mpb::NoiseAdvice::Lower) => (k.noise * 0.5).max(0.0),
        Ok(mpb::NoiseAdvice::Raise) => (k.noise + 0.1).min(2.0),
        _ => k.noise,
    };
    let steps = match mpb::StepsAdvice::try_from(advice.steps) {
        Ok(mpb::StepsAdvice::Fewer) => (k.steps / 2).max(1),
        Ok(mpb::StepsAdvice::More) => (k.steps * 2).min(64),
        _ => k.steps,
    };
    Knobs { noise, steps }
}

#[allow(clippy::too_many_arguments)]
async fn dream_with_failover(
    ctx: &TurnContext<'_>,
    model: &str,
    messages: &[upb::ChatMessage],
    policy: &pb::DreamPolicy,
    knobs: Knobs,
    number: u32,
    turn: u32,
    started: &mut bool,
    segments: Option<&Review<'_>>,
) -> Result<(pb::Attempt, String), Status> {
    let mut tried: Vec<String> = Vec::new();
    loop {
        let t_queue = std::time::Instant::now();
        let Some(lease) = ctx.muse.lease(model, &tried).await else {
            return Err(Status::unavailable(format!(
                "no healthy muse replica serves `{model}` (tried: {}); the session is unchanged — retry when a replica is back",
                if tried.is_empty() { "none".to_string() } else { tried.join(", ") }
            )));
        };
        let endpoint = lease.replica.endpoint.clone();
        if !*started {
            *started = true;
            let roles = pb::Roles {
                muse: lease.replica.model(),
                majordomo: String::new(),
            };
            ctx.emit(TE::Started(pb::TurnStarted {
                turn,
                roles: Some(roles),
                muse_replica: endpoint.clone(),
            }))
            .await?;
        }
        let queued = t_queue.elapsed().as_secs_f64() * 1e3;
        match dream(ctx, &lease, messages, policy, knobs, number, segments).await {
            Ok(mut a) => {
                a.queue_millis = queued;
                return Ok((a, endpoint));
            }
            Err(e) if replica_failed(&e) => {
                tracing::warn!(replica = endpoint, error = %e, "muse replica failed mid-turn; failing over");
                lease.replica.mark_down();
                tried.push(endpoint.clone());
                let to =
                    ctx.muse.replicas.iter().find(|r| {
                        r.is_healthy() && r.model() == model && !tried.contains(&r.endpoint)
                    });
                ctx.emit(TE::Failover(pb::Failover {
                    from_replica: endpoint,
                    to_replica: to.map(|r| r.endpoint.clone()).unwrap_or_default(),
                    reason: e.message().to_string(),
                }))
                .await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One attempt on one muse replica: prime, then bursts each followed by a commit.
async fn dream(
    ctx: &TurnContext<'_>,
    lease: &Lease,
    messages: &[upb::ChatMessage],
    policy: &pb::DreamPolicy,
    knobs: Knobs,
    number: u32,
    segments: Option<&Review<'_>>,
) -> Result<pb::Attempt, Status> {
    let timeout = ctx.call_timeout;
    let deadline = |what: &'static str| {
        move |_| {
            Status::deadline_exceeded(format!("the muse did not answer {what} within {timeout:?}"))
        }
    };
    let t_prime = std::time::Instant::now();
    let mut client = upb::muse_client::MuseClient::new(lease.replica.channel.clone());
    let mut s = tokio::time::timeout(timeout, SessionClient::open(&mut client))
        .await
        .map_err(deadline("open"))??;
    let prime = upb::Prime {
        prompt: Some(upb::prime::Prompt::Chat(upb::ChatMessages {
            messages: messages.to_vec(),
        })),
    };
    let primed = final_ok(
        tokio::time::timeout(timeout, s.run(C::Prime(prime)))
            .await
            .map_err(deadline("prime"))??,
    )?;
    let Some(E::Primed(primed)) = primed else {
        return Err(Status::internal("the muse answered a prime without Primed"));
    };
    let every = match ctx.verbosity {
        pb::Verbosity::Quiet => 0,
        pb::Verbosity::Full => 1,
        _ => 4,
    };
    let mut attempt = pb::Attempt {
        prime_millis: t_prime.elapsed().as_secs_f64() * 1e3,
        number,
        noise: knobs.noise,
        steps: knobs.steps,
        prompt_tokens: primed.prompt_tokens,
        ..Default::default()
    };
    for b in 0..policy.bursts.max(1) {
        let burst = upb::DreamBurst {
            steps: knobs.steps,
            seed: policy.seed.wrapping_add(1000 * number as u64 + b as u64),
            noise: Some(knobs.noise),
            gumbel_tau: (policy.gumbel_tau > 0.0).then_some(policy.gumbel_tau),
            temperature: (policy.temperature > 0.0).then_some(policy.temperature),
            cold_stop: policy.adaptive.then_some(upb::ColdStop {
                threshold: 0.5,
                patience: 2,
            }),
            telemetry: upb::TelemetryLevel::Basic as i32,
            ..Default::default()
        };
        let mut steps = Vec::new();
        let t_burst = std::time::Instant::now();
        let events = tokio::time::timeout(
            timeout,
            s.run_with(C::Burst(burst), |e| {
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
                        });
                    }
                }
                true
            }),
        )
        .await
        .map_err(deadline("a burst"))??;
        for st in steps {
            ctx.emit(TE::LatentStep(st)).await?;
        }
        let Some(E::BurstDone(done)) = final_ok(events)? else {
            return Err(Status::internal(
                "the muse answered a burst without BurstDone",
            ));
        };
        attempt.bursts.push(pb::Burst {
            steps: done.steps,
            stop_reason: done.stop_reason,
            mean_entropy: done.mean_entropy,
            millis: done.millis,
            wall_millis: t_burst.elapsed().as_secs_f64() * 1e3,
        });
        let commit = upb::Commit {
            max_tokens: policy.commit_tokens.max(1),
            sampling: Some(upb::Sampling {
                temperature: Some(0.7),
                seed: policy.seed.wrapping_add(number as u64),
                ..Default::default()
            }),
            mode: upb::CommitMode::Replace as i32,
            ..Default::default()
        };
        let t_commit = std::time::Instant::now();
        let events = tokio::time::timeout(timeout, s.run(C::Commit(commit)))
            .await
            .map_err(deadline("a commit"))??;
        let Some(E::CommitDone(c)) = final_ok(events)? else {
            return Err(Status::internal(
                "the muse answered a commit without CommitDone",
            ));
        };
        if !c.text.is_empty() {
            ctx.emit(TE::Commit(pb::CommitDelta {
                attempt: number,
                text: c.text.clone(),
            }))
            .await?;
        }
        attempt.commit_millis += t_commit.elapsed().as_secs_f64() * 1e3;
        attempt.draft.push_str(&c.text);
        if c.stop_reason != "max_tokens" {
            break; // the muse finished its reply (end of turn) or ran out of context
        }
        if let (Some(review), true) = (segments, b + 1 < policy.bursts.max(1)) {
            let (result, verdict) = review
                .critique(ctx, attempt.draft.trim(), &attempt.bursts)
                .await?;
            ctx.emit(TE::Critique(pb::CritiqueEvent {
                attempt: number,
                verdict: verdict.into(),
                json: result.json,
                segment: true,
            }))
            .await?;
            if verdict == "reject" {
                break; // no point dreaming on: let the attempt be judged and revised
            }
        }
    }
    let _ = s.run(C::Close(upb::Close {})).await;
    attempt.draft = attempt.draft.trim().to_string();
    Ok(attempt)
}

/// The final event of a command, or its error as a status.
fn final_ok(mut events: Vec<E>) -> Result<Option<E>, Status> {
    match events.pop() {
        Some(E::Error(e)) => Err(Status::new(
            Code::from(e.code),
            format!("muse: {}", e.message),
        )),
        other => Ok(other),
    }
}

async fn critique_with_failover(
    ctx: &TurnContext<'_>,
    model: &str,
    user: &str,
    conversation: &[mpb::ChatMessage],
    draft: &str,
    telemetry: mpb::TelemetrySummary,
) -> Result<mpb::CritiqueResult, Status> {
    let mut tried: Vec<String> = Vec::new();
    let mut busy_retries = 0;
    loop {
        let Some(lease) = ctx.majordomo.lease(model, &tried).await else {
            return Err(Status::unavailable(format!("no healthy majordomo replica serves `{model}`; the session is unchanged — retry later")));
        };
        let req = mpb::CritiqueRequest {
            request: user.to_string(),
            conversation: conversation[..conversation.len().saturating_sub(1)].to_vec(),
            draft: draft.as_bytes().to_vec(),
            telemetry: Some(telemetry.clone()),
        };
        let mut client = mpb::majordomo_client::MajordomoClient::new(lease.replica.channel.clone());
        let call = async {
            let mut stream = client.critique(req).await?.into_inner();
            while let Some(ev) = stream.message().await? {
                if let Some(mpb::critique_event::Event::Result(r)) = ev.event {
                    return Ok(r);
                }
            }
            Err(Status::unavailable(
                "the majordomo ended the stream without a critique",
            ))
        };
        match tokio::time::timeout(ctx.call_timeout, call).await {
            Ok(Ok(r)) => return Ok(r),
            // Its queue is full: back off and ask again (bounded).
            Ok(Err(e)) if e.code() == Code::ResourceExhausted && busy_retries < 120 => {
                busy_retries += 1;
                drop(lease);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) if !replica_failed(&e) => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(replica = lease.replica.endpoint, error = %e, "majordomo failed; trying another replica");
                lease.replica.mark_down();
                tried.push(lease.replica.endpoint.clone());
            }
            Err(_) => {
                lease.replica.mark_down();
                tried.push(lease.replica.endpoint.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(user: &str, reply: &str) -> pb::Turn {
        pb::Turn {
            user: user.into(),
            reply: reply.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_window_keeps_recent_turns_and_the_summary() {
        let s = pb::Session {
            turns: vec![
                turn("one", &"a".repeat(50)),
                turn("two", "b"),
                turn("three", "c"),
            ],
            summary: "earlier".into(),
            ..Default::default()
        };
        let w = window(&s, "four", 20);
        let roles: Vec<&str> = w.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "user", "assistant", "user"]
        );
        assert_eq!(w[1].content, "two");
        assert_eq!(w.last().unwrap().content, "four");
        assert!(w[0].content.contains("earlier"));
        let fresh = window(&pb::Session::default(), "hi", 20);
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn advice_moves_the_knobs_within_bounds() {
        let k = Knobs {
            noise: 0.4,
            steps: 8,
        };
        let lower = mpb::Advice {
            noise: mpb::NoiseAdvice::Lower as i32,
            steps: mpb::StepsAdvice::More as i32,
        };
        let k2 = revise(k, &lower);
        assert_eq!((k2.noise, k2.steps), (0.2, 16));
        let raise = mpb::Advice {
            noise: mpb::NoiseAdvice::Raise as i32,
            steps: mpb::StepsAdvice::Fewer as i32,
        };
        let k3 = revise(
            Knobs {
                noise: 1.95,
                steps: 1,
            },
            &raise,
        );
        assert_eq!((k3.noise, k3.steps), (2.0, 1));
    }
}
