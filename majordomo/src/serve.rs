//! `majordomo serve`: configuration (file, then `MAJORDOMO_*` environment, then flags) and the
//! server.

use crate::backend::Backend;
use crate::metrics::MajordomoMetrics;
use crate::remote::{ApiKey, RemoteConfig, RemoteMajordomo};
use crate::review::Majordomo;
use crate::service::MajordomoService;
use anyhow::Context;
use mm_kit::config::{self, ConfigError, ModelServiceFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Which critic answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `model`, loaded and run by this process.
    #[default]
    Local,
    /// A remote OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, …).
    Openai,
}

impl BackendKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Openai => "openai",
        }
    }
}

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
    /// Requests decoding at once; their decoding steps run as one batched forward.
    pub workers: usize,
    /// Requests that may wait; more are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    pub backend: BackendKind,
    /// openai: the server's OpenAI API root, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: Option<String>,
    /// openai: the model name the server serves (Info reports it as the majordomo's model).
    pub remote_model: Option<String>,
    /// openai: the bearer token, from `MAJORDOMO_API_KEY`, else `OPENAI_API_KEY`; none for a
    /// local server. Read from the environment so that it stays out of files and `ps`.
    pub api_key: Option<ApiKey>,
    /// openai: the limit for one HTTP request, in seconds; two tries (an invalid answer is
    /// asked again once) fit in the orchestrator's default 120 s call timeout.
    pub remote_timeout_s: u64,
    /// openai: the answer's token budget (`max_tokens`); the schema's bounds keep a critique
    /// far below it.
    pub remote_max_tokens: u32,
    /// Address of Prometheus `GET /metrics`; none: no metrics listener.
    pub metrics: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50052".into(),
            model: "smollm2-135m".into(),
            device: "cpu".into(),
            threads: None,
            max_context: 4096,
            workers: 8,
            queue_capacity: 8,
            backend: BackendKind::Local,
            base_url: None,
            remote_model: None,
            api_key: None,
            remote_timeout_s: 50,
            remote_max_tokens: 1024,
            metrics: None,
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
    /// Which critic answers: `local` (--model, run here) or `openai` (an OpenAI-compatible
    /// server: --base-url, --remote-model; the key from MAJORDOMO_API_KEY or OPENAI_API_KEY).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// The server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 (--backend openai).
    #[arg(long)]
    pub base_url: Option<String>,
    /// The model name the server serves (--backend openai).
    #[arg(long)]
    pub remote_model: Option<String>,
}

impl ServeConfig {
    /// Defaults, then the file, then `MAJORDOMO_*` (`env`: the process environment when
    /// `None`), then flags.
    pub fn load(
        flags: &ServeFlags,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let openai_key = match &env {
            Some(vars) => vars.get("OPENAI_API_KEY").cloned(),
            None => std::env::var("OPENAI_API_KEY").ok(),
        };
        let mut sources = flags.service.sources("MAJORDOMO", env);
        sources.overrides = sources
            .overrides
            .set("workers", flags.workers.map(|x| x as u64))
            .set("queue_capacity", flags.queue_capacity.map(|x| x as u64))
            .set("backend", flags.backend.map(BackendKind::as_str))
            .set("base_url", flags.base_url.clone())
            .set("remote_model", flags.remote_model.clone());
        let mut cfg: Self = config::load(sources)?;
        let given = |k: &ApiKey| !k.0.trim().is_empty();
        cfg.api_key = cfg
            .api_key
            .take()
            .filter(given)
            .or(openai_key.map(ApiKey).filter(given));
        config::check_listen(&cfg.listen, "127.0.0.1:50052")?;
        if let Some(m) = &cfg.metrics {
            config::check_address("metrics", m, "127.0.0.1:9102")?;
        }
        if cfg.workers == 0 || cfg.max_context < 512 || cfg.threads == Some(0) {
            return Err(ConfigError::Message(
                "workers and threads must be >= 1, max_context >= 512".into(),
            ));
        }
        cfg.remote()?;
        Ok(cfg)
    }

    /// The remote critic's settings when `backend = "openai"`, else none. A missing or bad
    /// setting is an error naming its flag.
    pub fn remote(&self) -> Result<Option<RemoteConfig>, ConfigError> {
        if self.backend == BackendKind::Local {
            return Ok(None);
        }
        let need = |value: &Option<String>, key: &str, what: &str| {
            value
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .ok_or_else(|| {
                    ConfigError::Message(format!(
                        "backend = \"openai\" needs {key} (--{} or MAJORDOMO_{}): {what}",
                        key.replace('_', "-"),
                        key.to_uppercase()
                    ))
                })
        };
        let base_url = need(
            &self.base_url,
            "base_url",
            "the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1",
        )?;
        let model = need(
            &self.remote_model,
            "remote_model",
            "the model name the server serves (GET <base_url>/models lists them)",
        )?;
        if !reqwest::Url::parse(&base_url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
            return Err(ConfigError::Message(format!(
                "base_url = `{base_url}` is not an http(s) URL like http://127.0.0.1:8000/v1"
            )));
        }
        if self.remote_timeout_s == 0 || self.remote_max_tokens == 0 {
            return Err(ConfigError::Message(
                "remote_timeout_s and remote_max_tokens must be >= 1".into(),
            ));
        }
        Ok(Some(RemoteConfig {
            base_url,
            model,
            api_key: self.api_key.clone(),
            timeout: Duration::from_secs(self.remote_timeout_s),
            max_tokens: self.remote_max_tokens,
        }))
    }
}

