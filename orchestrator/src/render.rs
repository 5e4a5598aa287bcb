//! How turn events look to people (compact, on stderr) and to programs (JSON lines).

use mm_proto::orchestrator::v1 as pb;
use pb::turn_event::Event as E;
use serde_json::json;

const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A bar for an entropy in nats (0 … ~5).
fn spark(entropy: f32) -> char {
    SPARKS[((entropy / 5.0 * 7.0).round().clamp(0.0, 7.0)) as usize]
}

pub fn compact(e: &E) -> String {
    match e {
        E::Started(s) => format!(
            "· turn {} on {} (seed {})\n",
            s.turn + 1,
            s.muse_replica,
            s.seed
        ),
        E::LatentStep(l) => {
            let top: Vec<String> = l
                .top
                .iter()
                .take(2)
                .map(|t| format!("{:?} {:.2}", t.text, t.p))
                .collect();
            format!(
                "  {} step {:>2} H={:.2} {}\n",
                spark(l.entropy),
                l.step + 1,
                l.entropy,
                top.join(" ")
            )
        }
        E::Commit(c) if c.rendered.is_empty() => {
            format!("  draft: {}\n", c.text.replace('\n', " "))
        }
        E::Commit(c) => format!(
            "  draft: [{}]{}\n",
            c.rendered.replace('\n', " "),
            c.text
                .strip_prefix(c.rendered.as_str())
                .unwrap_or(&c.text)
                .replace('\n', " ")
        ),
        E::Critique(c) => format!(
            "  majordomo: {}, {}{}\n",
            verdict(c.verdict()),
            if c.nll.is_finite() {
                format!("fluency {:.2} nats/token", c.nll)
            } else {
                "no fluency score (a remote critic)".into()
            },
            flags(&c.flags)
        ),
        E::Revision(r) if r.plain => format!("  revising: {}\n", r.reason),
        E::Revision(r) => format!(
            "  revising: noise {:.2}, {} steps ({})\n",
            r.noise, r.steps, r.reason
        ),
        E::Failover(f) => format!(
            "  failover: {} → {} ({})\n",
            f.from_replica, f.to_replica, f.reason
        ),
        E::BurstEnded(b) => {
            let s = b.summary.clone().unwrap_or_default();
            format!(
                "  burst {}: {} steps, {}\n",
                b.burst + 1,
                s.steps,
                burst_stop(s.stop)
            )
        }
        E::Reply(_) | E::Error(_) => String::new(),
    }
}

pub fn event_json(e: &E) -> serde_json::Value {
    match e {
        E::Started(s) => {
            json!({"type": "started", "turn": s.turn, "seed": s.seed, "muse_replica": s.muse_replica, "muse_model": s.roles.as_ref().map(|r| r.muse.clone())})
        }
        E::LatentStep(l) => {
            json!({"type": "latent_step", "attempt": l.attempt, "burst": l.burst, "step": l.step, "entropy": l.entropy, "norm": l.norm,
            "top": l.top.iter().map(|t| json!({"text": t.text, "p": t.p})).collect::<Vec<_>>(),
            "nearest": l.nearest.as_ref().map(|n| json!({"text": n.text, "cosine": n.cosine})),
            "kl_prev": l.kl_prev})
        }
        E::Commit(c) => {
            json!({"type": "commit", "attempt": c.attempt, "text": c.text, "rendered": c.rendered})
        }
        E::Critique(c) => {
            json!({"type": "critique", "attempt": c.attempt, "verdict": verdict(c.verdict()),
            "nll": c.nll, "flags": c.flags().map(flag_name).collect::<Vec<_>>(), "segment": c.segment,
            "critique": serde_json::from_str::<serde_json::Value>(&c.json).unwrap_or(serde_json::Value::Null)})
        }
        E::Revision(r) => {
            json!({"type": "revision", "next_attempt": r.next_attempt, "noise": r.noise, "steps": r.steps, "plain": r.plain, "reason": r.reason})
        }
        E::Reply(r) => {
            json!({"type": "reply", "turn": r.turn, "attempt": r.attempt, "text": r.text})
        }
        E::Failover(f) => {
            json!({"type": "failover", "from": f.from_replica, "to": f.to_replica, "reason": f.reason})
        }
        E::Error(err) => json!({"type": "error", "code": err.code, "message": err.message}),
        E::BurstEnded(b) => {
            let s = b.summary.clone().unwrap_or_default();
            json!({"type": "burst", "attempt": b.attempt, "burst": b.burst, "steps": s.steps,
            "stop": burst_stop(s.stop), "mean_entropy": s.mean_entropy, "millis": s.millis})
        }
    }
}

