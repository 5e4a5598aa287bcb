//! What the muse is primed with: the session's summary, the latest turns that fit, and the
//! new message. Older turns are folded into a majordomo-made summary. A turn whose reply the
//! deterministic checks flagged is left out, so that one degenerate reply cannot prime the
//! rest of a conversation to repeat it.

use crate::failover::{deadline, with_failover};
use crate::turn::TurnContext;
use mm_proto::majordomo::v1 as mpb;
use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;

/// Whether a turn's chosen reply was flagged by the deterministic checks.
fn flagged(t: &pb::Turn) -> bool {
    t.attempts
        .get(t.chosen_attempt.saturating_sub(1) as usize)
        .is_some_and(|a| !a.flags.is_empty())
}

/// The chat the muse is primed with.
pub fn window(session: &pb::Session, user: &str, history_chars: usize) -> Vec<upb::ChatMessage> {
    let msg = |role: &str, content: &str| upb::ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let turns = &session.turns[first_in_window(session, history_chars)..];
    let mut out = Vec::new();
    // One system message: chat templates differ on several.
    let system = match (session.system.is_empty(), session.summary.is_empty()) {
        (true, true) => String::new(),
        (false, true) => session.system.clone(),
        (empty, false) => format!(
            "{}Summary of the conversation so far: {}",
            if empty {
                String::new()
            } else {
                format!("{}\n\n", session.system)
            },
            session.summary
        ),
    };
    if !system.is_empty() {
        out.push(msg("system", &system));
    }
    for t in turns.iter().filter(|t| !flagged(t)) {
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

/// Characters of old transcript the majordomo is given to fold.
const FOLD_CHARS: usize = 6000;

/// When turns have left the window since the last fold, asks the majordomo to fold them (and
/// the previous summary) into a new summary: `(summary, summarized_turns)`. A failure only
/// costs the summary (the older turns stay out of the prompt); the turn goes on.
pub async fn fold(
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
        if !flagged(t) {
            text.push_str(&format!("\nUser: {}\nAssistant: {}", t.user, t.reply));
        }
    }
    let skip = text.chars().count().saturating_sub(FOLD_CHARS);
    let text: String = text.chars().skip(skip).collect();
    if text.trim().is_empty() {
        return Some((session.summary.clone(), first));
    }
    let req = mpb::StructureRequest {
        draft: text.into_bytes(),
    };
    let folded = with_failover(ctx, ctx.majordomo, majordomo_model, None, |replica| {
        let mut client = mpb::majordomo_client::MajordomoClient::new(replica.channel.clone());
        let req = req.clone();
        async move { deadline(ctx.call_timeout, "a summary", client.structure(req)).await }
    })
    .await;
    match folded {
        Ok((r, _)) => {
            let r = r.into_inner();
            let summary = if r.summary.trim().is_empty() {
                r.title
            } else {
                format!("{} — {}", r.title, r.summary)
            };
            Some((summary, first))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not fold old turns into a summary");
            None
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
            chosen_attempt: 1,
            attempts: vec![pb::Attempt::default()],
            ..Default::default()
        }
    }

    #[test]
    fn the_window_keeps_recent_turns_and_the_summary_and_skips_flagged_replies() {
        let mut looping = turn("three", "c c c");
        looping.attempts[0].flags = vec![pb::Flag::Repetition as i32];
        let s = pb::Session {
            turns: vec![turn("one", &"a".repeat(50)), turn("two", "b"), looping],
            summary: "earlier".into(),
            ..Default::default()
        };
        let w = window(&s, "four", 20);
        let roles: Vec<&str> = w.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(w[1].content, "two");
        assert_eq!(w.last().unwrap().content, "four");
        assert!(w[0].content.contains("earlier"));
        let fresh = window(&pb::Session::default(), "hi", 20);
        assert_eq!(fresh.len(), 1);
        let instructed = pb::Session {
            system: "Answer in French.".into(),
            ..s
        };
        let w = window(&instructed, "four", 20);
        assert_eq!(w.iter().filter(|m| m.role == "system").count(), 1);
        assert!(w[0].content.starts_with("Answer in French.\n\nSummary"));
    }
}