/// Loads the model and builds the grammar engine (or, with a remote backend, checks that its
/// server answers) and serves until ctrl-c. Prints `listening on <addr>` on stdout once ready.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let backend = match cfg.remote()? {
        Some(remote) => {
            let r = RemoteMajordomo::new(remote).context("building the HTTP client")?;
            // A server that is still starting is no reason to refuse: Info reports UNAVAILABLE
            // (the orchestrator's health check) until it answers.
            if let Err(e) = r.probe().await {
                tracing::warn!("{e}; serving anyway");
            }
            Backend::Remote(r)
        }
        None => {
            let c = cfg.clone();
            let md = tokio::task::spawn_blocking(move || -> anyhow::Result<Majordomo> {
                let lm = mm_kit::model::load(&c.model, &c.device, c.threads, Some(c.max_context))?;
                Ok(Majordomo::new(Arc::new(lm))?)
            })
            .await??;
            Backend::Local(Arc::new(md))
        }
    };
    let model = match &backend {
        Backend::Local(md) => md.model().name.clone(),
        Backend::Remote(r) => r.model().to_string(),
    };
    let metrics = Arc::new(MajordomoMetrics::default());
    if let Some(listen) = &cfg.metrics {
        mm_kit::metrics::serve(listen, metrics.registry.clone()).await?;
    }
    let service = MajordomoService::new(
        Arc::new(backend),
        cfg.workers,
        cfg.queue_capacity,
        metrics.clone(),
    );
    tracing::info!(
        listen = cfg.listen,
        backend = cfg.backend.as_str(),
        model,
        "majordomo serving"
    );
    mm_kit::serve::serve(
        &cfg.listen,
        "majordomo.v1.Majordomo",
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
        assert_eq!((c.backend, c.remote().unwrap()), (BackendKind::Local, None));
    }

    #[test]
    fn the_openai_backend_needs_its_server_and_model_and_reads_its_key_from_the_environment() {
        let openai = |base_url: Option<&str>, remote_model: Option<&str>| ServeFlags {
            backend: Some(BackendKind::Openai),
            base_url: base_url.map(String::from),
            remote_model: remote_model.map(String::from),
            ..Default::default()
        };
        let e = ServeConfig::load(&openai(None, Some("m")), config::environment(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs base_url") && e.contains("--base-url"),
            "{e}"
        );
        let e = ServeConfig::load(
            &openai(Some("http://h:1/v1"), None),
            config::environment(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("needs remote_model") && e.contains("--remote-model"),
            "{e}"
        );
        let e = ServeConfig::load(&openai(Some("h:1/v1"), Some("m")), config::environment(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an http(s) URL"), "{e}");

        let flags = openai(Some("http://gpu:8000/v1"), Some("qwen"));
        let c = ServeConfig::load(&flags, config::environment(&[])).unwrap();
        let r = c.remote().unwrap().unwrap();
        assert_eq!(
            (r.base_url.as_str(), r.model.as_str(), r.api_key),
            ("http://gpu:8000/v1", "qwen", None)
        );
        assert_eq!((r.timeout, r.max_tokens), (Duration::from_secs(50), 1024));
        let key = |env: &[(&str, &str)]| {
            let c = ServeConfig::load(&flags, config::environment(env)).unwrap();
            c.remote().unwrap().unwrap().api_key.map(|k| k.0)
        };
        assert_eq!(key(&[("OPENAI_API_KEY", "sk-o")]).as_deref(), Some("sk-o"));
        assert_eq!(
            key(&[("OPENAI_API_KEY", "sk-o"), ("MAJORDOMO_API_KEY", "sk-m")]).as_deref(),
            Some("sk-m")
        );
        assert_eq!(key(&[("MAJORDOMO_API_KEY", "")]), None);
        assert_eq!(
            key(&[("MAJORDOMO_API_KEY", " "), ("OPENAI_API_KEY", "sk-o")]).as_deref(),
            Some("sk-o")
        );
        let env = config::environment(&[("MAJORDOMO_API_KEY", "sk-secret")]);
        let secret = ServeConfig::load(&flags, env).unwrap();
        assert!(!format!("{secret:?}").contains("sk-secret"), "{secret:?}");

        // The same from the environment alone; flags win over it.
        let env = config::environment(&[
            ("MAJORDOMO_BACKEND", "openai"),
            ("MAJORDOMO_BASE_URL", "http://a:1/v1"),
            ("MAJORDOMO_REMOTE_MODEL", "env-model"),
            ("MAJORDOMO_REMOTE_MAX_TOKENS", "300"),
        ]);
        let c = ServeConfig::load(&ServeFlags::default(), env.clone()).unwrap();
        assert_eq!((c.backend, c.remote_max_tokens), (BackendKind::Openai, 300));
        let flags = ServeFlags {
            remote_model: Some("flag-model".into()),
            ..Default::default()
        };
        let c = ServeConfig::load(&flags, env).unwrap();
        assert_eq!(c.remote().unwrap().unwrap().model, "flag-model");
    }
}
