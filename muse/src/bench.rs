//! `muse bench`: prompt-eval and decode throughput of the runtime on a real model.

use crate::ModelArgs;
use anyhow::Result;
use clap::Args;
use lm::PrefixCache;
use lm::{argmax, Input};
use muse::dream::{DreamParams, LatentMode, TelemetryLevel};
use muse::session::{DreamSession, Prime};
use std::sync::Arc;
use std::time::Instant;

/// The burst every latent measurement runs: basic telemetry (what a client streams), no
/// nearest-token product.
fn bench_burst(mode: LatentMode, steps: usize) -> DreamParams {
    DreamParams {
        mode,
        steps,
        telemetry: TelemetryLevel::Basic,
        ..DreamParams::default()
    }
}

/// The part of the benchmark prompt that primes latent measurements: at most 32 tokens, cut
/// after a word (bursts start between words).
fn latent_prompt(lm: &lm::LoadedModel, ids: &[u32]) -> Vec<u32> {
    let head = &ids[..ids.len().min(32)];
    let end = head
        .iter()
        .rposition(|&t| lm.tokenizer.ends_word(t))
        .map_or(head.len(), |i| i + 1);
    head[..end].to_vec()
}

/// Latent steps/s per mode, in process: best of `repeats` bursts of `steps` from a primed state.
pub(crate) fn latent_rates(
    lm: &lm::LoadedModel,
    ids: &[u32],
    steps: usize,
    repeats: usize,
) -> Result<Vec<(&'static str, f64)>> {
    let mut out = Vec::new();
    for mode in LatentMode::ALL {
        let mut best = f64::MAX;
        for _ in 0..repeats {
            let mut s = DreamSession::new(lm);
            s.prime(&Prime::Tokens(latent_prompt(lm, ids)))?;
            let t = Instant::now();
            let b = s.burst(&bench_burst(mode, steps), |_| true)?;
            anyhow::ensure!(
                b.steps == steps,
                "{} burst stopped early ({})",
                mode.as_str(),
                b.stop.as_str()
            );
            best = best.min(t.elapsed().as_secs_f64());
        }
        out.push((mode.as_str(), steps as f64 / best));
    }
    Ok(out)
}

/// Aggregate concept latent steps/s of `n` sessions bursting at once (their steps batched):
/// `n × steps` over the wall time from a common start to the last burst's end, best of
/// `repeats`; and the mean batch size the model's step queue saw.
pub(crate) fn concurrent_latent_rate(
    lm: &lm::LoadedModel,
    ids: &[u32],
    n: usize,
    steps: usize,
    repeats: usize,
) -> Result<(f64, f64)> {
    let prompt = latent_prompt(lm, ids);
    let mut best = f64::MAX;
    let before = lm.model.step_stats();
    for _ in 0..repeats {
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = DreamSession::new(lm);
            s.prime(&Prime::Tokens(prompt.clone()))?;
            sessions.push(s);
        }
        let start = std::sync::Barrier::new(n + 1);
        let wall = std::thread::scope(|scope| -> Result<f64> {
            let handles: Vec<_> = sessions
                .iter_mut()
                .map(|s| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        s.burst(&bench_burst(LatentMode::Concept, steps), |_| true)
                    })
                })
                .collect();
            start.wait();
            let t = Instant::now();
            for h in handles {
                let b = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("a burst panicked"))??;
                anyhow::ensure!(
                    b.steps == steps,
                    "a burst stopped early ({})",
                    b.stop.as_str()
                );
            }
            Ok(t.elapsed().as_secs_f64())
        })?;
        best = best.min(wall);
    }
    let after = lm.model.step_stats();
    let mean_batch =
        (after.steps - before.steps) as f64 / (after.batches - before.batches).max(1) as f64;
    Ok(((n * steps) as f64 / best, mean_batch))
}

