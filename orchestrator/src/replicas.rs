//! Replica pools: the muse and majordomo endpoints of each role, found by [`crate::discovery`]
//! and health-checked, each with a fair (FIFO) limit on concurrent work. A replica is picked
//! per call among the healthy ones that serve the wanted model, least loaded first.

use crate::discovery::{Discovery, Resolve};
use mm_proto::majordomo::v1 as mpb;
use mm_proto::muse::v1 as upb;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

/// HTTP/2 pings on every replica connection, idle or not: a replica that vanished without
/// closing its connection (a network cut, a frozen host) fails the call within about
/// `KEEPALIVE + KEEPALIVE_TIMEOUT`, not after the whole call timeout. The model services
/// compute off their async threads, so a busy replica still answers pings.
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Muse,
    Majordomo,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Muse => "muse",
            Role::Majordomo => "majordomo",
        }
    }
}

pub struct Replica {
    pub endpoint: String,
    pub role: Role,
    pub channel: Channel,
    /// The model it serves, as its Info reports (empty until the first successful check).
    model: Mutex<String>,
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    pub slots: Arc<Semaphore>,
}

impl Replica {
    /// A replica at `endpoint`, connected on first use.
    fn new(
        endpoint: String,
        role: Role,
        per_replica: usize,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(endpoint.clone())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            endpoint,
            role,
            channel,
            model: Mutex::new(String::new()),
            healthy: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            slots: Arc::new(Semaphore::new(per_replica)),
        })
    }

    pub fn model(&self) -> String {
        self.model.lock().expect("model lock").clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks the replica down until the next successful health check.
    pub fn mark_down(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }

    /// Asks the replica which model it serves; updates health.
    pub async fn check(&self, timeout: Duration) -> bool {
        let model = match self.role {
            Role::Muse => {
                let mut c = upb::muse_client::MuseClient::new(self.channel.clone());
                tokio::time::timeout(timeout, c.info(upb::InfoRequest {}))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|r| r.into_inner().model)
            }
            Role::Majordomo => {
                let mut c = mpb::majordomo_client::MajordomoClient::new(self.channel.clone());
                tokio::time::timeout(timeout, c.info(mpb::InfoRequest {}))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|r| r.into_inner().model)
            }
        };
        let ok = model.is_some();
        if let Some(m) = model {
            *self.model.lock().expect("model lock") = m;
        }
        self.healthy.store(ok, Ordering::Relaxed);
        ok
    }
}

