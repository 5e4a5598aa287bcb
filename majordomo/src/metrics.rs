//! What a majordomo replica counts for Prometheus (`majordomo serve --metrics ADDR`): its
//! critiques by verdict and their latency, its summaries, the requests waiting for a worker,
//! and its gRPC requests by code.

use crate::critique::Verdict;
use mm_kit::metrics::GrpcRequests;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Label = Vec<(&'static str, &'static str)>;

pub struct MajordomoMetrics {
    pub registry: Arc<Registry>,
    pub grpc: GrpcRequests,
    critiques: Family<Label, Counter>,
    critique_seconds: Histogram,
    structures: Counter,
    /// Requests admitted and waiting for a worker.
    pub queued: Gauge,
}

impl Default for MajordomoMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("majordomo");
        let grpc = GrpcRequests::register(&mut r);
        let critiques = Family::<Label, Counter>::default();
        r.register("critiques", "Critiques by verdict", critiques.clone());
        let critique_seconds = mm_kit::metrics::seconds();
        r.register(
            "critique_seconds",
            "Latency of one critique (checks, model critique and fluency)",
            critique_seconds.clone(),
        );
        let structures = Counter::default();
        r.register("structures", "Summaries made", structures.clone());
        let queued = Gauge::default();
        r.register(
            "queued_requests",
            "Requests admitted and waiting for a worker",
            queued.clone(),
        );
        Self {
            registry: Arc::new(r),
            grpc,
            critiques,
            critique_seconds,
            structures,
            queued,
        }
    }
}

impl MajordomoMetrics {
    pub fn critique(&self, verdict: Verdict, seconds: f64) {
        let v = match verdict {
            Verdict::Accept => "accept",
            Verdict::Revise => "revise",
            Verdict::Reject => "reject",
        };
        self.critiques.get_or_create(&vec![("verdict", v)]).inc();
        self.critique_seconds.observe(seconds);
    }

    pub fn structure(&self) {
        self.structures.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critiques_are_counted_by_verdict() {
        let m = MajordomoMetrics::default();
        m.critique(Verdict::Revise, 0.4);
        m.critique(Verdict::Revise, 0.6);
        m.structure();
        let text = mm_kit::metrics::render(&m.registry);
        for line in [
            r#"majordomo_critiques_total{verdict="revise"} 2"#,
            "majordomo_critique_seconds_count 2",
            "majordomo_structures_total 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
