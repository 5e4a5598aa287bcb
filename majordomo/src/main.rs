//! `majordomo`: critique a draft from the command line, or serve the majordomo over gRPC.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use majordomo::review::{CritiqueRequest, Majordomo};
use mm_kit::model::ModelArgs;
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
    #[command(flatten)]
    model: ModelArgs,
    /// What the user asked for.
    #[arg(long)]
    request: String,
    /// The draft to critique (or --draft-file, or standard input).
    #[arg(long, conflicts_with = "draft_file")]
    draft: Option<String>,
    /// A file holding the draft.
    #[arg(long)]
    draft_file: Option<std::path::PathBuf>,
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

fn run_critique(a: CritiqueArgs) -> Result<()> {
    anyhow::ensure!(
        !a.request.trim().is_empty(),
        "--request is empty: say what the user asked for"
    );
    let draft = read_draft(&a)?;
    let lm = a.model.load()?;
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
        for i in &c.issues {
            println!("issue [{}]: {}", i.kind.as_str(), i.detail);
        }
        println!(
            "advice: noise {:?}, steps {:?}",
            c.advice.noise, c.advice.steps
        );
        if let Some(nll) = out.nll {
            println!(
                "fluency: {:.3} nats/token over {} tokens",
                nll.mean, nll.tokens
            );
        }
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
    #[command(flatten)]
    model: ModelArgs,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print JSON (the only output format; kept for symmetry with `muse bench --json`).
    #[arg(long)]
    json: bool,
}

fn run_bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.repeats >= 1, "--repeats must be at least 1");
    let lm = a.model.load()?;
    let md = Majordomo::new(Arc::new(lm))?;
    let report = majordomo::bench::run(&md, a.repeats)?;
    let _ = a.json;
    println!("{report}");
    Ok(())
}

fn run_serve(flags: majordomo::serve::ServeFlags) -> Result<()> {
    mm_kit::alloc::limit_arenas();
    let cfg = majordomo::serve::ServeConfig::load(&flags, None)
        .context("majordomo serve configuration")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(majordomo::serve::serve(cfg))
}

fn main() {
    mm_kit::trace::init();
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
