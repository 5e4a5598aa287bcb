//! Replica pools: the muse and majordomo endpoints of each role, health-checked, each with a
//! fair (FIFO) limit on concurrent work. A replica is picked per call among the healthy ones
//! that serve the wanted model, least loaded first.

use mm_proto::majordomo::v1 as mpb;
use mm_proto::muse::v1 as upb;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

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

pub struct Pool {
    pub role: Role,
    pub replicas: Vec<Arc<Replica>>,
    /// Calls waiting for a slot (a metric).
    waiting: Gauge,
}

impl Pool {
    pub fn new(
        role: Role,
        endpoints: &[String],
        per_replica: usize,
        waiting: Gauge,
    ) -> anyhow::Result<Self> {
        let replicas = endpoints
            .iter()
            .map(|e| {
                let channel = Endpoint::from_shared(e.clone())?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                Ok(Arc::new(Replica {
                    endpoint: e.clone(),
                    role,
                    channel,
                    model: Mutex::new(String::new()),
                    healthy: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    slots: Arc::new(Semaphore::new(per_replica)),
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            role,
            replicas,
            waiting,
        })
    }

    /// Checks every replica once, one after the other (a down one costs `timeout`).
    pub async fn check_all(&self, timeout: Duration) {
        for r in &self.replicas {
            r.check(timeout).await;
        }
    }

    /// Models the healthy replicas serve.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .replicas
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
        self.replicas
            .iter()
            .find(|r| r.is_healthy() && r.model() == model && !exclude.contains(&r.endpoint))
            .map(|r| r.endpoint.clone())
    }

    /// A healthy replica serving `model` (any model when empty), least loaded first, leased
    /// until the lease drops. Waits (FIFO) for a slot; None when no replica fits.
    pub async fn lease(&self, model: &str, exclude: &[String]) -> Option<Lease> {
        let candidate = self
            .replicas
            .iter()
            .filter(|r| {
                r.is_healthy()
                    && (model.is_empty() || r.model() == model)
                    && !exclude.contains(&r.endpoint)
            })
            .min_by_key(|r| r.in_flight.load(Ordering::Relaxed))?
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
