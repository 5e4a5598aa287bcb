//! `mm bench`: a turn's latency broken down (prime, bursts, commits, critique, persistence), the
//! orchestrator's own overhead, and throughput with 1, 4 and 16 concurrent sessions on one muse
//! replica.

use mm_proto::orchestrator::v1 as pb;
use std::time::Instant;

fn policy() -> pb::DreamPolicy {
    pb::DreamPolicy {
        bursts: Some(2),
        steps: Some(4),
        commit_tokens: Some(16),
        max_attempts: Some(1),
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

pub async fn run(
    client: &mut crate::auth::Client,
    levels: &[usize],
) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for &n in levels {
        let mut ids = Vec::new();
        for _ in 0..n {
            let s = client
                .create_session(pb::CreateSessionRequest {
                    roles: None,
                    policy: Some(policy()),
                    ..Default::default()
                })
                .await?
                .into_inner();
            ids.push(s.id);
        }
        let t = Instant::now();
        let tasks: Vec<_> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                tokio::spawn(one_turn(
                    client.clone(),
                    id,
                    format!("Describe wave number {i} in one line."),
                ))
            })
            .collect();
        let mut turns = Vec::new();
        for task in tasks {
            turns.push(task.await??);
        }
        let wall = t.elapsed().as_secs_f64();
        let m = mean(&turns);
        out.insert(
            format!("sessions_{n}"),
            serde_json::json!({
                "turns": n,
                "wall_s": wall,
                "turns_per_min": n as f64 * 60.0 / wall,
                "mean_ms": m,
                "overhead_fraction": m.overhead / m.total.max(1e-9),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}
