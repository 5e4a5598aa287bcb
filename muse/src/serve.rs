//! `muse serve`: configuration (file, then `MUSE_*` environment, then flags) and the server.

use crate::metrics::MuseMetrics;
use crate::service::{Limits, MuseService};
use mm_kit::config::{self, ConfigError, ModelServiceFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// The muse service's configuration. `Default` holds the defaults (documented in
/// `deploy/muse.example.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    pub listen: String,
    pub model: String,
    /// `cpu`, `cuda` or `cuda:<n>` (CUDA needs a `--features cuda` build).
    pub device: String,
    /// CPU threads for model kernels (default: all cores).
    pub threads: Option<usize>,
    pub max_sessions: usize,
    /// Positions one session may hold.
    pub max_context: usize,
    /// KV cache all sessions together may hold, in MiB.
    pub kv_memory_mb: usize,
    /// KV of recent prompts kept for later primes to start from, in MiB, beside
    /// `kv_memory_mb` (the replica's KV bound is their sum); 0: no prefix cache.
    pub prefix_cache_mb: usize,
    /// Commands running model work at once. Their single-position steps (latent steps,
    /// commit tokens) run as one batched forward, so this is also the largest step batch.
    pub compute_slots: usize,
    /// Address of Prometheus `GET /metrics`; none: no metrics listener.
    pub metrics: Option<String>,
    /// Seconds a session may go without a command before it is closed.
    pub idle_timeout_s: u64,
    /// When the muse is full, a new session closes the one idle longest, if idle this many
    /// seconds: idle streams cannot lock turns out for `idle_timeout_s`.
    pub evict_idle_s: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            model: "smollm2-135m".into(),
            device: "cpu".into(),
            threads: None,
            max_sessions: 16,
            max_context: 4096,
            kv_memory_mb: 2048,
            prefix_cache_mb: 256,
            compute_slots: 8,
            metrics: None,
            idle_timeout_s: 300,
            evict_idle_s: 15,
        }
    }
}

/// Values given on the command line; they win over the file and the environment.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    #[command(flatten)]
    pub service: ModelServiceFlags,
    #[arg(long)]
    pub max_sessions: Option<usize>,
    #[arg(long)]
    pub kv_memory_mb: Option<usize>,
    #[arg(long)]
    pub prefix_cache_mb: Option<usize>,
    #[arg(long)]
    pub compute_slots: Option<usize>,
    #[arg(long)]
    pub idle_timeout_s: Option<u64>,
    #[arg(long)]
    pub evict_idle_s: Option<u64>,
}

impl ServeConfig {
    /// Defaults, then the file, then `MUSE_*` (`env`: the process environment when `None`),
    /// then flags.
    pub fn load(
        flags: &ServeFlags,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let n = |v: Option<usize>| v.map(|x| x as u64);
        let mut sources = flags.service.sources("MUSE", env);
        sources.overrides = sources
            .overrides
            .set("max_sessions", n(flags.max_sessions))
            .set("kv_memory_mb", n(flags.kv_memory_mb))
            .set("prefix_cache_mb", n(flags.prefix_cache_mb))
            .set("compute_slots", n(flags.compute_slots))
            .set("idle_timeout_s", flags.idle_timeout_s)
            .set("evict_idle_s", flags.evict_idle_s);
        let cfg: Self = config::load(sources)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Message(m));
        config::check_listen(&self.listen, "127.0.0.1:50051")?;
        if let Some(m) = &self.metrics {
            config::check_address("metrics", m, "127.0.0.1:9101")?;
        }
        if self.max_sessions == 0 {
            return bad("max_sessions must be at least 1".into());
        }
        if self.max_context < 16 {
            return bad(format!(
                "max_context must be at least 16, got {}",
                self.max_context
            ));
        }
        if self.compute_slots == 0 {
            return bad("compute_slots must be at least 1".into());
        }
        if self.idle_timeout_s == 0 {
            return bad("idle_timeout_s must be at least 1".into());
        }
        if self.threads == Some(0) {
            return bad("threads must be at least 1".into());
        }
        Ok(())
    }
}

/// Loads the model and serves until ctrl-c. Prints `listening on <addr>` on stdout once ready.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let c = cfg.clone();
    let lm = tokio::task::spawn_blocking(move || {
        mm_kit::model::load(&c.model, &c.device, c.threads, Some(c.max_context))
    })
    .await??;
    let limits = Limits {
        max_sessions: cfg.max_sessions,
        kv_memory_bytes: cfg.kv_memory_mb << 20,
        prefix_cache_bytes: cfg.prefix_cache_mb << 20,
        compute_slots: cfg.compute_slots,
        idle_timeout: std::time::Duration::from_secs(cfg.idle_timeout_s),
        evict_idle: std::time::Duration::from_secs(cfg.evict_idle_s),
    };
    if cfg.compute_slots == 1 {
        tracing::warn!(
            "compute_slots = 1 runs one session's step at a time; set it to the batch you \
             want (default 8) so concurrent sessions' steps share one batched forward"
        );
    }
    let metrics = Arc::new(MuseMetrics::default());
    if let Some(listen) = &cfg.metrics {
        mm_kit::metrics::serve(listen, metrics.registry.clone()).await?;
    }
    let service = MuseService::new(Arc::new(lm), limits, metrics.clone());
    tracing::info!(listen = cfg.listen, model = cfg.model, "muse serving");
    mm_kit::serve::serve(
        &cfg.listen,
        "muse.v1.Muse",
        tonic::service::Routes::new(service.into_server()),
        metrics.grpc.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_loads_and_flags_win() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/muse.example.toml");
        let flags = ServeFlags {
            service: ModelServiceFlags {
                config: Some(example),
                ..Default::default()
            },
            max_sessions: Some(3),
            ..Default::default()
        };
        let c = ServeConfig::load(&flags, config::environment(&[])).unwrap();
        assert_eq!(
            (
                c.model.as_str(),
                c.max_sessions,
                c.kv_memory_mb,
                c.prefix_cache_mb,
                c.compute_slots
            ),
            ("smollm2-135m", 3, 2048, 256, 8)
        );
        let bad = ServeFlags {
            service: ModelServiceFlags {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(ServeConfig::load(&bad, config::environment(&[]))
            .unwrap_err()
            .to_string()
            .contains("listen"));
        let bad = ServeFlags {
            service: ModelServiceFlags {
                metrics: Some("nowhere".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = ServeConfig::load(&bad, config::environment(&[])).unwrap_err();
        assert!(e.to_string().contains("metrics = `nowhere`"), "{e}");
    }

    #[test]
    fn the_documented_environment_names_take_effect() {
        let env = config::environment(&[
            ("MUSE_LISTEN", "127.0.0.1:50191"),
            ("MUSE_MAX_SESSIONS", "3"),
            ("MUSE_COMPUTE_SLOTS", "2"),
        ]);
        let c = ServeConfig::load(&ServeFlags::default(), env).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.max_sessions, c.compute_slots),
            ("127.0.0.1:50191", 3, 2)
        );
    }
}
