//! Where a role's replicas are: each configured entry is either one URL (`http://host:port`,
//! `https://…`) or `dns://NAME:PORT`, every address NAME resolves to (A and AAAA) being one
//! replica at `http://IP:PORT`. That is what a Kubernetes headless Service or a Docker network
//! alias answers, so scaling a role needs no orchestrator restart: [`Discovery::refresh`]
//! resolves again and the pool adds and drops replicas to match.
//!
//! A lookup that fails keeps that name's previous addresses (a DNS hiccup must not empty the
//! pool); one that succeeds replaces them, so replicas gone from the answer are dropped.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// What a replica entry must look like, for the messages that refuse one.
const FORMS: &str = "http(s)://host:port or dns://name:port";

/// A replica entry that is neither a URL nor `dns://name:port`.
#[derive(Debug, thiserror::Error)]
#[error("replica `{entry}` must be {FORMS}: {why}")]
pub struct EntryError {
    pub entry: String,
    pub why: &'static str,
}

/// One configured replica entry of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// One replica at this URL.
    Url(String),
    /// One replica per address of `name`, on `port`.
    Dns { name: String, port: u16 },
}

impl Entry {
    pub fn parse(entry: &str) -> Result<Self, EntryError> {
        let refuse = |why| EntryError {
            entry: entry.to_string(),
            why,
        };
        if entry.starts_with("http://") || entry.starts_with("https://") {
            return Ok(Entry::Url(entry.to_string()));
        }
        let Some(rest) = entry.strip_prefix("dns://") else {
            return Err(refuse("unknown scheme"));
        };
        let Some((name, port)) = rest.rsplit_once(':') else {
            return Err(refuse("the port is missing"));
        };
        if name.is_empty() || name.contains([':', '/', '[', ']']) {
            return Err(refuse("the name must be a host name"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Entry::Dns {
                name: name.to_string(),
                port,
            }),
            _ => Err(refuse("the port must be 1..65535")),
        }
    }
}

/// Looks a name up; a trait so that re-resolution can be tested with changing answers.
pub trait Resolve: Sync {
    /// Every address of `name`, with `port`; an error when the lookup itself failed.
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;
}

/// The system resolver (`getaddrinfo`, via [`tokio::net::lookup_host`]): what Kubernetes and
/// Docker's embedded DNS serve, `/etc/hosts` included.
pub struct SystemResolver {
    /// How long a lookup may take before it counts as failed.
    pub timeout: Duration,
}

impl Resolve for SystemResolver {
    async fn resolve(&self, name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let addrs = tokio::time::timeout(self.timeout, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))??;
        Ok(addrs.collect())
    }
}

/// A role's entries and, per `dns://` entry, the endpoints of its last successful lookup.
pub struct Discovery {
    entries: Vec<Entry>,
    /// Parallel to `entries`: a URL's own endpoint, a name's last answer (empty until one).
    endpoints: Mutex<Vec<Vec<String>>>,
}

impl Discovery {
    pub fn new(entries: &[String]) -> Result<Self, EntryError> {
        let entries = entries
            .iter()
            .map(|e| Entry::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = entries
            .iter()
            .map(|e| match e {
                Entry::Url(url) => vec![url.clone()],
                Entry::Dns { .. } => Vec::new(),
            })
            .collect();
        Ok(Self {
            entries,
            endpoints: Mutex::new(endpoints),
        })
    }

    /// The endpoints known now, in entry order, each once.
    pub fn current(&self) -> Vec<String> {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        let mut seen = HashSet::new();
        endpoints
            .iter()
            .flatten()
            .filter(|e| seen.insert(*e))
            .cloned()
            .collect()
    }

    /// Resolves every `dns://` entry again, then returns [`Self::current`]. A failed lookup is
    /// logged and keeps that name's previous endpoints.
    pub async fn refresh(&self, dns: &impl Resolve) -> Vec<String> {
        for (i, entry) in self.entries.iter().enumerate() {
            let Entry::Dns { name, port } = entry else {
                continue;
            };
            match dns.resolve(name, *port).await {
                Ok(mut addrs) => {
                    // Sorted: an answer's order rotates, the pool's order need not.
                    addrs.sort();
                    addrs.dedup();
                    self.endpoints.lock().expect("endpoints lock")[i] =
                        addrs.iter().map(|a| format!("http://{a}")).collect();
                }
                Err(e) => tracing::warn!(
                    name = %name,
                    error = %e,
                    "cannot resolve replicas; keeping the previous addresses"
                ),
            }
        }
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_urls_or_dns_names_with_a_port() {
        assert_eq!(
            Entry::parse("dns://muse.default.svc:50051").unwrap(),
            Entry::Dns {
                name: "muse.default.svc".into(),
                port: 50051
            }
        );
        assert_eq!(
            Entry::parse("http://[::1]:1").unwrap(),
            Entry::Url("http://[::1]:1".into())
        );
        for bad in [
            "muse:50051",
            "grpc://muse:1",
            "dns://muse",
            "dns://:50051",
            "dns://muse:0",
            "dns://muse:65536",
            "dns://muse:",
            "dns:///muse:1",
            "dns://[::1]:1",
        ] {
            let e = Entry::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(FORMS), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system_resolver_to_loopback() {
        let d = Discovery::new(&["dns://localhost:50999".into()]).unwrap();
        assert!(d.current().is_empty(), "nothing before the first lookup");
        let dns = SystemResolver {
            timeout: Duration::from_secs(5),
        };
        let endpoints = d.refresh(&dns).await;
        assert!(!endpoints.is_empty());
        for e in &endpoints {
            assert!(
                e == "http://127.0.0.1:50999" || e == "http://[::1]:50999",
                "{endpoints:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_name_is_an_error() {
        let dns = SystemResolver {
            timeout: Duration::from_secs(5),
        };
        assert!(dns.resolve("no-such-host.invalid", 1).await.is_err());
    }
}
