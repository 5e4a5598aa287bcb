//! What a muse replica counts for Prometheus (`muse serve --metrics ADDR`): its dreaming
//! (latent steps, bursts by why they stopped), its committed tokens and their time (their
//! ratio is tokens per second), prompt tokens and how many the prefix cache saved, open
//! sessions, and its gRPC requests.

use crate::telemetry::{BurstSummary, CommitSummary, PrimeSummary};
use lm::PrefixCache;
use mm_kit::metrics::GrpcRequests;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StopLabel {
    stop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

pub struct MuseMetrics {
    pub registry: Arc<Registry>,
    pub grpc: GrpcRequests,
    latent_steps: Counter,
    bursts: Family<StopLabel, Counter>,
    committed_tokens: Counter,
    commit_seconds: Histogram,
    prompt_tokens: Counter,
    prefix_lookups: Family<ResultLabel, Counter>,
    cached_tokens: Counter,
    prefix_cache_bytes: Gauge,
    pub sessions: Gauge,
    /// Commits stopped because their client went away.
    pub commits_cancelled: Counter,
    /// Idle sessions closed to admit new ones when the muse was full.
    pub sessions_evicted: Counter,
}

impl Default for MuseMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("muse");
        let grpc = GrpcRequests::register(&mut r);
        let latent_steps = Counter::default();
        r.register(
            "latent_steps",
            "Latent (dream) steps run",
            latent_steps.clone(),
        );
        let bursts = Family::<StopLabel, Counter>::default();
        r.register("bursts", "Dream bursts by why they stopped", bursts.clone());
        let committed_tokens = Counter::default();
        r.register(
            "committed_tokens",
            "Tokens committed to text (rate over commit_seconds_sum: tokens per second)",
            committed_tokens.clone(),
        );
        let commit_seconds = mm_kit::metrics::seconds();
        r.register(
            "commit_seconds",
            "Latency of one commit",
            commit_seconds.clone(),
        );
        let prompt_tokens = Counter::default();
        r.register(
            "prompt_tokens",
            "Prompt tokens primed",
            prompt_tokens.clone(),
        );
        let prefix_lookups = Family::<ResultLabel, Counter>::default();
        r.register(
            "prefix_lookups",
            "Primes by whether the prefix cache held a prefix of their prompt (hit) or not (miss)",
            prefix_lookups.clone(),
        );
        let cached_tokens = Counter::default();
        r.register(
            "cached_tokens",
            "Prompt tokens taken from the prefix cache instead of evaluated",
            cached_tokens.clone(),
        );
        let prefix_cache_bytes = Gauge::default();
        r.register(
            "prefix_cache_bytes",
            "Bytes of KV the prefix cache holds (bounded by prefix_cache_mb)",
            prefix_cache_bytes.clone(),
        );
        let sessions = Gauge::default();
        r.register("sessions", "Dreaming sessions open", sessions.clone());
        let commits_cancelled = Counter::default();
        r.register(
            "commits_cancelled",
            "Commits stopped within a token because their client went away",
            commits_cancelled.clone(),
        );
        let sessions_evicted = Counter::default();
        r.register(
            "sessions_evicted",
            "Idle sessions closed to admit new ones when every slot was taken",
            sessions_evicted.clone(),
        );
        Self {
            registry: Arc::new(r),
            grpc,
            latent_steps,
            bursts,
            committed_tokens,
            commit_seconds,
            prompt_tokens,
            prefix_lookups,
            cached_tokens,
            prefix_cache_bytes,
            sessions,
            commits_cancelled,
            sessions_evicted,
        }
    }
}

impl MuseMetrics {
    /// A prime, and the prefix cache it drew from (counted while it is enabled).
    pub fn primed(&self, p: &PrimeSummary, prefixes: &PrefixCache) {
        self.prompt_tokens.inc_by(p.prompt_tokens as u64);
        if !prefixes.is_enabled() {
            return;
        }
        let result = if p.cached_tokens > 0 { "hit" } else { "miss" };
        self.prefix_lookups
            .get_or_create(&ResultLabel { result })
            .inc();
        self.cached_tokens.inc_by(p.cached_tokens as u64);
        self.prefix_cache_bytes.set(prefixes.bytes() as i64);
    }

    pub fn burst(&self, b: &BurstSummary) {
        self.latent_steps.inc_by(b.steps as u64);
        self.bursts
            .get_or_create(&StopLabel {
                stop: b.stop.as_str().into(),
            })
            .inc();
    }

    pub fn commit(&self, c: &CommitSummary) {
        self.committed_tokens.inc_by(c.tokens.len() as u64);
        self.commit_seconds.observe(c.millis / 1e3);
    }
}
