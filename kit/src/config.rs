//! Layered configuration, the same for every service: the configuration type's serde
//! `Default` (the one place defaults live), then a TOML file, then the environment, then
//! command-line flags.
//!
//! Environment variables are `<PREFIX>_<KEY>`, with nested keys joined by a double underscore
//! and lists separated by commas: `MM_LISTEN`, `MM_POLICY__STEPS`, `MM_MUSE=http://a:1,http://b:1`,
//! `MUSE_MAX_SESSIONS`.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use ::config::{ConfigError, Value};

/// Values given on the command line: they win over everything else. Unset flags are skipped.
#[derive(Debug, Default)]
pub struct Overrides(Vec<(String, Value)>);

impl Overrides {
    pub fn set<V: Into<Value>>(mut self, key: &str, value: Option<V>) -> Self {
        if let Some(v) = value {
            self.0.push((key.to_string(), v.into()));
        }
        self
    }
}

/// The flags every model service (muse, majordomo) takes: its file, address and model.
/// Each service flattens these into its own flags and adds its limits.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ModelServiceFlags {
    /// A TOML configuration file (see deploy/<service>.example.toml).
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
    /// Serve Prometheus `GET /metrics` on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    pub metrics: Option<String>,
}

impl ModelServiceFlags {
    /// The sources of a model service's configuration: these flags over `PREFIX_*` over the file.
    pub fn sources<'a>(
        &'a self,
        prefix: &'a str,
        env: Option<HashMap<String, String>>,
    ) -> Sources<'a> {
        Sources {
            prefix,
            file: self.config.as_deref(),
            list_keys: &[],
            env,
            overrides: Overrides::default()
                .set("listen", self.listen.clone())
                .set("model", self.model.clone())
                .set("device", self.device.clone())
                .set("threads", self.threads.map(|x| x as u64))
                .set("max_context", self.max_context.map(|x| x as u64))
                .set("metrics", self.metrics.clone()),
        }
    }
}

/// `listen` must be a socket address; the message shows a valid one.
pub fn check_listen(listen: &str, example: &str) -> Result<(), ConfigError> {
    check_address("listen", listen, example)
}

/// The address setting `field` must be a socket address; the message shows a valid one.
pub fn check_address(field: &str, value: &str, example: &str) -> Result<(), ConfigError> {
    value
        .parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| {
            ConfigError::Message(format!(
                "{field} = `{value}` is not an address like {example}"
            ))
        })
}

/// An environment given as pairs, for `Sources::env` (tests pass their own environment).
pub fn environment(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Where a configuration comes from.
pub struct Sources<'a> {
    /// The environment prefix, e.g. `MM` for `MM_LISTEN`.
    pub prefix: &'a str,
    /// A TOML file (`--config`), required to exist when given.
    pub file: Option<&'a Path>,
    /// Keys whose environment values are comma-separated lists.
    pub list_keys: &'a [&'a str],
    /// The environment to read; `None` reads the process's (tests pass their own).
    pub env: Option<HashMap<String, String>>,
    pub overrides: Overrides,
}

/// Builds `T` from its defaults and the sources, in order of precedence.
pub fn load<T: Serialize + DeserializeOwned + Default>(s: Sources) -> Result<T, ConfigError> {
    let mut b = ::config::Config::builder().add_source(::config::Config::try_from(&T::default())?);
    if let Some(file) = s.file {
        b = b.add_source(::config::File::from(file).required(true));
    }
    let mut env = ::config::Environment::with_prefix(s.prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(s.env);
    // A list separator without list keys would split every value.
    if !s.list_keys.is_empty() {
        env = env.list_separator(",");
        for key in s.list_keys {
            env = env.with_list_parse_key(key);
        }
    }
    b = b.add_source(env);
    for (key, value) in s.overrides.0 {
        b = b.set_override(key, value)?;
    }
    b.build()?.try_deserialize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Inner {
        steps: u32,
        noise: f32,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Cfg {
        listen: String,
        history_chars: usize,
        replicas: Vec<String>,
        policy: Inner,
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                steps: 4,
                noise: 0.5,
            }
        }
    }

    impl Default for Cfg {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:1".into(),
                history_chars: 10,
                replicas: vec!["http://a:1".into()],
                policy: Inner::default(),
            }
        }
    }

    #[test]
    fn environment_names_reach_flat_nested_and_list_keys_and_flags_win() {
        let c: Cfg = load(Sources {
            prefix: "MM",
            file: None,
            list_keys: &["replicas"],
            env: environment(&[
                ("MM_LISTEN", "127.0.0.1:50191"),
                ("MM_HISTORY_CHARS", "7"),
                ("MM_POLICY__STEPS", "1"),
                ("MM_REPLICAS", "http://b:1,http://c:1"),
                ("OTHER_LISTEN", "ignored"),
            ]),
            overrides: Overrides::default(),
        })
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:50191");
        assert_eq!(c.history_chars, 7);
        assert_eq!(
            c.policy,
            Inner {
                steps: 1,
                noise: 0.5
            }
        );
        assert_eq!(c.replicas, ["http://b:1", "http://c:1"]);
        let c: Cfg = load(Sources {
            prefix: "MM",
            file: None,
            list_keys: &[],
            env: environment(&[("MM_LISTEN", "127.0.0.1:50191")]),
            overrides: Overrides::default()
                .set("listen", Some("127.0.0.1:2"))
                .set::<String>("ignored", None),
        })
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.history_chars, 10, "defaults come from Default");
    }
}
