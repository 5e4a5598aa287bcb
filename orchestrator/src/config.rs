//! Orchestrator configuration: `Config::default()` (the defaults, in one place), then a TOML
//! file, then `MM_*` environment (`MM_LISTEN`, `MM_POLICY__STEPS`, `MM_MUSE=a,b`), then flags.

use crate::ceiling::Ceiling;
use crate::discovery::Entry;
use crate::policy::TurnPolicy;
use crate::store::Location;
use mm_kit::config::{self, ConfigError, Overrides, Sources};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the orchestrator's own API; port 0 picks a free port.
    pub listen: String,
    /// Address of the HTTP API (OpenAI-compatible chat completions, `/metrics`).
    pub http: String,
    /// The session store: a redb file (one orchestrator), or `postgres://user@host/db`, which
    /// several orchestrators share (`MM_STORE`).
    pub store: Location,
    /// Muse replicas: a URL (`http://127.0.0.1:50051`) is one replica; `dns://NAME:PORT` is
    /// one per address NAME resolves to (a headless Service, a Docker network alias),
    /// re-resolved every `health_interval_s` so replicas come and go with the answer.
    pub muse: Vec<String>,
    /// Majordomo replicas, as `muse`.
    pub majordomo: Vec<String>,
    /// The dream policy of new sessions, where their request leaves a field unset.
    pub policy: TurnPolicy,
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
    /// Seconds a turn's lease on its session lasts unless renewed (every third of it): with a
    /// shared store, how long a dead orchestrator's session waits before another takes it.
    pub turn_lease_s: u64,
    /// Seconds between health checks of the replicas.
    pub health_interval_s: u64,
    /// A bearer token for one tenant, `default` (`MM_API_TOKEN`); with `api_tokens_file`,
    /// `<tenant> <token>` lines. Neither: the client API is open.
    pub api_token: Option<String>,
    pub api_tokens_file: Option<PathBuf>,
    /// The client API's certificate chain and private key, PEM files (`MM_TLS_CERT`,
    /// `MM_TLS_KEY`): with both, the gRPC and HTTP APIs speak TLS only. Neither: plain text,
    /// for loopback or behind a TLS-terminating proxy.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// What every caller may ask for; `tenant_ceilings.<tenant>` replaces it for one tenant.
    pub ceiling: Ceiling,
    pub tenant_ceilings: HashMap<String, Ceiling>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50050".into(),
            http: "127.0.0.1:50080".into(),
            store: Location::File("mm-data/sessions.redb".into()),
            muse: vec!["http://127.0.0.1:50051".into()],
            majordomo: vec!["http://127.0.0.1:50052".into()],
            policy: TurnPolicy::default(),
            max_turns: 32,
            per_replica: 8,
            call_timeout_s: 120,
            max_message_chars: 4000,
            history_chars: 3000,
            turn_lease_s: 30,
            health_interval_s: 2,
            api_token: None,
            api_tokens_file: None,
            tls_cert: None,
            tls_key: None,
            ceiling: Ceiling::default(),
            tenant_ceilings: HashMap::new(),
        }
    }
}

#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// A TOML configuration file (see deploy/mm.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<String>,
    /// The HTTP API's address (OpenAI-compatible `/v1`, `/metrics`).
    #[arg(long)]
    pub http: Option<String>,
    /// The session store: a redb file, or a postgres:// URL (shared by several orchestrators).
    #[arg(long)]
    pub store: Option<String>,
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
    /// The client API's certificate chain (PEM); with `--tls-key`, both APIs speak TLS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

