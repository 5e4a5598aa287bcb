//! `muse`: the command line for people (generate, dream, bench) and the muse gRPC server.

mod bench;
mod bench_shape;
mod cli_dream;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use lm::{generate, ChatMessage, GenerateOptions, LoadedModel, SamplingParams};
use std::io::Write;

#[derive(Parser)]
#[command(
    name = "muse",
    version,
    about = "A language model that dreams in latent steps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text token by token, streamed to stdout.
    Generate(GenerateArgs),
    /// Dream: a burst of latent steps with live telemetry, then commit to text.
    Dream(cli_dream::DreamArgs),
    /// Serve the muse over gRPC (muse.v1.Muse, health, reflection).
    Serve(muse::serve::ServeFlags),
    /// Measure prompt-eval and decode speed; prints one JSON object with --json.
    Bench(bench::BenchArgs),
}

pub use mm_kit::model::ModelArgs;

/// The prompt: one chat message (rendered with the model's chat template) or raw text.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// A user message, rendered with the model's chat template and the assistant prompt.
    #[arg(long)]
    pub chat: Option<String>,
    /// Raw text, fed as it is (completion).
    #[arg(long)]
    pub prompt: Option<String>,
}

impl PromptArgs {
    pub fn ids(&self, lm: &LoadedModel) -> Result<Vec<u32>> {
        let ids = match (&self.chat, &self.prompt) {
            (Some(msg), _) => lm.chat_prompt(&[ChatMessage::user(msg.clone())])?,
            (None, Some(text)) => lm.raw_prompt(text)?,
            (None, None) => unreachable!("clap requires --chat or --prompt"),
        };
        anyhow::ensure!(
            !ids.is_empty(),
            "the prompt is empty: give --chat or --prompt some text"
        );
        Ok(ids)
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Keep the K most probable tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Keep tokens with at least this fraction of the top token's probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty for tokens already generated (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling
        .validate()
        .map_err(|e| anyhow::anyhow!(e.as_flag()))?;
    let lm = a.model.load()?;
    let ids = a.prompt.ids(&lm)?;
    let opts = GenerateOptions {
        sampling,
        max_tokens: a.max_tokens,
        stop_strings: a.stop,
        ..GenerateOptions::default()
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let g = generate(&lm, &ids, &opts, |piece| {
        if write_err.is_none() {
            write_err = out
                .write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .err();
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    tracing::info!(
        prompt_tokens = g.prompt_tokens,
        tokens = g.tokens.len(),
        stop = g.stop.as_str(),
        decode_tok_s = g.tokens.len() as f64 / g.decode_time.as_secs_f64().max(1e-9),
        "done"
    );
    Ok(())
}

fn run_serve(flags: muse::serve::ServeFlags) -> Result<()> {
    mm_kit::alloc::limit_arenas();
    let cfg = muse::serve::ServeConfig::load(&flags, None).context("muse serve configuration")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(muse::serve::serve(cfg))
}

fn main() {
    mm_kit::trace::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Dream(a) => cli_dream::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(flags) => run_serve(flags),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
