//! How likely a text is under a model: the mean per-token negative log-likelihood of a
//! continuation given its context. Fluency as a model reads it: the majordomo scores drafts
//! with it, and the dream lab's judge scores replies with it (a model other than the muse).

use crate::error::{LmError, Result};
use crate::loaded::LoadedModel;
use crate::model::Input;
use candle_core::Tensor;

/// Rows of logits materialised at once (a 262k vocabulary is 1 MiB a row).
const CHUNK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Nll {
    /// Mean negative log-likelihood per continuation token, nats.
    pub mean: f32,
    pub tokens: usize,
}

/// The NLL of `continuation` after `context` (which must not be empty: the first continuation
/// token is predicted from the context's last position). One forward over both.
pub fn continuation_nll(lm: &LoadedModel, context: &[u32], continuation: &[u32]) -> Result<Nll> {
    if context.is_empty() || continuation.is_empty() {
        return Err(LmError::InvalidInput(
            "scoring needs a context and a continuation of at least one token each".into(),
        ));
    }
    let ids = [context, continuation].concat();
    lm.check_fits(ids.len())?;
    let mut cache = lm.model.new_cache();
    let hidden = lm.model.forward(Input::Tokens(&ids), &mut cache)?;
    // Row r predicts ids[r + 1]; the continuation starts at row context.len() - 1.
    rows_nll(
        lm,
        &hidden.narrow(0, context.len() - 1, continuation.len())?,
        continuation,
    )
}

/// The NLL of `targets`, each predicted by the same row of `hidden` (final hidden states, the
/// rows of the positions just before the targets): a continuation scored inside a forward
/// that was run for something else.
pub fn rows_nll(lm: &LoadedModel, hidden: &Tensor, targets: &[u32]) -> Result<Nll> {
    if targets.is_empty() || hidden.dim(0)? != targets.len() {
        return Err(LmError::InvalidInput(format!(
            "scoring needs one hidden row per target, got {} rows for {} targets",
            hidden.dim(0)?,
            targets.len()
        )));
    }
    let mut total = 0f64;
    for start in (0..targets.len()).step_by(CHUNK) {
        let len = CHUNK.min(targets.len() - start);
        let rows: Vec<Vec<f32>> = lm.model.logits(&hidden.narrow(0, start, len)?)?.to_vec2()?;
        for (r, row) in rows.iter().enumerate() {
            total += neg_log_prob(row, targets[start + r]);
        }
    }
    Ok(Nll {
        mean: (total / targets.len() as f64) as f32,
        tokens: targets.len(),
    })
}

/// `−log softmax(logits)[target]`, in f64.
fn neg_log_prob(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::neg_log_prob;

    #[test]
    fn negative_log_probability_of_a_uniform_row_is_log_n() {
        let row = [0.5f32; 4];
        assert!((neg_log_prob(&row, 2) - 4f64.ln()).abs() < 1e-9);
        let peaked = [0.0f32, 100.0];
        assert!(neg_log_prob(&peaked, 1) < 1e-6);
    }
}
