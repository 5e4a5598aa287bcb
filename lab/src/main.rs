//! `mm-eval` (also `mm eval`): the dream lab. Runs every setting of a grid on a prompt set
//! through the real services (started locally like `mm run`, or `--orchestrator`), judges each
//! reply with a model other than the muse, and writes `samples.jsonl`, `results.json`,
//! `results.md` and `frontier.svg` to `--out`. `--experiment translation` writes seed 003's
//! report instead.

mod embed;
mod experiment;
mod grid;
mod judge;
mod metrics;
mod plot;
mod report;
mod run;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use orchestrator::local;
use std::path::PathBuf;
use std::sync::Arc;

/// The default prompt set: 44 creative prompts, one a line.
const PROMPTS: &str = include_str!("../prompts.txt");

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Experiment {
    /// Seed 003: what concept vectors hold, and the model reading its own vectors.
    Translation,
}

#[derive(Parser)]
#[command(
    name = "mm eval",
    about = "The dream lab: creativity against coherence for dream settings and plain sampling"
)]
struct Args {
    /// Prompts, one a line (default: the 44 creative prompts shipped in lab/prompts.txt).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Samples per prompt and setting (diversity is measured across them).
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Where results go; a run resumes from the samples.jsonl it finds there.
    #[arg(long, default_value = "eval-out")]
    out: PathBuf,
    /// `quick` (CI-sized), `full` (EVAL.md), or a TOML file of [[setting]] tables.
    #[arg(long, default_value = "quick")]
    grid: String,
    #[arg(long, default_value = "smollm2-135m")]
    muse_model: String,
    #[arg(long, default_value = "smollm2-135m")]
    majordomo_model: String,
    /// The judge of fluency (default: the other default model than the muse).
    #[arg(long)]
    judge_model: Option<String>,
    /// A running orchestrator instead of local services.
    #[arg(long)]
    orchestrator: Option<String>,
    /// Turns in flight at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// CPU threads per model (services and judge).
    #[arg(long)]
    threads: Option<usize>,
    /// Run an experiment instead of the grid.
    #[arg(long, value_enum)]
    experiment: Option<Experiment>,
}

fn prompts(a: &Args) -> Result<Vec<String>> {
    let text = match &a.prompts {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("--prompts {}", p.display()))?
        }
        None => PROMPTS.to_string(),
    };
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(
        !prompts.is_empty(),
        "--prompts holds no prompt (one a line)"
    );
    anyhow::ensure!(
        prompts.iter().all(|p| p.chars().count() <= 4000),
        "--prompts: a prompt is longer than 4000 characters"
    );
    Ok(prompts)
}

fn settings(grid: &str) -> Result<Vec<grid::Setting>> {
    Ok(match grid {
        "quick" => grid::quick(),
        "full" => grid::full(),
        file => {
            grid::from_toml(&std::fs::read_to_string(file).with_context(|| {
                format!("--grid {file}: not quick, full or a readable TOML file")
            })?)
            .with_context(|| format!("--grid {file}"))?
        }
    })
}

async fn run(a: Args) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    if let Some(Experiment::Translation) = a.experiment {
        let lm = mm_kit::model::load(&a.muse_model, "cpu", a.threads, None)?;
        let md = tokio::task::spawn_blocking(move || experiment::translation(&lm)).await??;
        std::fs::write(a.out.join("translation.md"), &md)?;
        println!("{md}");
        return Ok(());
    }
    anyhow::ensure!(a.samples >= 1, "--samples must be at least 1");
    anyhow::ensure!(a.concurrency >= 1, "--concurrency must be at least 1");
    let prompts = prompts(&a)?;
    let settings = settings(&a.grid)?;
    let judge_model = a
        .judge_model
        .clone()
        .unwrap_or_else(|| judge::default_for(&a.muse_model).to_string());
    eprintln!("mm eval: judge {judge_model}; loading it and the sentence embedder…");
    let (jm, threads) = (judge_model.clone(), a.threads);
    let (judge, embedder) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((judge::Judge::load(&jm, threads)?, embed::Embedder::load()?))
    })
    .await??;
    let (addr, _services) = match &a.orchestrator {
        Some(addr) => (addr.clone(), None),
        None => {
            let services = local::Services::start(&local::Launch {
                muse_model: a.muse_model.clone(),
                majordomo_model: a.majordomo_model.clone(),
                listen: "127.0.0.1:0".into(),
                http: "127.0.0.1:0".into(),
                store: a.out.join("sessions.redb").display().to_string(),
                threads: a.threads,
                env: Vec::new(),
            })
            .await?;
            (services.orchestrator.clone(), Some(services))
        }
    };
    let client = orchestrator::auth::connect(&addr).await?;
    let samples = run::generate(
        client,
        &settings,
        &prompts,
        a.samples,
        a.concurrency,
        Arc::new(judge),
        &a.out,
    )
    .await?;
    let wanted: Vec<run::Sample> = samples
        .into_iter()
        .filter(|s| s.prompt_index < prompts.len() && s.sample < a.samples)
        .collect();
    let figures = tokio::task::spawn_blocking({
        let settings = settings.clone();
        move || report::figures(&settings, &wanted, &embedder)
    })
    .await??;
    let report = report::Report {
        muse_model: a.muse_model.clone(),
        majordomo_model: a.majordomo_model.clone(),
        judge_model,
        prompts: prompts.len(),
        samples_per_prompt: a.samples,
        settings: figures,
    };
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report::markdown(&report);
    std::fs::write(a.out.join("results.md"), &md)?;
    plot::frontier(
        &report.settings,
        &format!("muse {} · judge {}", report.muse_model, report.judge_model),
        &a.out.join("frontier.svg"),
    )?;
    println!("{md}");
    eprintln!("mm eval: wrote {}", a.out.display());
    Ok(())
}

fn main() {
    mm_kit::trace::init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
