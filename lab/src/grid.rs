//! The settings a lab run compares: plain-sampling baselines (several temperatures, top-p and
//! min-p) and dream settings (mode × steps × noise × render × schedule), each a complete dream
//! policy. `quick` is small enough for CI; `full` is what EVAL.md reports; a TOML file names
//! its own:
//!
//! ```toml
//! [[setting]]
//! name = "draft-exact"
//! leash = "exact"          # any key of the orchestrator's [policy] table
//! max_attempts = 1
//! ```

use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;
use orchestrator::policy::{LeashKind, TurnPolicy};
use serde::{Deserialize, Serialize};

/// One point of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    pub name: String,
    /// Plain sampling (no dream): the baseline curve.
    pub plain: bool,
    pub policy: TurnPolicy,
    /// Ask for the orchestrator's configured default policy (send nothing): the pipeline as
    /// `mm run` runs it there.
    #[serde(default)]
    pub configured: bool,
}

impl Setting {
    /// A setting from the defaults with `edit` applied; plain when its schedule is off.
    fn new(name: &str, edit: impl FnOnce(&mut TurnPolicy)) -> Self {
        let mut policy = TurnPolicy {
            // One attempt: the dream's own effect, not the critic's choice among attempts.
            max_attempts: 1,
            ..TurnPolicy::default()
        };
        edit(&mut policy);
        Self {
            name: name.into(),
            plain: policy.schedule == pb::Schedule::Off,
            policy,
            configured: false,
        }
    }

    /// A plain-sampling baseline.
    fn plain(name: &str, temperature: f32, top_p: f32, min_p: f32) -> Self {
        Self::new(name, |p| {
            p.schedule = pb::Schedule::Off;
            p.commit_temperature = temperature;
            p.commit_top_p = top_p;
            p.commit_min_p = min_p;
        })
    }
}

impl Setting {
    /// The session policy this setting asks for, with the sample's seed.
    pub fn request(&self, seed: u64) -> pb::DreamPolicy {
        if self.configured {
            pb::DreamPolicy {
                seed: Some(seed),
                ..Default::default()
            }
        } else {
            pb::DreamPolicy {
                seed: Some(seed),
                ..self.policy.to_pb()
            }
        }
    }
}

/// The pipeline exactly as `mm run` runs it (its default policy, attempts and all).
pub fn pipeline_default() -> Setting {
    Setting {
        name: "default".into(),
        plain: false,
        policy: TurnPolicy::default(),
        configured: true,
    }
}

pub fn quick() -> Vec<Setting> {
    vec![
        Setting::plain("plain-t0.7", 0.7, 0.95, 0.0),
        pipeline_default(),
        Setting::new("think", |p| p.render = upb::Render::Think),
    ]
}

pub fn full() -> Vec<Setting> {
    vec![
        Setting::plain("plain-t0.5", 0.5, 0.95, 0.0),
        Setting::plain("plain-t0.7", 0.7, 0.95, 0.0),
        Setting::plain("plain-t0.9", 0.9, 0.95, 0.0),
        Setting::plain("plain-t1.1", 1.1, 0.95, 0.0),
        Setting::plain("plain-t1.0-minp0.1", 1.0, 1.0, 0.1),
        Setting::plain("plain-t1.3-minp0.1", 1.3, 1.0, 0.1),
        pipeline_default(),
        Setting::new("draft-typical", |_| {}),
        Setting::new("draft-exact", |p| p.leash = LeashKind::Exact),
        Setting::new("draft-loose", |p| {
            p.leash_epsilon = 0.005;
            p.leash_delta = 0.02;
        }),
        Setting::new("draft-top", |p| p.proposal = upb::Proposal::Top),
        Setting::new("draft-8steps", |p| p.steps = 8),
        Setting::new("draft-gumbel0.7", |p| p.gumbel_tau = 0.7),
        Setting::new("draft-noise0.3", |p| p.noise = 0.3),
        Setting::new("draft-mixture", |p| p.mode = upb::LatentMode::Mixture),
        Setting::new("draft-hidden", |p| p.mode = upb::LatentMode::Hidden),
        Setting::new("draft-entropy", |p| {
            p.schedule = pb::Schedule::Entropy;
            p.bursts = 4;
        }),
        Setting::new("translate", |p| p.render = upb::Render::Translate),
        Setting::new("think", |p| p.render = upb::Render::Think),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    setting: Vec<NamedPolicy>,
}

#[derive(Deserialize)]
struct NamedPolicy {
    name: String,
    #[serde(flatten)]
    policy: toml::Table,
}

/// Settings from a TOML file: each a name and policy keys over the lab's defaults.
pub fn from_toml(text: &str) -> anyhow::Result<Vec<Setting>> {
    let file: GridFile = toml::from_str(text)?;
    anyhow::ensure!(
        !file.setting.is_empty(),
        "the grid file names no [[setting]]"
    );
    file.setting
        .into_iter()
        .map(|s| {
            let mut table = toml::Table::try_from(Setting::new("", |_| {}).policy)?;
            table.extend(s.policy);
            let policy: TurnPolicy = table
                .try_into()
                .map_err(|e| anyhow::anyhow!("setting `{}`: {e}", s.name))?;
            policy
                .validate()
                .map_err(|e| anyhow::anyhow!("setting `{}`: {e}", s.name))?;
            Ok(Setting {
                plain: policy.schedule == pb::Schedule::Off,
                name: s.name,
                policy,
                configured: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_hold_baselines_and_dreams_with_unique_names() {
        for grid in [quick(), full()] {
            assert!(grid.iter().any(|s| s.plain) && grid.iter().any(|s| !s.plain));
            let mut names: Vec<&str> = grid.iter().map(|s| s.name.as_str()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), grid.len());
            for s in &grid {
                s.policy.validate().unwrap();
            }
        }
    }

    #[test]
    fn a_toml_grid_overrides_the_lab_defaults() {
        let g = from_toml(
            "[[setting]]\nname = \"exact\"\nleash = \"exact\"\n\n[[setting]]\nname = \"plain\"\nschedule = \"off\"\ncommit_temperature = 0.9\n",
        )
        .unwrap();
        assert_eq!(g[0].policy.leash, LeashKind::Exact);
        assert_eq!(g[0].policy.max_attempts, 1);
        assert!(g[1].plain && g[1].policy.commit_temperature == 0.9);
        let e = from_toml("[[setting]]\nname = \"x\"\nsteps = 0\n").unwrap_err();
        assert!(e.to_string().contains("policy.steps"), "{e}");
        assert!(from_toml("[[setting]]\nname = \"x\"\nstepz = 3\n").is_err());
    }

    #[test]
    fn the_shipped_grids_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grids");
        for name in ["eval.toml", "pair.toml"] {
            let g = from_toml(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap();
            assert!(
                g.iter().any(|s| s.plain) && g.iter().any(|s| !s.plain),
                "{name}"
            );
            // A setting named "default" is the pipeline's default, or the report would lie.
            let default = g.iter().find(|s| s.name == "default");
            assert!(default.is_some() || name != "eval.toml");
            if let Some(d) = default {
                assert_eq!(d.policy, TurnPolicy::default(), "{name}");
            }
        }
    }
}
