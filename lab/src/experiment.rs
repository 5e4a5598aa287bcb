//! Seed 003's experiment as a report: what concept vectors hold and whether the model can
//! read its own vectors. For each prompt and N latent steps: the top weights of every vector,
//! its nearest token, the information a hard token would have lost (KL between the next-step
//! distributions after the top token and after the vector, seed 000's check), and the
//! reader's translations in completion and instruction framing.

use lm::{Distribution, Input, LoadedModel, SamplingParams};
use muse::dream::{Frontier, Step};
use muse::render::{self, Framing};
use std::fmt::Write;

pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "2 plus 2 equals",
    "Once upon a time",
];
pub const STEPS: [usize; 3] = [2, 3, 4];

/// The concept distribution: temperature 0.8, top-k 50 (the dream's defaults).
fn concept() -> SamplingParams {
    SamplingParams {
        temperature: muse::dream::DEFAULT_CONCEPT_TEMPERATURE,
        top_k: 50,
        top_p: 1.0,
        ..SamplingParams::default()
    }
}

/// KL(p ‖ q) of the full softmaxes of two logit vectors.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        l.iter().map(|&x| x as f64 - z).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn weights(lm: &LoadedModel, d: &Distribution) -> String {
    d.ids
        .iter()
        .zip(&d.probs)
        .take(4)
        .map(|(&id, &p)| format!("{:?} {:.2}", lm.tokenizer.token_text(id), p))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as markdown.
pub fn translation(lm: &LoadedModel) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "Model `{}`; concept vectors at temperature {}, top-k 50, no noise.\n",
        lm.name,
        muse::dream::DEFAULT_CONCEPT_TEMPERATURE
    )?;
    writeln!(
        out,
        "| prompt | N | step | top weights | nearest (cosine) | KL(hard ‖ soft) |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    let mut readings = Vec::new();
    for prompt in PROMPTS {
        let ids = lm.raw_prompt(prompt)?;
        for n in STEPS {
            let mut cache = lm.model.new_cache();
            let mut frontier = Frontier::advance(lm, &mut cache, Input::Tokens(&ids))?;
            let mut steps: Vec<Step> = Vec::new();
            for i in 0..n {
                let p = lm::distribution(&frontier.host_logits()?, &concept(), &[]);
                let e = lm.model.embedding().mix(&p.ids, &p.probs)?;
                let (near, cos) = lm.model.embedding().nearest(&e)?;
                // The hard branch: the same prefix, the top token instead of the vector.
                let mut hard = lm.model.new_cache();
                lm.model.forward(Input::Tokens(&ids), &mut hard)?;
                if !steps.is_empty() {
                    let prev = lm::candle::Tensor::cat(
                        &steps.iter().map(|s| s.vector.clone()).collect::<Vec<_>>(),
                        0,
                    )?;
                    lm.model.forward(Input::Vectors(&prev), &mut hard)?;
                }
                let h = lm.model.forward(Input::Tokens(&[p.top()]), &mut hard)?;
                let hard_logits = lm.model.last_logits(&h)?;
                frontier = Frontier::advance(lm, &mut cache, Input::Vectors(&e))?;
                let soft_logits = frontier.host_logits()?;
                writeln!(
                    out,
                    "| {prompt} | {n} | {} | {} | {:?} ({cos:.2}) | {:.3} |",
                    i + 1,
                    weights(lm, &p),
                    lm.tokenizer.token_text(near),
                    kl(&hard_logits, &soft_logits)
                )?;
                steps.push(Step { p, vector: e });
            }
            let completion = render::translate(lm, &steps, Framing::Completion)?;
            let instruction = render::translate(lm, &steps, Framing::Instruction)?;
            readings.push((prompt, n, completion, instruction));
        }
    }
    writeln!(out, "\nThe reader's translations (greedy, one line):\n")?;
    writeln!(out, "| prompt | N | completion: \"The meaning of ⟨vectors⟩ in plain English is\" | instruction (chat template) |")?;
    writeln!(out, "|---|---|---|---|")?;
    for (prompt, n, c, i) in readings {
        writeln!(out, "| {prompt} | {n} | {c} | {i} |")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::kl;

    #[test]
    fn kl_is_zero_for_equal_and_positive_for_different_distributions() {
        assert!(kl(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).abs() < 1e-12);
        assert!(kl(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) > 0.5);
    }
}
