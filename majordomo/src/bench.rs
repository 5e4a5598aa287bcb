//! `majordomo bench`: constrained decoding against unconstrained on the same model and prompt.

use crate::constrained;
use crate::critique;
use crate::review::{CritiqueRequest, Majordomo};
use lm::argmax;
use lm::Input;
use std::time::Instant;

/// One measurement: tokens produced and seconds spent decoding them.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rate {
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

fn rate(tokens: usize, seconds: f64) -> Rate {
    Rate {
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
    }
}

/// Best of `repeats` for each of: unconstrained greedy, constrained with and without
/// fast-forwarding forced tokens. All start from the same prefilled critique prompt.
pub fn run(md: &Majordomo, repeats: usize) -> lm::Result<serde_json::Value> {
    let lm = md.model();
    let req = CritiqueRequest {
        request: "Write a short poem about the sea.".into(),
        draft: "The sea is wide and grey tonight; the gulls have gone to bed. A lantern swings on the last boat in.".into(),
        ..Default::default()
    };
    let (prompt, _) = md
        .critique_prompt(&req)
        .map_err(|e| lm::LmError::InvalidInput(e.to_string()))?;
    let schema = critique::model_schema();
    let best = |f: &mut dyn FnMut() -> lm::Result<(usize, f64, f64)>| -> lm::Result<(Rate, f64)> {
        let mut out = (rate(0, f64::MAX), 0.0);
        for _ in 0..repeats {
            let (n, s, mask_us) = f()?;
            if s < out.0.seconds {
                out = (rate(n, s), mask_us);
            }
        }
        Ok(out)
    };
    let prefill = || -> lm::Result<(lm::KvCache, Vec<f32>)> {
        let mut cache = lm.model.new_cache();
        let h = lm.model.forward(Input::Tokens(&prompt), &mut cache)?;
        Ok((cache, lm.model.last_logits(&h)?))
    };
    let constrained_run = |ff: bool| -> lm::Result<(usize, f64, f64)> {
        let (mut cache, logits) = prefill()?;
        let mut m = md
            .constrainer()
            .matcher(&schema)
            .map_err(|e| lm::LmError::InvalidInput(e.to_string()))?;
        let (_, stats) = constrained::decode(
            lm,
            &mut cache,
            logits,
            &mut m,
            critique::model_output_max_bytes(),
            ff,
            |_| {},
        )
        .map_err(|e| lm::LmError::InvalidInput(e.to_string()))?;
        Ok((
            stats.tokens,
            stats.total_time.as_secs_f64(),
            stats.mask_micros_per_token(),
        ))
    };
    let (with_ff, mask_ff) = best(&mut || constrained_run(true))?;
    let (without_ff, mask_us) = best(&mut || constrained_run(false))?;
    let n = without_ff.tokens.max(1);
    let (free, _) = best(&mut || {
        let (mut cache, mut logits) = prefill()?;
        let t = Instant::now();
        for _ in 0..n {
            let id = argmax(&logits);
            logits = lm
                .model
                .last_logits(&lm.model.forward(Input::Tokens(&[id]), &mut cache)?)?;
        }
        Ok((n, t.elapsed().as_secs_f64(), 0.0))
    })?;
    Ok(serde_json::json!({
        "model": lm.name,
        "threads": lm::cpu_threads(),
        "prompt_tokens": prompt.len(),
        "unconstrained": free,
        "constrained": without_ff,
        "constrained_fast_forward": with_ff,
        "constrained_vs_unconstrained": without_ff.tokens_per_s / free.tokens_per_s,
        "constrained_fast_forward_vs_unconstrained": with_ff.tokens_per_s / free.tokens_per_s,
        "mask_micros_per_token": mask_us,
        "mask_micros_per_sampled_token_fast_forward": mask_ff,
    }))
}
