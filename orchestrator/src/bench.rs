//! `mm bench`: a turn's latency broken down (prime, bursts, commits, critique, persistence), the
//! orchestrator's own overhead, and throughput and per-turn latency at each level of concurrent
//! sessions (`--sessions 1,8`) on one muse replica, each session running `--turns` turns.

use mm_proto::orchestrator::v1 as pb;
use std::time::Instant;

/// The bench's turns: short, one attempt, and seeded, so that every level runs the same
/// turns (session `i` of a level replies as session `i` of every other level) and the levels
/// differ in concurrency only, not in what was written.
fn policy(session: usize) -> pb::DreamPolicy {
    pb::DreamPolicy {
        bursts: Some(2),
        steps: Some(4),
        commit_tokens: Some(16),
        max_attempts: Some(1),
        seed: Some(1 + session as u64),
        ..Default::default()
    }
}

/// One turn's figures, in milliseconds.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Breakdown {
    pub total: f64,
    pub prime: f64,
    pub bursts: f64,
    pub commits: f64,
    pub critique: f64,
    pub persist: f64,
    /// Waiting for a free muse replica slot (scheduling).
    pub queue: f64,
    /// Time inside the orchestrator: total minus model calls, queueing and persistence.
    pub overhead: f64,
}

async fn one_turn(
    mut c: crate::auth::Client,
    id: String,
    msg: String,
) -> anyhow::Result<Breakdown> {
    let req = pb::TurnRequest {
        session_id: id.clone(),
        message: msg,
        verbosity: pb::Verbosity::Sampled as i32,
        ..Default::default()
    };
    let mut stream = c.turn(req).await?.into_inner();
    let mut reply = None;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(pb::turn_event::Event::Reply(r)) => reply = Some(r),
            Some(pb::turn_event::Event::Error(e)) => anyhow::bail!("turn failed: {}", e.message),
            _ => {}
        }
    }
    let reply = reply.ok_or_else(|| anyhow::anyhow!("no reply"))?;
    let s = c
        .get_session(pb::GetSessionRequest { session_id: id })
        .await?
        .into_inner();
    let t = s
        .turns
        .last()
        .ok_or_else(|| anyhow::anyhow!("turn not persisted"))?;
    let mut b = Breakdown {
        total: reply.total_millis,
        persist: reply.persist_millis,
        ..Default::default()
    };
    for a in &t.attempts {
        b.prime += a.prime_millis;
        b.bursts += a.bursts.iter().map(|x| x.wall_millis).sum::<f64>();
        b.queue += a.queue_millis;
        b.commits += a.commit_millis;
        b.critique += a.critique_millis;
    }
    b.overhead =
        (b.total - b.prime - b.bursts - b.commits - b.critique - b.persist - b.queue).max(0.0);
    Ok(b)
}

fn mean(xs: &[Breakdown]) -> Breakdown {
    let n = xs.len().max(1) as f64;
    let mut m = Breakdown::default();
    for x in xs {
        m.total += x.total / n;
        m.prime += x.prime / n;
        m.bursts += x.bursts / n;
        m.commits += x.commits / n;
        m.critique += x.critique / n;
        m.persist += x.persist / n;
        m.queue += x.queue / n;
        m.overhead += x.overhead / n;
    }
    m
}

/// One session's turns, one after another (a conversation).
async fn conversation(
    client: crate::auth::Client,
    id: String,
    session: usize,
    turns: usize,
) -> anyhow::Result<Vec<Breakdown>> {
    let mut out = Vec::with_capacity(turns);
    for t in 0..turns {
        let msg = format!("Describe wave number {session} in one line, then its echo {t}.");
        out.push(one_turn(client.clone(), id.clone(), msg).await?);
    }
    Ok(out)
}

/// The `q`-quantile of turn totals (nearest rank).
fn quantile(xs: &[Breakdown], q: f64) -> f64 {
    let mut t: Vec<f64> = xs.iter().map(|b| b.total).collect();
    t.sort_by(f64::total_cmp);
    let i = ((t.len() as f64 * q).ceil() as usize).clamp(1, t.len().max(1)) - 1;
    t.get(i).copied().unwrap_or(0.0)
}

async fn new_session(client: &mut crate::auth::Client, i: usize) -> anyhow::Result<String> {
    Ok(client
        .create_session(pb::CreateSessionRequest {
            roles: None,
            policy: Some(policy(i)),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

/// Runs each level: `n` sessions at once, each `turns` turns long, after one warm-up turn (the
/// first turn pays for cold caches and page faults, which no level should carry).
pub async fn run(
    client: &mut crate::auth::Client,
    levels: &[usize],
    turns: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    let warm = new_session(client, 0).await?;
    one_turn(client.clone(), warm, "Say hello.".into()).await?;
    for &n in levels {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(new_session(client, i).await?);
        }
        let t = Instant::now();
        let tasks: Vec<_> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| tokio::spawn(conversation(client.clone(), id, i, turns)))
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await??);
        }
        let wall = t.elapsed().as_secs_f64();
        let m = mean(&all);
        out.insert(
            format!("sessions_{n}"),
            serde_json::json!({
                "turns": all.len(),
                "wall_s": wall,
                "turns_per_min": all.len() as f64 * 60.0 / wall,
                "p50_turn_ms": quantile(&all, 0.5),
                "p90_turn_ms": quantile(&all, 0.9),
                "mean_ms": m,
                "critique_fraction": m.critique / m.total.max(1e-9),
                "overhead_fraction": m.overhead / m.total.max(1e-9),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}