/// A verdict as a word.
pub fn verdict(v: pb::Verdict) -> &'static str {
    match v {
        pb::Verdict::Accept => "accept",
        pb::Verdict::Revise => "revise",
        pb::Verdict::Reject => "reject",
        pb::Verdict::Unspecified => "none",
    }
}

fn flag_name(f: pb::Flag) -> &'static str {
    match f {
        pb::Flag::Repetition => "repetition",
        pb::Flag::BrokenWords => "broken_words",
        pb::Flag::ScriptSwitch => "script_switch",
        pb::Flag::Format => "format",
        pb::Flag::Empty => "empty",
        pb::Flag::Unspecified => "unspecified",
    }
}

/// ", flagged: a, b" for a flagged draft; nothing for a clean one.
fn flags(raw: &[i32]) -> String {
    if raw.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = raw
        .iter()
        .map(|&f| flag_name(pb::Flag::try_from(f).unwrap_or(pb::Flag::Unspecified)))
        .collect();
    format!(", flagged: {}", names.join(", "))
}

/// A stored session as the web view draws it: the transcript with every attempt, its bursts,
/// draft, critique and timings (latent steps themselves are not stored: only live turns
/// show them one by one).
pub fn session_json(s: &pb::Session) -> serde_json::Value {
    let roles = s.roles.clone().unwrap_or_default();
    let turns: Vec<serde_json::Value> = s
        .turns
        .iter()
        .map(|t| {
            let attempts: Vec<serde_json::Value> = t
                .attempts
                .iter()
                .map(|a| {
                    let bursts: Vec<serde_json::Value> = a
                        .bursts
                        .iter()
                        .map(|b| {
                            json!({"steps": b.steps, "stop": burst_stop(b.stop), "mean_entropy": b.mean_entropy,
                            "accepted": b.accepted, "rendered": b.rendered, "millis": b.millis})
                        })
                        .collect();
                    json!({"number": a.number, "draft": a.draft, "verdict": verdict(a.verdict()),
                    "nll": if a.nll.is_finite() { json!(a.nll) } else { json!(null) },
                    "flags": a.flags().map(flag_name).collect::<Vec<_>>(),
                    "critique": serde_json::from_str::<serde_json::Value>(&a.critique_json).unwrap_or(serde_json::Value::Null),
                    "noise": a.noise, "steps": a.steps, "plain": a.plain, "bursts": bursts,
                    "prompt_tokens": a.prompt_tokens, "prompt_cached_tokens": a.prompt_cached_tokens, "reply_tokens": a.reply_tokens,
                    "millis": {"prime": a.prime_millis, "commit": a.commit_millis, "critique": a.critique_millis, "queue": a.queue_millis}})
                })
                .collect();
            json!({"index": t.index, "user": t.user, "reply": t.reply, "chosen_attempt": t.chosen_attempt,
            "seed": t.seed, "created_unix_ms": t.created_unix_ms, "attempts": attempts,
            "roles": t.roles.as_ref().map(|r| json!({"muse": r.muse, "majordomo": r.majordomo}))})
        })
        .collect();
    json!({"id": s.id, "roles": {"muse": roles.muse, "majordomo": roles.majordomo},
    "created_unix_ms": s.created_unix_ms, "system": s.system, "summary": s.summary,
    "turn_count": s.turn_count.max(s.turns.len() as u32), "turns": turns})
}

/// A burst's stop reason as a word.
pub fn burst_stop(raw: i32) -> String {
    mm_proto::muse::v1::BurstStop::try_from(raw)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("BURST_STOP_")
        .to_lowercase()
}
