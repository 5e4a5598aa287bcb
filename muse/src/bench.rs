//! `muse bench`: prompt-eval and decode throughput of the runtime on a real model.

use crate::ModelArgs;
use anyhow::Result;
use clap::Args;
use lm::model::Input;
use lm::sampling::argmax;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prompt-eval measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Timed repetitions; the best is reported (the machine may be shared).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// A deterministic prompt of exactly `n` tokens.
fn prompt_ids(lm: &lm::LoadedModel, n: usize) -> Result<Vec<u32>> {
    let para =
        "The history of the lighthouse is a story of light, stone and the sea. Keepers climbed \
                the stairs each night to trim the wicks, and ships found their way home. ";
    let mut ids = lm.raw_prompt(&para.repeat(1 + n / 20))?;
    anyhow::ensure!(ids.len() >= n, "benchmark prompt too short");
    ids.truncate(n);
    Ok(ids)
}

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens >= 1, "--prompt-tokens must be at least 1");
    anyhow::ensure!(a.repeats >= 1, "--repeats must be at least 1");
    let t0 = Instant::now();
    let lm = a.model.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    lm.check_fits(a.prompt_tokens + a.decode_tokens)?;
    let ids = prompt_ids(&lm, a.prompt_tokens)?;
    let model = &lm.model;
    // Warm-up: page in weights, size caches.
    let mut cache = model.new_cache();
    model.forward(Input::Tokens(&ids[..ids.len().min(16)]), &mut cache)?;

    let mut best_prompt = f64::MAX;
    let mut best_decode = f64::MAX;
    for _ in 0..a.repeats {
        let mut cache = model.new_cache();
        let t = Instant::now();
        let h = model.forward(Input::Tokens(&ids), &mut cache)?;
        let mut logits = model.last_logits(&h)?;
        best_prompt = best_prompt.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..a.decode_tokens {
            let id = argmax(&logits);
            let h = model.forward(Input::Tokens(&[id]), &mut cache)?;
            logits = model.last_logits(&h)?;
        }
        best_decode = best_decode.min(t.elapsed().as_secs_f64());
    }
    let report = serde_json::json!({
        "engine": "muse-lm",
        "model": lm.name,
        "architecture": model.config().arch.name(),
        "quantization": model.quantization(),
        "threads": lm::threads::cpu_threads(),
        "prompt_tokens": a.prompt_tokens,
        "prompt_tokens_per_s": a.prompt_tokens as f64 / best_prompt,
        "decode_tokens": a.decode_tokens,
        "decode_tokens_per_s": a.decode_tokens as f64 / best_decode,
        "weight_bytes_per_token": model.weight_bytes_per_token(),
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{}: prompt {:.1} tok/s, decode {:.1} tok/s ({} threads)",
            lm.name,
            report["prompt_tokens_per_s"],
            report["decode_tokens_per_s"],
            report["threads"]
        );
    }
    Ok(())
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
