//! The judge: fluency as a model other than the muse reads it — the mean per-token NLL of a
//! reply given its prompt (chat-formatted for the judge).

use lm::{ChatMessage, LoadedModel};

pub struct Judge {
    lm: LoadedModel,
}

/// The judge for a muse: the other default model, so the muse never grades itself.
pub fn default_for(muse: &str) -> &'static str {
    if muse.contains("gemma") {
        "smollm2-135m"
    } else {
        "gemma3-270m"
    }
}

impl Judge {
    pub fn load(spec: &str, threads: Option<usize>) -> anyhow::Result<Self> {
        Ok(Self {
            lm: mm_kit::model::load(spec, "cpu", threads, None)?,
        })
    }

    /// The reply's mean NLL (nats/token) after the prompt; none for an empty reply.
    pub fn nll(&self, prompt: &str, reply: &str) -> anyhow::Result<Option<lm::Nll>> {
        let reply = reply.trim();
        if reply.is_empty() {
            return Ok(None);
        }
        let context = self.lm.chat_prompt(&[ChatMessage::user(prompt)])?;
        let ids = self.lm.tokenizer.encode_with(reply, false, false)?;
        if ids.is_empty() {
            return Ok(None);
        }
        Ok(Some(lm::continuation_nll(&self.lm, &context, &ids)?))
    }
}