impl Config {
    /// Defaults, file, `MM_*` (`env`: the process environment when `None`), flags; validated.
    pub fn load(flags: &Flags, env: Option<HashMap<String, String>>) -> Result<Self, ConfigError> {
        let list = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let cfg: Self = config::load(Sources {
            prefix: "MM",
            file: flags.config.as_deref(),
            list_keys: &["muse", "majordomo"],
            env,
            overrides: Overrides::default()
                .set("listen", flags.listen.clone())
                .set("http", flags.http.clone())
                .set("store", flags.store.clone())
                .set("muse", list(&flags.muse))
                .set("majordomo", list(&flags.majordomo))
                .set("max_turns", flags.max_turns.map(|x| x as u64))
                .set("tls_cert", path(&flags.tls_cert))
                .set("tls_key", path(&flags.tls_key))
                .set("policy.max_attempts", flags.max_attempts.map(|x| x as u64)),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Message(m));
        config::check_listen(&self.listen, "127.0.0.1:50050")?;
        config::check_address("http", &self.http, "127.0.0.1:50080")?;
        if self.muse.is_empty() || self.majordomo.is_empty() {
            return bad(
                "configure at least one muse and one majordomo replica (--muse, --majordomo)"
                    .into(),
            );
        }
        for e in self.muse.iter().chain(&self.majordomo) {
            Entry::parse(e).map_err(|e| ConfigError::Message(e.to_string()))?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return bad(
                    "tls_cert is set but tls_key is not: TLS needs both (--tls-key, MM_TLS_KEY)"
                        .into(),
                )
            }
            (None, Some(_)) => {
                return bad(
                    "tls_key is set but tls_cert is not: TLS needs both (--tls-cert, MM_TLS_CERT)"
                        .into(),
                )
            }
            _ => {}
        }
        if self.max_turns == 0 || self.per_replica == 0 || self.turn_lease_s < 3 {
            return bad("max_turns and per_replica must be >= 1, turn_lease_s >= 3".into());
        }
        self.policy
            .validate()
            .map_err(|e| ConfigError::Message(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mm_kit::config::environment;

    #[test]
    fn the_example_file_loads_and_flags_win() {
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mm.example.toml");
        let flags = Flags {
            config: Some(example),
            muse: vec!["http://a:1".into(), "http://b:1".into()],
            ..Default::default()
        };
        let c = Config::load(&flags, environment(&[])).unwrap();
        assert_eq!(c.muse, ["http://a:1", "http://b:1"]);
        assert_eq!(
            c.policy,
            TurnPolicy::default(),
            "the example documents the defaults"
        );
        assert_eq!(c.per_replica, 8);
    }

    #[test]
    fn replicas_are_urls_or_dns_names_with_a_port() {
        let load = |muse: &str| {
            let flags = Flags {
                muse: vec![muse.into()],
                ..Default::default()
            };
            Config::load(&flags, environment(&[]))
        };
        for good in [
            "http://a:1",
            "https://a:1",
            "dns://muse:50051",
            "dns://muse.default.svc.cluster.local:50051",
        ] {
            assert_eq!(load(good).unwrap().muse, [good]);
        }
        for bad in ["a:1", "dns://muse", "dns://:1", "dns://muse:0", "tcp://a:1"] {
            let e = load(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("replica `{bad}`"))
                    && e.contains("http(s)://host:port or dns://name:port"),
                "{bad}: {e}"
            );
        }
        let mixed = Config::load(
            &Flags::default(),
            environment(&[("MM_MAJORDOMO", "http://a:1,dns://majordomo:50052")]),
        )
        .unwrap();
        assert_eq!(mixed.majordomo, ["http://a:1", "dns://majordomo:50052"]);
    }

    #[test]
    fn the_documented_environment_names_take_effect() {
        let c = Config::load(
            &Flags::default(),
            environment(&[
                ("MM_LISTEN", "127.0.0.1:50191"),
                ("MM_POLICY__STEPS", "1"),
                ("MM_POLICY__RENDER", "translate"),
                ("MM_HISTORY_CHARS", "7"),
                ("MM_MUSE", "http://a:1,http://b:1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:50191");
        assert_eq!(c.policy.steps, 1);
        assert_eq!(c.policy.render, mm_proto::muse::v1::Render::Translate);
        assert_eq!(c.history_chars, 7);
        assert_eq!(c.muse, ["http://a:1", "http://b:1"]);
        let e =
            Config::load(&Flags::default(), environment(&[("MM_POLICY__STEPS", "0")])).unwrap_err();
        assert!(e.to_string().contains("policy.steps"), "{e}");
        let c = Config::load(
            &Flags::default(),
            environment(&[("MM_TLS_CERT", "c.pem"), ("MM_TLS_KEY", "k.pem")]),
        )
        .unwrap();
        assert_eq!(
            (c.tls_cert, c.tls_key),
            (Some("c.pem".into()), Some("k.pem".into()))
        );
        let e =
            Config::load(&Flags::default(), environment(&[("MM_TLS_KEY", "k.pem")])).unwrap_err();
        assert!(e.to_string().contains("tls_cert is not"), "{e}");
        let c = Config::load(
            &Flags::default(),
            environment(&[
                ("MM_STORE", "postgres://mm@db/mm"),
                ("MM_TURN_LEASE_S", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.store, c.turn_lease_s),
            (
                crate::store::Location::Postgres("postgres://mm@db/mm".into()),
                9
            )
        );
        let e =
            Config::load(&Flags::default(), environment(&[("MM_TURN_LEASE_S", "1")])).unwrap_err();
        assert!(e.to_string().contains("turn_lease_s >= 3"), "{e}");
    }
}
