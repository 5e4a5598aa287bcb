//! `majordomo serve`: configuration (file, then `MAJORDOMO_*` environment, then flags) and the
//! server.

use crate::review::Majordomo;
use crate::service::MajordomoService;
use mm_kit::config::{self, ConfigError, ModelServiceFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// The majordomo service's configuration. `Default` holds the defaults (documented in
/// `deploy/majordomo.example.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    pub listen: String,
    pub model: String,
    /// `cpu`, `cuda` or `cuda:<n>` (CUDA needs a `--features cuda` build).
    pub device: String,
    pub threads: Option<usize>,
    pub max_context: usize,
    /// Requests decoding at once.
    pub workers: usize,
    /// Requests that may wait; more are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50052".into(),
            model: "smollm2-135m".into(),
            device: "cpu".into(),
            threads: None,
            max_context: 4096,
            workers: 1,
            queue_capacity: 8,
        }
    }
}

#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    #[command(flatten)]
    pub service: ModelServiceFlags,
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long)]
    pub queue_capacity: Option<usize>,
}

impl ServeConfig {
    /// Defaults, then the file, then `MAJORDOMO_*` (`env`: the process environment when
    /// `None`), then flags.
    pub fn load(
        flags: &ServeFlags,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut sources = flags.service.sources("MAJORDOMO", env);
        sources.overrides = sources
            .overrides
            .set("workers", flags.workers.map(|x| x as u64))
            .set("queue_capacity", flags.queue_capacity.map(|x| x as u64));
        let cfg: Self = config::load(sources)?;
        config::check_listen(&cfg.listen, "127.0.0.1:50052")?;
        if cfg.workers == 0 || cfg.max_context < 512 || cfg.threads == Some(0) {
            return Err(ConfigError::Message(
                "workers and threads must be >= 1, max_context >= 512".into(),
            ));
        }
        Ok(cfg)
    }
}

/// Loads the model, builds the grammar engine and serves until ctrl-c. Prints
/// `listening on <addr>` on stdout once ready.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let c = cfg.clone();
    let md = tokio::task::spawn_blocking(move || -> anyhow::Result<Majordomo> {
        let lm = mm_kit::model::load(&c.model, &c.device, c.threads, Some(c.max_context))?;
        Ok(Majordomo::new(Arc::new(lm))?)
    })
    .await??;
    let service = MajordomoService::new(Arc::new(md), cfg.workers, cfg.queue_capacity);
    tracing::info!(listen = cfg.listen, model = cfg.model, "majordomo serving");
    mm_kit::serve::serve(
        &cfg.listen,
        "majordomo.v1.Majordomo",
        tonic::service::Routes::new(service.into_server()),
        mm_kit::metrics::GrpcRequests::register(&mut Default::default()),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_loads_and_flags_win() {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/majordomo.example.toml");
        let flags = ServeFlags {
            service: ModelServiceFlags {
                config: Some(example),
                ..Default::default()
            },
            workers: Some(2),
            ..Default::default()
        };
        let c = ServeConfig::load(&flags, config::environment(&[])).unwrap();
        assert_eq!(
            (c.workers, c.queue_capacity, c.listen.as_str()),
            (2, 8, "127.0.0.1:50052")
        );
        let env = config::environment(&[
            ("MAJORDOMO_WORKERS", "3"),
            ("MAJORDOMO_MODEL", "gemma3-270m"),
        ]);
        let c = ServeConfig::load(&ServeFlags::default(), env).unwrap();
        assert_eq!((c.workers, c.model.as_str()), (3, "gemma3-270m"));
    }
}
