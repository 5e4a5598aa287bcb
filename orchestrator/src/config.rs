//! Orchestrator configuration: file (TOML), then `MM_*` environment, then flags.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Address of the orchestrator's own API; port 0 picks a free port.
    pub listen: String,
    /// The session store (a redb file).
    pub store: PathBuf,
    /// Muse replicas, e.g. `http://127.0.0.1:50051`.
    pub muse: Vec<String>,
    /// Majordomo replicas.
    pub majordomo: Vec<String>,
    /// Default dream policy for new sessions.
    pub policy: PolicyDefaults,
    /// Turns running at once; more are refused with RESOURCE_EXHAUSTED and a retry hint.
    pub max_turns: usize,
    /// Dream sessions one muse replica runs at once (its max_sessions should allow this).
    pub per_replica: usize,
    /// Deadline of each call to a model service, in seconds.
    pub call_timeout_s: u64,
    /// Characters of a user message.
    pub max_message_chars: usize,
    /// Transcript characters given to the muse verbatim; older turns are folded into a summary.
    pub history_chars: usize,
    /// Seconds between health checks of the replicas.
    pub health_interval_s: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PolicyDefaults {
    pub bursts: u32,
    pub steps: u32,
    pub commit_tokens: u32,
    pub noise: f32,
    pub gumbel_tau: f32,
    pub temperature: f32,
    pub max_attempts: u32,
}

#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// A TOML configuration file (see deploy/mm.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<String>,
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// A muse replica's address (repeatable).
    #[arg(long = "muse")]
    pub muse: Vec<String>,
    /// A majordomo replica's address (repeatable).
    #[arg(long = "majordomo")]
    pub majordomo: Vec<String>,
    #[arg(long)]
    pub max_turns: Option<usize>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

impl Config {
    pub fn load(flags: &Flags) -> Result<Self, config::ConfigError> {
        let mut b = config::Config::builder()
            .set_default("listen", "127.0.0.1:50050")?
            .set_default("store", "mm-data/sessions.redb")?
            .set_default("muse", vec!["http://127.0.0.1:50051"])?
            .set_default("majordomo", vec!["http://127.0.0.1:50052"])?
            .set_default("policy.bursts", 2)?
            .set_default("policy.steps", 4)?
            .set_default("policy.commit_tokens", 24)?
            .set_default("policy.noise", 0.0)?
            .set_default("policy.gumbel_tau", 0.0)?
            .set_default("policy.temperature", 0.8)?
            .set_default("policy.max_attempts", 2)?
            .set_default("max_turns", 32)?
            .set_default("per_replica", 8)?
            .set_default("call_timeout_s", 120)?
            .set_default("max_message_chars", 4000)?
            .set_default("history_chars", 3000)?
            .set_default("health_interval_s", 2)?;
        if let Some(path) = &flags.config {
            b = b.add_source(config::File::from(path.as_path()).required(true));
        }
        b = b.add_source(
            config::Environment::with_prefix("MM")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("muse")
                .with_list_parse_key("majordomo")
                .try_parsing(true),
        );
        if !flags.muse.is_empty() {
            b = b.set_override("muse", flags.muse.clone())?;
        }
        if !flags.majordomo.is_empty() {
            b = b.set_override("majordomo", flags.majordomo.clone())?;
        }
        let cfg: Self = b
            .set_override_option("listen", flags.listen.clone())?
            .set_override_option(
                "store",
                flags.store.as_ref().map(|p| p.display().to_string()),
            )?
            .set_override_option("max_turns", flags.max_turns.map(|x| x as u64))?
            .set_override_option("policy.max_attempts", flags.max_attempts.map(|x| x as u64))?
            .build()?
            .try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), config::ConfigError> {
        let bad = |m: String| Err(config::ConfigError::Message(m));
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "listen = `{}` is not an address like 127.0.0.1:50050",
                self.listen
            ));
        }
        if self.muse.is_empty() || self.majordomo.is_empty() {
            return bad(
                "configure at least one muse and one majordomo replica (--muse, --majordomo)"
                    .into(),
            );
        }
        if let Some(e) = self
            .muse
            .iter()
            .chain(&self.majordomo)
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return bad(format!(
                "replica `{e}` must be a URL like http://127.0.0.1:50051"
            ));
        }
        if self.max_turns == 0
            || self.per_replica == 0
            || self.policy.max_attempts == 0
            || self.policy.bursts == 0
            || self.policy.steps == 0
        {
            return bad("max_turns, per_replica, policy.max_attempts, policy.bursts and policy.steps must be >= 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_loads_and_flags_win() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mm.example.toml");
        let flags = Flags {
            config: Some(example),
            muse: vec!["http://a:1".into(), "http://b:1".into()],
            ..Default::default()
        };
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.muse, ["http://a:1", "http://b:1"]);
        assert_eq!(
            (c.policy.steps, c.policy.max_attempts, c.per_replica),
            (4, 2, 8)
        );
        let bad = Flags {
            muse: vec!["a:1".into()],
            ..Default::default()
        };
        assert!(Config::load(&bad)
            .unwrap_err()
            .to_string()
            .contains("must be a URL"));
    }
}