/// Counts a call against a replica's load while alive.
pub struct Lease {
    pub replica: Arc<Replica>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A role's replicas, live: `dns://` entries are re-resolved by [`Pool::refresh`], which adds
/// and drops replicas. A dropped replica's calls finish on their lease's `Arc`; new calls no
/// longer see it.
pub struct Pool {
    pub role: Role,
    per_replica: usize,
    discovery: Discovery,
    /// One per endpoint, in the order of the entries; the same `Arc` as long as its endpoint
    /// stays, so its channel, health and load survive re-resolution.
    replicas: RwLock<Vec<Arc<Replica>>>,
    /// Calls waiting for a slot (a metric).
    waiting: Gauge,
    /// Replicas known (a metric).
    known: Gauge,
    /// Rotates which of equally loaded replicas a lease picks, so one-at-a-time traffic
    /// spreads over all of them instead of always reaching the first.
    next_pick: AtomicUsize,
}

impl Pool {
    /// The URL entries' replicas at once; `dns://` ones from the first [`Pool::refresh`].
    pub fn new(
        role: Role,
        entries: &[String],
        per_replica: usize,
        waiting: Gauge,
        known: Gauge,
    ) -> anyhow::Result<Self> {
        let discovery = Discovery::new(entries)?;
        let replicas = discovery
            .current()
            .into_iter()
            .map(|e| Ok(Arc::new(Replica::new(e, role, per_replica)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        known.set(replicas.len() as i64);
        Ok(Self {
            role,
            per_replica,
            discovery,
            replicas: RwLock::new(replicas),
            waiting,
            known,
            next_pick: AtomicUsize::new(0),
        })
    }

    /// The replicas now (a snapshot: a refresh may change the pool meanwhile).
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("replicas lock").clone()
    }

    /// Re-resolves the `dns://` entries, adding and dropping replicas, then checks every
    /// replica one after the other (a down one costs `timeout`), the ones just added too, so
    /// they serve from now on.
    pub async fn refresh(&self, dns: &impl Resolve, timeout: Duration) {
        self.resolve(dns).await;
        for r in self.replicas() {
            r.check(timeout).await;
        }
    }

    /// Re-resolves the `dns://` entries and makes the replicas match the endpoints.
    async fn resolve(&self, dns: &impl Resolve) {
        let wanted = self.discovery.refresh(dns).await;
        let mut replicas = self.replicas.write().expect("replicas lock");
        let mut next = Vec::with_capacity(wanted.len());
        for endpoint in wanted {
            if let Some(r) = replicas.iter().find(|r| r.endpoint == endpoint) {
                next.push(r.clone());
                continue;
            }
            match Replica::new(endpoint, self.role, self.per_replica) {
                Ok(r) => {
                    tracing::info!(
                        role = self.role.name(),
                        replica = r.endpoint,
                        "replica added"
                    );
                    next.push(Arc::new(r));
                }
                Err(e) => {
                    tracing::warn!(role = self.role.name(), error = %e, "unusable replica address")
                }
            }
        }
        for r in replicas
            .iter()
            .filter(|r| !next.iter().any(|n| Arc::ptr_eq(n, r)))
        {
            tracing::info!(
                role = self.role.name(),
                replica = r.endpoint,
                "replica dropped"
            );
        }
        self.known.set(next.len() as i64);
        *replicas = next;
    }

    /// Models the healthy replicas serve.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .replicas()
            .iter()
            .filter(|r| r.is_healthy())
            .map(|r| r.model())
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// The endpoint a call for `model` would go to next, leaving out `exclude`.
    pub fn next(&self, model: &str, exclude: &[String]) -> Option<String> {
        self.replicas()
            .iter()
            .find(|r| r.is_healthy() && r.model() == model && !exclude.contains(&r.endpoint))
            .map(|r| r.endpoint.clone())
    }

    /// A healthy replica serving `model` (any model when empty), leased until the lease drops:
    /// `prefer` when it fits and has a free slot (it holds the session's KV prefix: the prime
    /// then costs only the new tokens), else the least loaded, ties taken in turn. Waits (FIFO)
    /// for a slot; None when no replica fits.
    pub async fn lease(
        &self,
        model: &str,
        exclude: &[String],
        prefer: Option<&str>,
    ) -> Option<Lease> {
        let fits: Vec<Arc<Replica>> = self
            .replicas()
            .into_iter()
            .filter(|r| {
                r.is_healthy()
                    && (model.is_empty() || r.model() == model)
                    && !exclude.contains(&r.endpoint)
            })
            .collect();
        let preferred = prefer.and_then(|p| {
            fits.iter()
                .find(|r| r.endpoint == p && r.slots.available_permits() > 0)
        });
        let start = self.next_pick.fetch_add(1, Ordering::Relaxed) % fits.len().max(1);
        let candidate = preferred
            .or_else(|| {
                fits[start..]
                    .iter()
                    .chain(&fits[..start])
                    .min_by_key(|r| r.in_flight.load(Ordering::Relaxed))
            })?
            .clone();
        candidate.in_flight.fetch_add(1, Ordering::Relaxed);
        self.waiting.inc();
        let permit = candidate.slots.clone().acquire_owned().await;
        self.waiting.dec();
        let permit = match permit {
            Ok(p) => p,
            Err(_) => {
                candidate.in_flight.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
        };
        Some(Lease {
            replica: candidate,
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io;
    use std::net::SocketAddr;

    /// Answers each lookup of `muse:50051` with the next of a fixed sequence.
    struct Answers(Mutex<VecDeque<io::Result<Vec<SocketAddr>>>>);

    impl Resolve for Answers {
        async fn resolve(&self, name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            assert_eq!((name, port), ("muse", 50051));
            let next = self.0.lock().unwrap().pop_front();
            next.expect("an answer per lookup")
        }
    }

    fn endpoints(pool: &Pool) -> Vec<String> {
        pool.replicas().iter().map(|r| r.endpoint.clone()).collect()
    }

    fn replica(pool: &Pool, endpoint: &str) -> Arc<Replica> {
        pool.replicas()
            .into_iter()
            .find(|r| r.endpoint == endpoint)
            .unwrap_or_else(|| panic!("no {endpoint}"))
    }

    #[tokio::test]
    async fn re_resolution_adds_and_drops_replicas_keeping_the_unchanged_ones() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (a, b, c) = (
            addr("10.0.0.1:50051"),
            addr("10.0.0.2:50051"),
            addr("[fd00::3]:50051"),
        );
        let dns = Answers(Mutex::new(VecDeque::from([
            Ok(vec![b, a]),
            Ok(vec![c, a, b, a]),
            Ok(vec![b, c]),
            Err(io::Error::other("SERVFAIL")),
            Ok(vec![]),
        ])));
        let known = Gauge::default();
        let entries = ["http://static:1".into(), "dns://muse:50051".into()];
        let pool = Pool::new(Role::Muse, &entries, 1, Gauge::default(), known.clone()).unwrap();
        let (sa, sb, sc) = (
            "http://10.0.0.1:50051",
            "http://10.0.0.2:50051",
            "http://[fd00::3]:50051",
        );
        assert_eq!(endpoints(&pool), ["http://static:1"], "no lookup yet");
        let fixed = replica(&pool, "http://static:1");

        pool.resolve(&dns).await;
        assert_eq!(endpoints(&pool), ["http://static:1", sa, sb]);
        assert_eq!(known.get(), 3);
        let (first_a, first_b) = (replica(&pool, sa), replica(&pool, sb));
        // Only `a` is healthy: it takes the next call, which is still running when `a` goes.
        first_a.healthy.store(true, Ordering::Relaxed);
        let lease = pool.lease("", &[], None).await.expect("a serves");

        pool.resolve(&dns).await;
        assert_eq!(endpoints(&pool), ["http://static:1", sa, sb, sc]);
        assert!(Arc::ptr_eq(&replica(&pool, sa), &first_a));
        assert!(Arc::ptr_eq(&replica(&pool, sb), &first_b));

        pool.resolve(&dns).await;
        assert_eq!(endpoints(&pool), ["http://static:1", sb, sc], "a dropped");
        assert_eq!(known.get(), 3);
        assert!(Arc::ptr_eq(&replica(&pool, sb), &first_b));
        let c_now = replica(&pool, sc);
        assert_eq!(lease.replica.endpoint, sa, "a's call goes on");
        assert!(
            pool.lease("", &[], None).await.is_none(),
            "no new call picks a"
        );
        drop(lease);

        pool.resolve(&dns).await;
        assert_eq!(
            endpoints(&pool),
            ["http://static:1", sb, sc],
            "a failed lookup keeps the previous set"
        );
        assert!(Arc::ptr_eq(&replica(&pool, sc), &c_now));

        pool.resolve(&dns).await;
        assert_eq!(
            endpoints(&pool),
            ["http://static:1"],
            "an empty answer drops"
        );
        assert_eq!(known.get(), 1);
        assert!(Arc::ptr_eq(&replica(&pool, "http://static:1"), &fixed));
    }

    #[tokio::test]
    async fn one_call_at_a_time_reaches_every_replica_and_load_still_wins() {
        let entries: Vec<String> = (1..=3).map(|i| format!("http://r{i}:1")).collect();
        let pool = Pool::new(Role::Muse, &entries, 2, Gauge::default(), Gauge::default()).unwrap();
        for r in pool.replicas() {
            r.healthy.store(true, Ordering::Relaxed);
        }
        let mut picked: Vec<String> = Vec::new();
        for _ in 0..3 {
            picked.push(
                pool.lease("", &[], None)
                    .await
                    .unwrap()
                    .replica
                    .endpoint
                    .clone(),
            );
        }
        picked.sort();
        assert_eq!(
            picked, entries,
            "sequential calls take the replicas in turn"
        );
        // Two calls running on r1 and r2: every new call goes to idle r3.
        let busy = [
            pool.lease("", &["http://r3:1".into()], None).await.unwrap(),
            pool.lease("", &["http://r3:1".into()], None).await.unwrap(),
        ];
        assert_ne!(busy[0].replica.endpoint, busy[1].replica.endpoint);
        for _ in 0..3 {
            let l = pool.lease("", &[], None).await.unwrap();
            assert_eq!(l.replica.endpoint, "http://r3:1");
        }
    }

    #[tokio::test]
    async fn the_preferred_replica_takes_the_call_while_it_has_a_free_slot() {
        let entries: Vec<String> = (1..=2).map(|i| format!("http://r{i}:1")).collect();
        let pool = Pool::new(Role::Muse, &entries, 2, Gauge::default(), Gauge::default()).unwrap();
        for r in pool.replicas() {
            r.healthy.store(true, Ordering::Relaxed);
        }
        let r2 = Some("http://r2:1");
        // r2 holds the session's KV prefix: it is chosen though it is busier than idle r1.
        let first = pool.lease("", &[], r2).await.unwrap();
        let second = pool.lease("", &[], r2).await.unwrap();
        assert_eq!(
            [&first.replica.endpoint, &second.replica.endpoint],
            ["http://r2:1", "http://r2:1"]
        );
        // Its two slots are taken: the call goes elsewhere rather than wait.
        let third = pool.lease("", &[], r2).await.unwrap();
        assert_eq!(third.replica.endpoint, "http://r1:1");
        // A preference that is down or excluded is ignored.
        drop((first, second));
        let l = pool.lease("", &["http://r2:1".into()], r2).await.unwrap();
        assert_eq!(l.replica.endpoint, "http://r1:1");
    }
}
