//! `muse serve`: configuration (file, then `MUSE_*` environment, then flags) and the server.

use crate::service::{Limits, MuseService};
use lm::{LoadOptions, LoadedModel};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    /// Commands running model work at once.
    pub compute_slots: usize,
}

/// Values given on the command line; they win over the file and the environment.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeFlags {
    /// A TOML configuration file (see deploy/muse.example.toml).
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
    pub max_sessions: Option<usize>,
    #[arg(long)]
    pub max_context: Option<usize>,
    #[arg(long)]
    pub kv_memory_mb: Option<usize>,
    #[arg(long)]
    pub compute_slots: Option<usize>,
}

impl ServeConfig {
    pub fn load(flags: &ServeFlags) -> Result<Self, config::ConfigError> {
        let mut b = config::Config::builder()
            .set_default("listen", "127.0.0.1:50051")?
            .set_default("model", "smollm2-135m")?
            .set_default("device", "cpu")?
            .set_default("max_sessions", 16)?
            .set_default("max_context", 4096)?
            .set_default("kv_memory_mb", 2048)?
            .set_default("compute_slots", 1)?;
        if let Some(path) = &flags.config {
            b = b.add_source(config::File::from(path.as_path()).required(true));
        }
        b = b.add_source(config::Environment::with_prefix("MUSE").try_parsing(true));
        let n = |v: Option<usize>| v.map(|x| x as u64);
        let cfg = b
            .set_override_option("listen", flags.listen.clone())?
            .set_override_option("model", flags.model.clone())?
            .set_override_option("device", flags.device.clone())?
            .set_override_option("threads", n(flags.threads))?
            .set_override_option("max_sessions", n(flags.max_sessions))?
            .set_override_option("max_context", n(flags.max_context))?
            .set_override_option("kv_memory_mb", n(flags.kv_memory_mb))?
            .set_override_option("compute_slots", n(flags.compute_slots))?
            .build()?
            .try_deserialize::<Self>()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), config::ConfigError> {
        let bad = |m: String| Err(config::ConfigError::Message(m));
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "listen = `{}` is not an address like 127.0.0.1:50051",
                self.listen
            ));
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
        if self.threads == Some(0) {
            return bad("threads must be at least 1".into());
        }
        Ok(())
    }
}

/// Loads the model and serves until ctrl-c. Prints `listening on <addr>` on stdout once ready.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    if let Some(n) = cfg.threads {
        lm::threads::set_cpu_threads(n);
    }
    let device = lm::device::open(&cfg.device)
        .map_err(|e| anyhow::anyhow!("device = `{}`: {e}", cfg.device))?;
    let opts = LoadOptions {
        max_context: Some(cfg.max_context),
        device,
        ..Default::default()
    };
    let model = cfg.model.clone();
    let lm = tokio::task::spawn_blocking(move || LoadedModel::load(&model, &opts)).await??;
    let limits = Limits {
        max_sessions: cfg.max_sessions,
        kv_memory_bytes: cfg.kv_memory_mb << 20,
        compute_slots: cfg.compute_slots,
    };
    if lm.model.is_fused() && cfg.compute_slots == 1 {
        tracing::warn!(
            "compute_slots = 1 runs one session's step at a time; on a GPU set it to the batch \
             you want (e.g. 8) so concurrent sessions' steps share one batched forward"
        );
    }
    let service = MuseService::new(Arc::new(lm), limits);
    tracing::info!(listen = cfg.listen, model = cfg.model, "muse serving");
    mm_proto::server::serve(
        &cfg.listen,
        "muse.v1.Muse",
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
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/muse.example.toml");
        let flags = ServeFlags {
            config: Some(example),
            max_sessions: Some(3),
            ..Default::default()
        };
        let c = ServeConfig::load(&flags).unwrap();
        assert_eq!(
            (
                c.model.as_str(),
                c.max_sessions,
                c.kv_memory_mb,
                c.compute_slots
            ),
            ("smollm2-135m", 3, 2048, 1)
        );
        let bad = ServeFlags {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        assert!(ServeConfig::load(&bad)
            .unwrap_err()
            .to_string()
            .contains("listen"));
    }
}
