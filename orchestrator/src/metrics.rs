//! What the orchestrator counts for Prometheus (`GET /metrics` on its HTTP port): turns and
//! how they ended, attempts and verdicts, the dream (latent steps, bursts by why they stopped),
//! failovers, replicas and the calls queued for them, sessions with a turn running, latencies
//! of turns, critiques and commits, committed tokens (over commit seconds: tokens per second),
//! and requests by gRPC code and HTTP status.

use crate::render;
use crate::replicas::Role;
use mm_kit::metrics::GrpcRequests;
use mm_proto::orchestrator::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// One label: `(name, value)`.
type Label = Vec<(&'static str, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

fn label(name: &'static str, value: &str) -> Label {
    vec![(name, value.to_string())]
}

/// A counter family with one label, registered as `name`.
fn family(r: &mut Registry, name: &str, help: &str) -> Family<Label, Counter> {
    let f = Family::default();
    r.register(name, help, f.clone());
    f
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn histogram(r: &mut Registry, name: &str, help: &str) -> Histogram {
    let h = mm_kit::metrics::seconds();
    r.register(name, help, h.clone());
    h
}

pub struct Metrics {
    pub registry: Arc<Registry>,
    pub grpc: GrpcRequests,
    turns: Family<Label, Counter>,
    attempts: Counter,
    verdicts: Family<Label, Counter>,
    latent_steps: Counter,
    bursts: Family<Label, Counter>,
    failovers: Counter,
    queued: Family<Label, Gauge>,
    replicas: Family<Label, Gauge>,
    /// Sessions with a turn running.
    pub active_sessions: Gauge,
    turn_seconds: Histogram,
    critique_seconds: Histogram,
    commit_seconds: Histogram,
    committed_tokens: Counter,
    http: Family<HttpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("mm");
        let grpc = GrpcRequests::register(&mut r);
        let turns = family(&mut r, "turns", "Turns by outcome (ok or error)");
        let attempts = counter(&mut r, "attempts", "Muse attempts (drafts) made");
        let verdicts = family(&mut r, "verdicts", "The majordomo's verdicts on attempts");
        let latent_steps = counter(&mut r, "latent_steps", "Latent (dream) steps run");
        let bursts = family(&mut r, "bursts", "Dream bursts by why they stopped");
        let failovers = counter(&mut r, "failovers", "Calls moved to another replica");
        let queued = Family::<Label, Gauge>::default();
        r.register(
            "queued_calls",
            "Calls waiting for a replica slot, by role",
            queued.clone(),
        );
        let replicas = Family::<Label, Gauge>::default();
        r.register(
            "replicas",
            "Replicas known (configured or resolved), by role",
            replicas.clone(),
        );
        let active_sessions = Gauge::default();
        r.register(
            "active_sessions",
            "Sessions with a turn running",
            active_sessions.clone(),
        );
        let turn_seconds = histogram(&mut r, "turn_seconds", "Latency of a whole turn");
        let critique_seconds = histogram(
            &mut r,
            "critique_seconds",
            "Latency of one attempt's critique",
        );
        let commit_seconds = histogram(
            &mut r,
            "commit_seconds",
            "Time one attempt spent committing text",
        );
        let committed_tokens = counter(
            &mut r,
            "committed_tokens",
            "Tokens the muse committed (rate over commit_seconds_sum: tokens per second)",
        );
        let http = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests by route and status",
            http.clone(),
        );
        Self {
            registry: Arc::new(r),
            grpc,
            turns,
            attempts,
            verdicts,
            latent_steps,
            bursts,
            failovers,
            queued,
            replicas,
            active_sessions,
            turn_seconds,
            critique_seconds,
            commit_seconds,
            committed_tokens,
            http,
        }
    }
}

impl Metrics {
    /// The gauge of calls waiting for a slot on `role`'s replicas (the pool keeps it).
    pub fn queue(&self, role: Role) -> Gauge {
        self.queued
            .get_or_create(&label("role", role.name()))
            .clone()
    }

    /// The gauge of `role`'s replicas (the pool keeps it as DNS answers change).
    pub fn replicas(&self, role: Role) -> Gauge {
        self.replicas
            .get_or_create(&label("role", role.name()))
            .clone()
    }

    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// A finished turn, persisted.
    pub fn turn(&self, turn: &pb::Turn, seconds: f64) {
        self.turns.get_or_create(&label("outcome", "ok")).inc();
        self.turn_seconds.observe(seconds);
        for a in &turn.attempts {
            self.attempts.inc();
            self.verdicts
                .get_or_create(&label("verdict", render::verdict(a.verdict())))
                .inc();
            self.critique_seconds.observe(a.critique_millis / 1e3);
            self.commit_seconds.observe(a.commit_millis / 1e3);
            self.committed_tokens.inc_by(a.reply_tokens as u64);
            for b in &a.bursts {
                self.latent_steps.inc_by(b.steps as u64);
                self.bursts
                    .get_or_create(&label("stop", &render::burst_stop(b.stop)))
                    .inc();
            }
        }
    }

    pub fn turn_failed(&self) {
        self.turns.get_or_create(&label("outcome", "error")).inc();
    }

    pub fn http(&self, route: &str, status: u16) {
        self.http
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_proto::muse::v1 as upb;

    #[test]
    fn a_turn_counts_its_attempts_verdicts_steps_and_bursts() {
        let m = Metrics::default();
        let burst = |steps| pb::Burst {
            steps,
            stop: upb::BurstStop::ColdStop as i32,
            ..Default::default()
        };
        let turn = pb::Turn {
            attempts: vec![
                pb::Attempt {
                    verdict: pb::Verdict::Revise as i32,
                    bursts: vec![burst(3), burst(4)],
                    reply_tokens: 10,
                    ..Default::default()
                },
                pb::Attempt {
                    verdict: pb::Verdict::Accept as i32,
                    reply_tokens: 5,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        m.turn(&turn, 1.5);
        m.turn_failed();
        let text = mm_kit::metrics::render(&m.registry);
        for line in [
            r#"mm_turns_total{outcome="ok"} 1"#,
            r#"mm_turns_total{outcome="error"} 1"#,
            "mm_attempts_total 2",
            r#"mm_verdicts_total{verdict="revise"} 1"#,
            r#"mm_verdicts_total{verdict="accept"} 1"#,
            "mm_latent_steps_total 7",
            r#"mm_bursts_total{stop="cold_stop"} 2"#,
            "mm_committed_tokens_total 15",
            "mm_turn_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