/// Concept latent steps/s through the gRPC service on a loopback socket, telemetry streamed.
fn grpc_rate(lm: Arc<lm::LoadedModel>, ids: &[u32], steps: usize, repeats: usize) -> Result<f64> {
    use mm_proto::muse::v1 as pb;
    use pb::client_command::Command as C;
    let prompt = latent_prompt(&lm, ids);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let limits = muse::service::Limits {
            max_sessions: 4,
            kv_memory_bytes: 1 << 30,
            prefix_cache_bytes: 0,
            compute_slots: 1,
            idle_timeout: std::time::Duration::from_secs(300),
            evict_idle: std::time::Duration::from_secs(15),
        };
        let service = muse::service::MuseService::new(lm, limits, Default::default()).into_server();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = pb::muse_client::MuseClient::connect(format!("http://{addr}")).await?;
        let mut best = f64::MAX;
        for _ in 0..repeats {
            let mut s = mm_proto::muse_session::SessionClient::open(&mut client).await?;
            let prime = pb::Prime {
                prompt: Some(pb::prime::Prompt::Tokens(pb::TokenIds {
                    ids: prompt.clone(),
                })),
            };
            s.run(C::Prime(prime)).await?;
            let burst = pb::DreamBurst {
                steps: steps as u32,
                telemetry: pb::TelemetryLevel::Basic as i32,
                ..Default::default()
            };
            let t = Instant::now();
            let events = s.run(C::Burst(burst)).await?;
            best = best.min(t.elapsed().as_secs_f64());
            anyhow::ensure!(
                events.len() == steps + 1,
                "gRPC burst returned {} events",
                events.len()
            );
        }
        Ok(steps as f64 / best)
    })
}

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
    /// Benchmark a model of this shape with random weights instead of --model (qwen2.5-0.5b,
    /// qwen2.5-1.5b, qwen2.5-7b, tiny): nothing is downloaded.
    #[arg(long, conflicts_with = "weights")]
    shape: Option<String>,
    /// Benchmark a bare safetensors directory (config.json + weights, no tokenizer needed).
    #[arg(long)]
    weights: Option<std::path::PathBuf>,
    /// With --shape/--weights: a transformers reference on the same weights
    /// (deploy/bench/hf_gpu_reference.py) to check logits and greedy tokens against.
    #[arg(long)]
    reference: Option<std::path::PathBuf>,
    /// With --shape/--weights: sequences stepping together in the batched measurement.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seed of the random weights (with --shape).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Measure only the prime of each turn of a conversation this many turns long, without
    /// and with the prefix cache (a fresh session per prime, as each attempt is one).
    #[arg(long, conflicts_with_all = ["shape", "weights"])]
    turns: Option<usize>,
    /// Concurrent sessions for the aggregate latent-steps measurement (their steps batched).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    sessions: Vec<usize>,
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
    anyhow::ensure!(
        a.sessions.iter().all(|&n| (1..=64).contains(&n)),
        "--sessions takes counts from 1 to 64"
    );
    if a.shape.is_some() || a.weights.is_some() {
        let report = crate::bench_shape::run(&crate::bench_shape::ShapeBench {
            shape: a.shape.clone(),
            weights: a.weights.clone(),
            reference: a.reference.clone(),
            device: a.model.device.clone(),
            seed: a.seed,
            batch: a.batch,
            steps: a.decode_tokens,
            repeats: a.repeats,
        })?;
        println!("{report}");
        return Ok(());
    }
    anyhow::ensure!(
        a.reference.is_none(),
        "--reference needs --shape or --weights"
    );
    let t0 = Instant::now();
    let lm = Arc::new(a.model.load()?);
    let load_s = t0.elapsed().as_secs_f64();
    if let Some(turns) = a.turns {
        return prime_turns(&lm, turns, a.repeats, a.json);
    }
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
    let latent = latent_rates(&lm, &ids, a.decode_tokens, a.repeats)?;
    let grpc = grpc_rate(lm.clone(), &ids, a.decode_tokens, a.repeats)?;
    let mut report = serde_json::json!({
        "engine": "muse-lm",
        "model": lm.name,
        "architecture": model.config().arch.name(),
        "quantization": model.quantization(),
        "threads": lm::cpu_threads(),
        "prompt_tokens": a.prompt_tokens,
        "prompt_tokens_per_s": a.prompt_tokens as f64 / best_prompt,
        "decode_tokens": a.decode_tokens,
        "decode_tokens_per_s": a.decode_tokens as f64 / best_decode,
        "weight_bytes_per_token": model.weight_bytes_per_token(),
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    for (mode, rate) in &latent {
        report[format!("latent_steps_per_s_{mode}")] = (*rate).into();
    }
    report["latent_steps_per_s"] = serde_json::json!(latent
        .iter()
        .cloned()
        .collect::<std::collections::BTreeMap<_, _>>(
    ));
    for &n in &a.sessions {
        let (rate, batch) = concurrent_latent_rate(&lm, &ids, n, a.decode_tokens, a.repeats)?;
        report[format!("latent_steps_per_s_sessions_{n}")] = rate.into();
        report[format!("mean_step_batch_sessions_{n}")] = batch.into();
    }
    report["grpc_latent_steps_per_s_concept"] = grpc.into();
    report["grpc_vs_in_process"] = (grpc / latent[0].1).into();
    report["peak_rss_bytes"] = peak_rss_bytes().into();
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

/// A reply of about 60 tokens and the next user message of about 15, different each turn.
fn exchange(turn: usize) -> (String, String) {
    const WORDS: &[&str] = &[
        "the", "keeper", "climbed", "stone", "stairs", "each", "night", "to", "trim", "wicks",
        "while", "ships", "found", "their", "way", "home", "through", "fog", "and", "storm",
        "light", "swept", "across", "grey", "water", "gulls", "slept", "on", "ledges", "below",
    ];
    let words = |n: usize, from: usize| -> String {
        let w: Vec<&str> = (0..n)
            .map(|i| WORDS[(from + 7 * i) % WORDS.len()])
            .collect();
        w.join(" ")
    };
    (
        format!("Turn {turn}: {}.", words(48, turn)),
        format!("Now tell me more about {} please.", words(9, 3 * turn)),
    )
}

/// Prime time of each turn of a `turns`-turn conversation: the whole transcript primed on a
/// fresh session, without a prefix cache, with one (shared by the turns, as on a replica),
/// and a retry of the same prompt with it. Best of `repeats` (a fresh prefix cache each).
fn prime_turns(lm: &lm::LoadedModel, turns: usize, repeats: usize, json: bool) -> Result<()> {
    let mut messages = vec![lm::ChatMessage::user("Tell me about lighthouses.")];
    let mut prompts = Vec::new();
    for turn in 1..=turns {
        prompts.push(Prime::Chat(messages.clone()));
        let (reply, next) = exchange(turn);
        messages.push(lm::ChatMessage::new("assistant", reply));
        messages.push(lm::ChatMessage::user(next));
    }
    let time = |prime: &Prime, prefixes: Option<&PrefixCache>| -> Result<(f64, usize, usize)> {
        let t = Instant::now();
        let p = DreamSession::new(lm).prime_with(prime, prefixes)?;
        Ok((
            t.elapsed().as_secs_f64() * 1e3,
            p.prompt_tokens,
            p.cached_tokens,
        ))
    };
    time(&prompts[0], None)?; // warm-up: page in the weights
    let best = |a: &mut f64, b: f64| *a = a.min(b);
    // Per turn: prompt tokens, ms off, ms on, cached tokens on, ms retry.
    let mut rows = vec![(0, f64::MAX, f64::MAX, 0, f64::MAX); turns];
    for _ in 0..repeats {
        let prefixes = PrefixCache::new(256 << 20);
        for (row, prompt) in rows.iter_mut().zip(&prompts) {
            let (off, n, _) = time(prompt, None)?;
            let (on, _, cached) = time(prompt, Some(&prefixes))?;
            let (retry, _, _) = time(prompt, Some(&prefixes))?;
            best(&mut row.1, off);
            best(&mut row.2, on);
            best(&mut row.4, retry);
            (row.0, row.3) = (n, cached);
        }
    }
    if json {
        let rows: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({"turn": i + 1, "prompt_tokens": r.0, "off_ms": r.1,
                    "on_ms": r.2, "cached_tokens": r.3, "retry_ms": r.4})
            })
            .collect();
        println!("{}", serde_json::json!({"model": lm.name, "turns": rows}));
        return Ok(());
    }
    println!("turn  prompt  cache off ms  cache on ms  cached  retry ms");
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>4}  {:>6}  {:>12.1}  {:>11.1}  {:>6}  {:>8.1}",
            i + 1,
            r.0,
            r.1,
            r.2,
            r.3,
            r.4
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
