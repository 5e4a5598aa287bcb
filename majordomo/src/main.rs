//! `majordomo`: critique a draft from the command line, or serve the majordomo over gRPC.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use majordomo::review::{CritiqueRequest, Majordomo};
use std::io::Read;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "majordomo",
    version,
    about = "A sober editor for a dreaming muse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Critique a draft; prints the structured critique (`--json`: the schema's JSON, one line).
    Critique(CritiqueArgs),
    /// Constrained vs unconstrained decoding speed on one prompt; prints one JSON object.
    Bench(BenchArgs),
    /// Serve the majordomo over gRPC (majordomo.v1.Majordomo, health, reflection).
    Serve(majordomo::serve::ServeFlags),
}

#[derive(Args)]
struct CritiqueArgs {
    /// Model: an alias (smollm2-135m, gemma3-270m), hf:<org>/<repo>/<file>, or a path.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// What the user asked for.
    #[arg(long)]
    request: String,
    /// The draft to critique (or --draft-file, or standard input).
    #[arg(long, conflicts_with = "draft_file")]
    draft: Option<String>,
    /// A file holding the draft.
    #[arg(long)]
    draft_file: Option<std::path::PathBuf>,
    /// CPU threads for the model's kernels.
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:<n>` (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print exactly the critique's JSON object on one line.
    #[arg(long)]
    json: bool,
}

fn read_draft(a: &CritiqueArgs) -> Result<String> {
    if let Some(d) = &a.draft {
        return Ok(d.clone());
    }
    let bytes = match &a.draft_file {
        Some(p) => std::fs::read(p).with_context(|| format!("--draft-file {}", p.display()))?,
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the draft from standard input")?;
            buf
        }
    };
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the draft is not valid UTF-8 (byte {}): pass UTF-8 text",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Opens `--device` and loads `--model` on it.
fn load(model: &str, device: &str) -> Result<lm::LoadedModel> {
    let device = lm::device::open(device).context("--device")?;
    let opts = lm::LoadOptions {
        device,
        ..Default::default()
    };
    lm::LoadedModel::load(model, &opts).with_context(|| format!("loading --model {model}"))
}

fn run_critique(a: CritiqueArgs) -> Result<()> {
    if let Some(n) = a.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        lm::threads::set_cpu_threads(n);
    }
    anyhow::ensure!(
        !a.request.trim().is_empty(),
        "--request is empty: say what the user asked for"
    );
    let draft = read_draft(&a)?;
    let lm = load(&a.model, &a.device)?;
    let md = Majordomo::new(Arc::new(lm))?;
    let req = CritiqueRequest {
        request: a.request.clone(),
        draft,
        ..Default::default()
    };
    let out = md.critique(&req, |_| {})?;
    if a.json {
        println!("{}", serde_json::to_string(&out.critique)?);
    } else {
        let c = &out.critique;
        println!(
            "verdict: {:?}  coherence {}/10  novelty {}/10",
            c.verdict, c.coherence, c.novelty
        );
        println!("summary: {}", c.summary);
        for i in &c.issues {
            println!("issue [{}]: {}", i.kind.as_str(), i.detail);
        }
        for p in &c.points {
            println!("point: {p}");
        }
        println!(
            "advice: noise {:?}, steps {:?}",
            c.advice.noise, c.advice.steps
        );
        eprintln!(
            "({} tokens, {} forced, {:.1} tok/s, mask {:.0} µs/token)",
            out.decode.tokens,
            out.decode.forced,
            out.decode.tokens_per_s(),
            out.decode.mask_micros_per_token()
        );
    }
    Ok(())
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:<n>`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print JSON (the only output format; kept for symmetry with `muse bench --json`).
    #[arg(long)]
    json: bool,
}

fn run_bench(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        lm::threads::set_cpu_threads(n);
    }
    anyhow::ensure!(a.repeats >= 1, "--repeats must be at least 1");
    let lm = load(&a.model, &a.device)?;
    let md = Majordomo::new(Arc::new(lm))?;
    let report = majordomo::bench::run(&md, a.repeats)?;
    let _ = a.json;
    println!("{report}");
    Ok(())
}

fn run_serve(flags: majordomo::serve::ServeFlags) -> Result<()> {
    let cfg =
        majordomo::serve::ServeConfig::load(&flags).context("majordomo serve configuration")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(majordomo::serve::serve(cfg))
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Critique(a) => run_critique(a),
        Command::Serve(flags) => run_serve(flags),
        Command::Bench(a) => run_bench(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
