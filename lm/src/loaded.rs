//! A model ready to use: weights, tokenizer and chat template, resolved from one spec.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{LmError, Result};
use crate::model::{GgufFile, LoadOptions, Model};
use crate::source::{self, ModelSpec};
use crate::tokenizer::{ByteRanges, Tokenizer};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    /// The spec as given (e.g. `smollm2-135m`).
    pub name: String,
    pub path: PathBuf,
}

impl LoadedModel {
    /// Resolves `spec` (fetching a missing default model), verifies a default model's sha256,
    /// and loads it.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let parsed = ModelSpec::parse(spec)?;
        let path = source::resolve(&parsed)?;
        if let Some(alias) = parsed.alias() {
            source::verify(alias, &path)?;
        }
        let mut loaded = Self::load_path(&path, opts)?;
        loaded.name = spec.to_string();
        Ok(loaded)
    }

    /// Loads a local GGUF file or safetensors directory.
    pub fn load_path(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let started = std::time::Instant::now();
        let (model, tokenizer, template) = if path.is_dir() {
            let model = Model::from_safetensors_dir(path, opts)?;
            let (tokenizer, template) = hf_tokenizer(path)?;
            (model, tokenizer, template)
        } else {
            let mut gguf = GgufFile::open(path)?;
            gguf.architecture()?; // an unsupported model fails here, before anything else
            let tokenizer = Tokenizer::from_gguf(&gguf)?;
            let template = gguf.str("tokenizer.chat_template").ok().map(str::to_string);
            let model = Model::from_gguf(&mut gguf, opts)?;
            (model, tokenizer, template)
        };
        // A token id past the embedding's rows would fail every request that meets it.
        if tokenizer.vocab_size() > model.config().vocab {
            return Err(LmError::BadModel(format!(
                "the tokenizer has {} tokens but the embedding has {} rows",
                tokenizer.vocab_size(),
                model.config().vocab
            )));
        }
        let piece = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_piece(i))
                .unwrap_or_default()
        };
        let chat = ChatTemplate::new(
            template,
            piece(tokenizer.bos()),
            piece(tokenizer.eos()),
            |t| tokenizer.token_to_id(t).is_some(),
        )?;
        tracing::info!(
            path = %path.display(),
            arch = model.config().arch.name(),
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            chat,
            name: path.display().to_string(),
            path: path.into(),
        })
    }

    /// A model without a tokenizer of its own (random weights, bare safetensors), given the
    /// stand-in [`Tokenizer::synthetic`] and the plain chat fallback, so the dream loop and
    /// benchmarks run on it unchanged.
    pub fn synthetic(model: Model, name: &str) -> Result<Self> {
        let tokenizer = Tokenizer::synthetic(model.config().vocab)?;
        let chat = ChatTemplate::new(None, String::new(), String::new(), |_| false)?;
        Ok(Self {
            model,
            tokenizer,
            chat,
            name: name.to_string(),
            path: PathBuf::new(),
        })
    }

    /// Token ids of a chat prompt ending where the assistant's reply starts. The rendered
    /// template's markers become their special ids; BOS is added once.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.chat.render(messages, true)?;
        self.encode_rendered(&text)
    }

    /// [`Self::chat_prompt`], and where in it the last occurrence of `part` that is followed by
    /// `then` lies: the range of the tokens that lie wholly inside `part` as rendered (none
    /// when the template does not render it verbatim, or no token lies inside).
    pub fn chat_prompt_locating(
        &self,
        messages: &[ChatMessage],
        part: &str,
        then: &str,
    ) -> Result<(Vec<u32>, Option<Range<usize>>)> {
        let text = self.chat.render(messages, true)?;
        let (ids, offsets) = self.encode_rendered_with_offsets(&text)?;
        let span = text.rfind(&format!("{part}{then}")).and_then(|start| {
            let end = start + part.len();
            let inside = |&(a, b): &(usize, usize)| a >= start && b <= end && b > a;
            let first = offsets.iter().position(inside)?;
            let len = offsets[first..].iter().take_while(|o| inside(o)).count();
            Some(first..first + len)
        });
        Ok((ids, span))
    }

    /// Encodes template output: special tokens parsed, BOS added unless the text starts with it.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_rendered_with_offsets(text)?.0)
    }

    fn encode_rendered_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteRanges)> {
        let bos_text = self
            .tokenizer
            .bos()
            .and_then(|b| self.tokenizer.token_piece(b));
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        self.tokenizer.encode_with_offsets(text, true, !has_bos)
    }

    /// Token ids of a raw completion prompt (special-token text is parsed; BOS per the model).
    pub fn raw_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Checks that `n` positions fit in one sequence.
    pub fn check_fits(&self, n: usize) -> Result<()> {
        if n > self.model.max_context() {
            return Err(LmError::ContextOverflow {
                needed: n,
                limit: self.model.max_context(),
            });
        }
        Ok(())
    }
}

/// `tokenizer.json` + `tokenizer_config.json` (chat template, BOS/EOS) of a safetensors repo.
fn hf_tokenizer(dir: &Path) -> Result<(Tokenizer, Option<String>)> {
    let file = dir.join("tokenizer.json");
    if !file.exists() {
        return Err(LmError::NotFound(file));
    }
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let probe =
        tokenizers::Tokenizer::from_file(&file).map_err(|e| LmError::Tokenizer(e.to_string()))?;
    let token_id = |key: &str| -> Option<u32> {
        let v = &config[key];
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        probe.token_to_id(text)
    };
    let tokenizer = Tokenizer::from_file(&file, token_id("bos_token"), token_id("eos_token"))?;
    let template = config["chat_template"].as_str().map(str::to_string);
    Ok((tokenizer, template))
}
