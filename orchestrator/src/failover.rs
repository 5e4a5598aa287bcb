//! Lease, call, fail over: one replica of a role serves a call; when it fails on its side
//! (UNAVAILABLE, INTERNAL, a missed deadline …) it is marked down, the failover is reported, and
//! another replica of the same model takes the call. The request's own errors return at once;
//! a busy replica (RESOURCE_EXHAUSTED) is asked again after a pause, a bounded number of times.

use crate::replicas::{Pool, Replica};
use crate::turn::TurnContext;
use mm_proto::orchestrator::v1 as pb;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// How often a busy replica is asked again, and after what pause (a minute in all).
const BUSY_RETRIES: u32 = 120;
const BUSY_PAUSE: Duration = Duration::from_millis(500);

/// Whether an error is the replica's fault (retry elsewhere) rather than the request's.
pub fn replica_failed(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::DeadlineExceeded | Code::Aborted
    )
}

/// Runs `call` on a healthy replica of `pool` serving `model` (leased while the call runs;
/// `prefer` first, see [`Pool::lease`]), failing over as the module says. Returns the result
/// and the endpoint that gave it.
pub async fn with_failover<T, F, Fut>(
    ctx: &TurnContext<'_>,
    pool: &Pool,
    model: &str,
    prefer: Option<&str>,
    mut call: F,
) -> Result<(T, String), Status>
where
    F: FnMut(Arc<Replica>) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut tried: Vec<String> = Vec::new();
    let mut busy = 0;
    loop {
        let Some(lease) = pool.lease(model, &tried, prefer).await else {
            return Err(Status::unavailable(format!(
                "no healthy {} replica serves `{model}` (tried: {}); the session is unchanged — retry when a replica is back",
                pool.role.name(),
                if tried.is_empty() { "none".to_string() } else { tried.join(", ") }
            )));
        };
        let endpoint = lease.replica.endpoint.clone();
        match call(lease.replica.clone()).await {
            Ok(v) => return Ok((v, endpoint)),
            Err(e) if e.code() == Code::ResourceExhausted && busy < BUSY_RETRIES => {
                busy += 1;
                drop(lease);
                tokio::time::sleep(BUSY_PAUSE).await;
            }
            Err(e) if replica_failed(&e) => {
                tracing::warn!(replica = endpoint, error = %e, "{} replica failed; failing over", pool.role.name());
                lease.replica.mark_down();
                ctx.metrics.failover();
                tried.push(endpoint.clone());
                ctx.emit(pb::turn_event::Event::Failover(pb::Failover {
                    from_replica: endpoint,
                    to_replica: pool.next(model, &tried).unwrap_or_default(),
                    reason: e.message().to_string(),
                }))
                .await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `future`, or DEADLINE_EXCEEDED naming `what` after `timeout` (a replica failure).
pub async fn deadline<T>(
    timeout: Duration,
    what: &str,
    future: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no answer to {what} within {timeout:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_faults_fail_over_and_the_requests_own_mistakes_do_not() {
        // The model services map device and layout faults to UNAVAILABLE and INTERNAL
        // (mm-kit's status mapping): those move the call to another replica.
        for s in [
            Status::unavailable("device error: lost"),
            Status::internal("internal layout error: q has 3 columns"),
            Status::deadline_exceeded("slow"),
        ] {
            assert!(replica_failed(&s), "{s:?}");
        }
        for s in [
            Status::invalid_argument("burst.top_p must be in (0, 1]"),
            Status::out_of_range("context overflow"),
            Status::resource_exhausted("busy"),
        ] {
            assert!(!replica_failed(&s), "{s:?}");
        }
    }
}
