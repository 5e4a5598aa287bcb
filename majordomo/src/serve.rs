//! `majordomo serve`: configuration (file, then `MAJORDOMO_*` environment, then flags) and the
//! server.

use crate::review::Majordomo;
use crate::service::MajordomoService;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    /// A TOML configuration file (see deploy/majordomo.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// `cpu`, `cuda` or `cuda:<n>`.
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub max_context: Option<usize>,
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long)]
    pub queue_capacity: Option<usize>,
}

impl ServeConfig {
    pub fn load(flags: &ServeFlags) -> Result<Self, config::ConfigError> {
        let mut b = config::Config::builder()
            .set_default("listen", "127.0.0.1:50052")?
            .set_default("model", "smollm2-135m")?
            .set_default("device", "cpu")?
            .set_default("max_context", 4096)?
            .set_default("workers", 1)?
            .set_default("queue_capacity", 8)?;
        if let Some(path) = &flags.config {
            b = b.add_source(config::File::from(path.as_path()).required(true));
        }
        let n = |v: Option<usize>| v.map(|x| x as u64);
        let cfg: Self = b
            .add_source(config::Environment::with_prefix("MAJORDOMO").try_parsing(true))
            .set_override_option("listen", flags.listen.clone())?
            .set_override_option("model", flags.model.clone())?
            .set_override_option("device", flags.device.clone())?
            .set_override_option("threads", n(flags.threads))?
            .set_override_option("max_context", n(flags.max_context))?
            .set_override_option("workers", n(flags.workers))?
            .set_override_option("queue_capacity", n(flags.queue_capacity))?
            .build()?
            .try_deserialize()?;
        if cfg.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(config::ConfigError::Message(format!(
                "listen = `{}` is not an address like 127.0.0.1:50052",
                cfg.listen
            )));
        }
        if cfg.workers == 0 || cfg.max_context < 512 || cfg.threads == Some(0) {
            return Err(config::ConfigError::Message(
                "workers and threads must be >= 1, max_context >= 512".into(),
            ));
        }
        Ok(cfg)
    }
}

/// Loads the model, builds the grammar engine and serves until ctrl-c. Prints
/// `listening on <addr>` on stdout once ready.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    if let Some(n) = cfg.threads {
        lm::threads::set_cpu_threads(n);
    }
    let device = lm::device::open(&cfg.device)
        .map_err(|e| anyhow::anyhow!("device = `{}`: {e}", cfg.device))?;
    let opts = lm::LoadOptions {
        max_context: Some(cfg.max_context),
        device,
        ..Default::default()
    };
    let model = cfg.model.clone();
    let md = tokio::task::spawn_blocking(move || -> anyhow::Result<Majordomo> {
        Ok(Majordomo::new(Arc::new(lm::LoadedModel::load(
            &model, &opts,
        )?))?)
    })
    .await??;
    let service = MajordomoService::new(Arc::new(md), cfg.workers, cfg.queue_capacity);
    tracing::info!(listen = cfg.listen, model = cfg.model, "majordomo serving");
    mm_proto::server::serve(
        &cfg.listen,
        "majordomo.v1.Majordomo",
        tonic::service::Routes::new(service.into_server()),
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
            config: Some(example),
            workers: Some(2),
            ..Default::default()
        };
        let c = ServeConfig::load(&flags).unwrap();
        assert_eq!(
            (c.workers, c.queue_capacity, c.listen.as_str()),
            (2, 8, "127.0.0.1:50052")
        );
    }
}
