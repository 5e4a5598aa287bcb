//! Generation: every (setting, prompt, sample) as one turn of a fresh session through the
//! orchestrator, judged as it arrives, appended to `samples.jsonl`. A rerun skips what the
//! file already holds, so an interrupted run resumes.

use crate::grid::Setting;
use crate::judge::Judge;
use anyhow::{Context, Result};
use mm_proto::orchestrator::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// One reply, with what made it and what the judge said.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub setting: String,
    pub prompt_index: usize,
    pub sample: usize,
    /// The turn's seed (settings share seeds per prompt and sample: common random numbers).
    pub seed: u64,
    pub prompt: String,
    pub reply: String,
    pub attempts: usize,
    /// The reply came from the plain last-resort attempt.
    pub plain_fallback: bool,
    /// Latent steps behind the chosen reply, and how many of them reached its text.
    pub latent_steps: u32,
    pub accepted: u32,
    pub verdict: String,
    pub flags: Vec<String>,
    pub majordomo_nll: Option<f32>,
    /// The judge's mean NLL of the reply given the prompt (nats/token).
    pub judge_nll: Option<f32>,
    pub turn_ms: f64,
}

impl Sample {
    fn key(&self) -> (String, usize, usize) {
        (self.setting.clone(), self.prompt_index, self.sample)
    }
}

/// The seed of a prompt's sample, the same for every setting.
pub fn seed_of(prompt_index: usize, sample: usize) -> u64 {
    0x5EED_0000_0000 + (prompt_index as u64) * 1000 + sample as u64
}

/// What `samples.jsonl` already holds (an unreadable last line, from an interrupted write,
/// is dropped).
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Runs every missing turn, `concurrency` at a time, appending to `samples.jsonl` in `out`.
pub async fn generate(
    client: orchestrator::auth::Client,
    settings: &[Setting],
    prompts: &[String],
    samples: usize,
    concurrency: usize,
    judge: Arc<Judge>,
    out: &Path,
) -> Result<Vec<Sample>> {
    let path = out.join("samples.jsonl");
    let mut done = read_samples(&path)?;
    let have: HashSet<_> = done.iter().map(Sample::key).collect();
    let mut todo = Vec::new();
    // Prompt by prompt, every setting in turn: a run cut short still compares the settings
    // on the same prompts.
    for (pi, p) in prompts.iter().enumerate() {
        for k in 0..samples {
            for s in settings {
                if !have.contains(&(s.name.clone(), pi, k)) {
                    todo.push((s.clone(), pi, p.clone(), k));
                }
            }
        }
    }
    let total = todo.len();
    if total > 0 {
        eprintln!(
            "mm eval: {total} turns to run ({} already in {})",
            done.len(),
            path.display()
        );
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = todo.into_iter();
    let mut finished = 0;
    loop {
        while tasks.len() < concurrency.max(1) {
            let Some((setting, pi, prompt, k)) = queue.next() else {
                break;
            };
            let (client, judge) = (client.clone(), judge.clone());
            tasks.spawn(async move { one(client, &setting, pi, &prompt, k, &judge).await });
        }
        let Some(result) = tasks.join_next().await else {
            break;
        };
        let sample = result??;
        writeln!(file, "{}", serde_json::to_string(&sample)?)?;
        file.flush()?;
        finished += 1;
        progress(finished, total, &sample, started.elapsed().as_secs_f64());
        done.push(sample);
    }
    if total > 0 {
        eprintln!();
    }
    Ok(done)
}

/// A one-line progress bar on stderr.
fn progress(n: usize, total: usize, last: &Sample, secs: f64) {
    const WIDTH: usize = 30;
    let filled = WIDTH * n / total.max(1);
    let eta = secs / n as f64 * (total - n) as f64;
    eprint!(
        "\r[{}{}] {n}/{total}  {:<24} eta {:>4.0} s ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        last.setting,
        eta
    );
    let _ = std::io::stderr().flush();
}

/// One turn of a fresh session, its transcript read back, the reply judged.
async fn one(
    mut c: orchestrator::auth::Client,
    setting: &Setting,
    prompt_index: usize,
    prompt: &str,
    sample: usize,
    judge: &Arc<Judge>,
) -> Result<Sample> {
    let seed = seed_of(prompt_index, sample);
    let session = c
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(setting.request(seed)),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("setting `{}`: {}", setting.name, s.message()))?
        .into_inner();
    let t0 = std::time::Instant::now();
    let mut stream = c
        .turn(pb::TurnRequest {
            session_id: session.id.clone(),
            message: prompt.to_string(),
            verbosity: pb::Verbosity::Quiet as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    while let Some(ev) = stream.message().await? {
        if let Some(pb::turn_event::Event::Error(e)) = ev.event {
            anyhow::bail!("setting `{}`: turn failed: {}", setting.name, e.message);
        }
    }
    let turn_ms = t0.elapsed().as_secs_f64() * 1e3;
    let s = c
        .get_session(pb::GetSessionRequest {
            session_id: session.id,
        })
        .await?
        .into_inner();
    let t = s
        .turns
        .into_iter()
        .next()
        .context("the turn was not stored")?;
    let a = &t.attempts[t.chosen_attempt.saturating_sub(1) as usize];
    let reply = t.reply.clone();
    let (judge, prompt_owned, reply_owned) = (judge.clone(), prompt.to_string(), reply.clone());
    let judge_nll = tokio::task::spawn_blocking(move || judge.nll(&prompt_owned, &reply_owned))
        .await??
        .map(|n| n.mean);
    Ok(Sample {
        setting: setting.name.clone(),
        prompt_index,
        sample,
        seed: t.seed,
        prompt: prompt.to_string(),
        reply,
        attempts: t.attempts.len(),
        plain_fallback: a.plain && !setting.plain,
        latent_steps: a.bursts.iter().map(|b| b.steps).sum(),
        accepted: a.bursts.iter().map(|b| b.accepted).sum(),
        verdict: a
            .verdict()
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_lowercase(),
        flags: a
            .flags()
            .map(|f| f.as_str_name().trim_start_matches("FLAG_").to_lowercase())
            .collect(),
        majordomo_nll: a.nll.is_finite().then_some(a.nll),
        judge_nll,
        turn_ms,
    })
}
