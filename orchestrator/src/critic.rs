//! The majordomo's view of a draft: its verdict, its scores and advice, the deterministic
//! checks' findings, and the draft's fluency under its model (mean per-token NLL).

use crate::failover::{deadline, with_failover};
use crate::turn::TurnContext;
use mm_proto::majordomo::v1 as mpb;
use mm_proto::orchestrator::v1 as pb;
use tonic::Status;

/// What the majordomo needs to critique a draft of this turn.
pub struct Critic<'a> {
    pub majordomo: &'a str,
    pub user: &'a str,
    /// The window the muse was primed with, the new message last.
    pub conversation: &'a [mpb::ChatMessage],
}

/// A critique, as the pipeline acts on it.
#[derive(Debug, Clone)]
pub struct Review {
    pub verdict: pb::Verdict,
    pub coherence: u32,
    pub novelty: u32,
    pub advice: mpb::Advice,
    /// What the deterministic checks found: a flagged draft never beats a clean one.
    pub flags: Vec<pb::Flag>,
    /// Mean per-token NLL of the draft under the majordomo's model; none for an empty draft.
    pub nll: Option<f32>,
    pub json: String,
}

impl Review {
    fn of(r: mpb::CritiqueResult) -> Self {
        let mut flags: Vec<pb::Flag> = r.findings().map(flag).collect();
        flags.sort_by_key(|f| *f as i32);
        flags.dedup();
        let c = r.critique.unwrap_or_default();
        let verdict = match c.verdict() {
            mpb::Verdict::Accept => pb::Verdict::Accept,
            mpb::Verdict::Reject => pb::Verdict::Reject,
            mpb::Verdict::Revise | mpb::Verdict::Unspecified => pb::Verdict::Revise,
        };
        Self {
            verdict,
            coherence: c.coherence,
            novelty: c.novelty,
            advice: c.advice.unwrap_or_default(),
            flags,
            nll: r.nll,
            json: r.json,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.flags.is_empty()
    }

    /// The critique as a turn event.
    pub fn event(&self, attempt: u32, segment: bool) -> pb::CritiqueEvent {
        pb::CritiqueEvent {
            attempt,
            json: self.json.clone(),
            segment,
            verdict: self.verdict as i32,
            nll: self.nll.unwrap_or(f32::NAN),
            flags: self.flags.iter().map(|f| *f as i32).collect(),
        }
    }

    /// How the attempt ranks: clean first, then fluency (the NLL in 0.05-nat steps, so that
    /// the critic's opinion breaks near-ties), then the verdict, then coherence and novelty.
    pub fn rank(&self) -> Rank {
        Rank {
            clean: self.is_clean(),
            fluency: self.nll.map_or(i64::MIN, |n| -(n / 0.05).round() as i64),
            verdict: match self.verdict {
                pb::Verdict::Accept => 2,
                pb::Verdict::Revise => 1,
                _ => 0,
            },
            quality: 2 * self.coherence + self.novelty,
        }
    }
}

/// An attempt's standing among the turn's attempts: the greatest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    clean: bool,
    fluency: i64,
    verdict: u8,
    quality: u32,
}

fn flag(kind: mpb::IssueKind) -> pb::Flag {
    match kind {
        mpb::IssueKind::Repetition => pb::Flag::Repetition,
        mpb::IssueKind::BrokenWords => pb::Flag::BrokenWords,
        mpb::IssueKind::LanguageSwitch => pb::Flag::ScriptSwitch,
        mpb::IssueKind::Empty => pb::Flag::Empty,
        _ => pb::Flag::Format,
    }
}

impl Critic<'_> {
    /// Critiques `draft` (made by `bursts`) on a majordomo replica, failing over.
    pub async fn review(
        &self,
        ctx: &TurnContext<'_>,
        draft: &str,
        bursts: &[pb::Burst],
    ) -> Result<Review, Status> {
        let telemetry = mpb::TelemetrySummary {
            bursts: bursts.len() as u32,
            latent_steps: bursts.iter().map(|b| b.steps).sum(),
            mean_entropy: mean(bursts.iter().map(|b| b.mean_entropy)),
            stop_reasons: bursts
                .iter()
                .map(|b| {
                    let name = b.stop().as_str_name();
                    name.trim_start_matches("BURST_STOP_").to_lowercase()
                })
                .collect(),
        };
        let req = mpb::CritiqueRequest {
            request: self.user.to_string(),
            conversation: self.conversation[..self.conversation.len().saturating_sub(1)].to_vec(),
            draft: draft.as_bytes().to_vec(),
            telemetry: Some(telemetry),
        };
        let (result, _) = with_failover(ctx, ctx.majordomo, self.majordomo, None, |replica| {
            let mut client = mpb::majordomo_client::MajordomoClient::new(replica.channel.clone());
            let req = req.clone();
            deadline(ctx.call_timeout, "a critique", async move {
                let mut stream = client.critique(req).await?.into_inner();
                while let Some(ev) = stream.message().await? {
                    if let Some(mpb::critique_event::Event::Result(r)) = ev.event {
                        return Ok(r);
                    }
                }
                Err(Status::unavailable(
                    "the majordomo ended the stream without a critique",
                ))
            })
        })
        .await?;
        Ok(Review::of(result))
    }
}

pub fn mean(xs: impl Iterator<Item = f32>) -> f32 {
    let v: Vec<f32> = xs.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(flags: Vec<pb::Flag>, nll: f32, verdict: pb::Verdict) -> Review {
        Review {
            verdict,
            coherence: 0,
            novelty: 0,
            advice: Default::default(),
            flags,
            nll: Some(nll),
            json: String::new(),
        }
    }

    #[test]
    fn a_flagged_draft_never_beats_a_clean_one_and_fluency_leads() {
        let clean_but_clumsy = review(vec![], 4.0, pb::Verdict::Reject);
        let fluent_loop = review(vec![pb::Flag::Repetition], 0.5, pb::Verdict::Accept);
        assert!(clean_but_clumsy.rank() > fluent_loop.rank());
        let fluent = review(vec![], 2.0, pb::Verdict::Revise);
        assert!(fluent.rank() > clean_but_clumsy.rank());
        // Within 0.05 nats, the verdict decides.
        let accepted = review(vec![], 2.01, pb::Verdict::Accept);
        assert!(accepted.rank() > fluent.rank());
    }
}
