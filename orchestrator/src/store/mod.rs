//! The session store: session id → the `orchestrator.v1.Session` message, prost-encoded, and
//! a turn lease per session, so one turn of a session runs at a time. Two backends: an
//! embedded redb file (the default: one orchestrator, nothing to run beside it) and PostgreSQL
//! (`postgres://…`: several orchestrators share the sessions, any of them serves any session).
//! Writes are durable when they return; everything else (KV caches) is rebuilt from this text.
//!
//! Sessions stored before verdicts and stop reasons became enums carry them as text; they are
//! read in both forms (see [`upgrade`]) and written in the new one.

mod file;
mod pg;

use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;
use prost::Message;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store: {0}")]
    Db(String),
    /// The server is unreachable or did not answer: a retry may succeed.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store: {0}")]
    Config(String),
    #[error("session store holds an unreadable record for `{0}`")]
    Corrupt(String),
}

/// Where the sessions live: a redb file, or a PostgreSQL database named by its URL.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Location {
    File(PathBuf),
    Postgres(String),
}

impl TryFrom<String> for Location {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("store is empty: give a redb file path or a postgres:// URL".into());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Location::Postgres(s))
        } else {
            Ok(Location::File(s.into()))
        }
    }
}

impl From<Location> for String {
    fn from(l: Location) -> String {
        match l {
            Location::File(p) => p.display().to_string(),
            Location::Postgres(url) => url,
        }
    }
}

impl std::fmt::Display for Location {
    /// The path, or the URL without its password (this goes to logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => {
                // postgres://user:password@host/db → postgres://user:***@host/db
                let redacted = url.split_once("://").and_then(|(scheme, rest)| {
                    let (userinfo, host) = rest.rsplit_once('@')?;
                    let (user, _password) = userinfo.split_once(':')?;
                    Some(format!("{scheme}://{user}:***@{host}"))
                });
                write!(f, "{}", redacted.as_deref().unwrap_or(url))
            }
        }
    }
}

enum Backend {
    File(file::File),
    Postgres(pg::Pg),
}

pub struct Store {
    backend: Backend,
    /// This orchestrator's name in lease rows (random per process).
    holder: String,
    /// How long a turn lease lasts unless renewed; a dead orchestrator's runs out after this.
    lease_ttl: Duration,
    /// Sessions with a turn running in this process.
    running: Arc<Mutex<HashSet<String>>>,
}

/// How a request for a session's turn lease ended.
pub enum Lease {
    Acquired(TurnLease),
    /// A turn of the session is running, here or on another orchestrator.
    Held,
    Missing,
}

/// The right to run one turn of a session, renewed in the background while held. Dropping it
/// ends the renewal (the lease then runs out); [`Store::release`] ends it at once.
pub struct TurnLease {
    id: String,
    running: Arc<Mutex<HashSet<String>>>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for TurnLease {
    fn drop(&mut self) {
        if let Some(r) = &self.renewal {
            r.abort();
        }
        self.running.lock().expect("running lock").remove(&self.id);
    }
}

/// How an update ended.
pub enum Updated {
    Done(Box<pb::Session>),
    Missing,
    /// The lease fencing the update was taken over (it had expired): nothing was written.
    LeaseLost,
}

/// How a delete ended.
pub enum Deleted {
    Done,
    Missing,
    /// A turn holds the session's lease.
    Leased,
}

impl Store {
    /// Opens the store at `location`, creating it (file) or migrating its schema (PostgreSQL).
    pub async fn open(location: &Location, lease_ttl: Duration) -> Result<Self, StoreError> {
        let backend = match location {
            Location::File(path) => Backend::File(file::File::open(path)?),
            Location::Postgres(url) => Backend::Postgres(pg::Pg::open(url).await?),
        };
        Ok(Self {
            backend,
            holder: mm_kit::ids::random_id(),
            lease_ttl,
            running: Arc::default(),
        })
    }

    /// Writes a session whole (a new one, or one no turn is changing).
    pub async fn put(&self, s: &pb::Session) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(f) => f.put(s),
            Backend::Postgres(p) => p.put(s).await,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<pb::Session>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.get(id),
            Backend::Postgres(p) => p.get(id).await,
        }
    }

    /// Every session, newest first.
    pub async fn list(&self) -> Result<Vec<pb::Session>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.list(),
            Backend::Postgres(p) => p.list().await,
        }
    }

    /// Changes a stored session atomically (what others wrote meanwhile is kept). With `lease`,
    /// only while that lease is still this orchestrator's.
    pub async fn update(
        &self,
        id: &str,
        lease: Option<&TurnLease>,
        change: impl FnMut(&mut pb::Session),
    ) -> Result<Updated, StoreError> {
        match &self.backend {
            // One process owns the file, so its leases cannot be taken over.
            Backend::File(f) => Ok(match f.update(id, change)? {
                Some(s) => Updated::Done(Box::new(s)),
                None => Updated::Missing,
            }),
            Backend::Postgres(p) => {
                let fence = lease.map(|_| self.holder.as_str());
                p.update(id, fence, change).await
            }
        }
    }

    /// Removes a session, unless a turn of it is running.
    pub async fn delete(&self, id: &str) -> Result<Deleted, StoreError> {
        if self.running.lock().expect("running lock").contains(id) {
            return Ok(Deleted::Leased);
        }
        match &self.backend {
            Backend::File(f) => Ok(if f.delete(id)? {
                Deleted::Done
            } else {
                Deleted::Missing
            }),
            Backend::Postgres(p) => p.delete(id).await,
        }
    }

    /// The lease to run a turn of session `id`.
    pub async fn lease(&self, id: &str) -> Result<Lease, StoreError> {
        if !self
            .running
            .lock()
            .expect("running lock")
            .insert(id.to_string())
        {
            return Ok(Lease::Held);
        }
        // From here the guard gives the local claim back on every way out.
        let mut lease = TurnLease {
            id: id.to_string(),
            running: self.running.clone(),
            renewal: None,
        };
        match &self.backend {
            Backend::File(f) => {
                if f.get(id)?.is_none() {
                    return Ok(Lease::Missing);
                }
            }
            Backend::Postgres(p) => match p.lease(id, &self.holder, self.lease_ttl).await? {
                pg::Leased::Acquired => lease.renewal = Some(self.renew(p.clone(), id)),
                pg::Leased::Held => return Ok(Lease::Held),
                pg::Leased::Missing => return Ok(Lease::Missing),
            },
        }
        Ok(Lease::Acquired(lease))
    }

    /// Renews a lease every third of its lifetime until aborted or lost.
    fn renew(&self, pg: pg::Pg, id: &str) -> tokio::task::JoinHandle<()> {
        let (id, holder, ttl) = (id.to_string(), self.holder.clone(), self.lease_ttl);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match pg.renew(&id, &holder, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(session = id, "turn lease lost: another orchestrator took it over; this turn's result will not be stored");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(session = id, error = %e, "turn lease not renewed; retrying")
                    }
                }
            }
        })
    }

    /// Ends a turn's lease now, so the session's next turn may start anywhere at once.
    pub async fn release(&self, lease: TurnLease) {
        if let Backend::Postgres(p) = &self.backend {
            if let Err(e) = p.release(&lease.id, &self.holder).await {
                tracing::warn!(session = lease.id, error = %e, "turn lease not released; it runs out by itself");
            }
        }
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<pb::Session, StoreError> {
    let mut s = pb::Session::decode(bytes).map_err(|_| StoreError::Corrupt(id.into()))?;
    upgrade(&mut s);
    Ok(s)
}

/// Moves the text forms of sessions stored before the enums into the enums.
pub fn upgrade(s: &mut pb::Session) {
    for a in s.turns.iter_mut().flat_map(|t| &mut t.attempts) {
        if !a.legacy_verdict.is_empty() {
            let v = match a.legacy_verdict.as_str() {
                "accept" => pb::Verdict::Accept,
                "reject" => pb::Verdict::Reject,
                _ => pb::Verdict::Revise,
            };
            a.verdict = v as i32;
            a.legacy_verdict.clear();
        }
        for b in &mut a.bursts {
            if !b.legacy_stop_reason.is_empty() {
                let stop = upb::BurstStop::from_str_name(&format!(
                    "BURST_STOP_{}",
                    b.legacy_stop_reason.to_uppercase()
                ))
                .unwrap_or(upb::BurstStop::Unspecified);
                b.stop = stop as i32;
                b.legacy_stop_reason.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn fresh_database() -> Location {
        Location::Postgres(mm_kit::peers::postgres_database().expect("a test database"))
    }

    fn session(id: &str, created: i64) -> pb::Session {
        pb::Session {
            id: id.into(),
            created_unix_ms: created,
            owner: "default".into(),
            ..Default::default()
        }
    }

    /// Both backends keep what they were given, newest first, across reopening.
    #[tokio::test]
    async fn sessions_round_trip_update_and_survive_reopening_on_both_stores() {
        let dir = tempfile::tempdir().unwrap();
        let file = Location::File(dir.path().join("s/sessions.redb"));
        for location in [file, fresh_database()] {
            let a = pb::Session {
                summary: "x".into(),
                ..session("a", 1)
            };
            {
                let store = Store::open(&location, TTL).await.unwrap();
                store.put(&a).await.unwrap();
                store.put(&session("b", 2)).await.unwrap();
            }
            let store = Store::open(&location, TTL).await.unwrap();
            assert_eq!(store.get("a").await.unwrap().unwrap(), a, "{location}");
            let ids = |v: Vec<pb::Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
            assert_eq!(ids(store.list().await.unwrap()), ["b", "a"], "{location}");
            let Updated::Done(s) = store
                .update("a", None, |s| s.summary.push('y'))
                .await
                .unwrap()
            else {
                panic!("{location}: update of a stored session")
            };
            assert_eq!(s.summary, "xy");
            assert_eq!(store.get("a").await.unwrap().unwrap().summary, "xy");
            assert!(matches!(
                store.update("nope", None, |_| {}).await.unwrap(),
                Updated::Missing
            ));
            assert!(matches!(store.delete("a").await.unwrap(), Deleted::Done));
            assert!(matches!(store.delete("a").await.unwrap(), Deleted::Missing));
            assert!(store.get("a").await.unwrap().is_none(), "{location}");
        }
    }

    /// One turn per session at a time, on both backends: a second lease is refused, the session
    /// cannot be deleted under a turn, and releasing lets the next turn in.
    #[tokio::test]
    async fn one_turn_of_a_session_at_a_time_on_both_stores() {
        let dir = tempfile::tempdir().unwrap();
        let file = Location::File(dir.path().join("sessions.redb"));
        for location in [file, fresh_database()] {
            let store = Store::open(&location, TTL).await.unwrap();
            store.put(&session("a", 1)).await.unwrap();
            let Lease::Acquired(lease) = store.lease("a").await.unwrap() else {
                panic!("{location}: the first lease")
            };
            assert!(matches!(store.lease("a").await.unwrap(), Lease::Held));
            assert!(matches!(store.delete("a").await.unwrap(), Deleted::Leased));
            assert!(matches!(store.lease("zz").await.unwrap(), Lease::Missing));
            let pushed = store
                .update("a", Some(&lease), |s| s.turns.push(pb::Turn::default()))
                .await
                .unwrap();
            assert!(matches!(pushed, Updated::Done(ref s) if s.turns.len() == 1));
            store.release(lease).await;
            assert!(matches!(
                store.lease("a").await.unwrap(),
                Lease::Acquired(_)
            ));
        }
    }

    /// Two orchestrators on one PostgreSQL store: B cannot start a turn of a session A is
    /// running; when A dies (its lease no longer renewed) the lease runs out, B takes over, and
    /// A's late result is refused rather than written over B's.
    #[tokio::test]
    async fn a_dead_orchestrators_lease_runs_out_and_its_late_write_is_refused() {
        let location = fresh_database();
        let ttl = Duration::from_millis(1500);
        let a = Store::open(&location, ttl).await.unwrap();
        let b = Store::open(&location, ttl).await.unwrap();
        a.put(&session("s", 1)).await.unwrap();
        let Lease::Acquired(mut held_by_a) = a.lease("s").await.unwrap() else {
            panic!("A's lease")
        };
        // A's renewal keeps the lease alive past its first lifetime.
        tokio::time::sleep(ttl * 2).await;
        assert!(matches!(b.lease("s").await.unwrap(), Lease::Held));
        assert!(matches!(b.delete("s").await.unwrap(), Deleted::Leased));
        // A stops renewing (dies); the lease runs out and B takes the session over.
        held_by_a.renewal.take().unwrap().abort();
        tokio::time::sleep(ttl + Duration::from_millis(500)).await;
        let Lease::Acquired(held_by_b) = b.lease("s").await.unwrap() else {
            panic!("B's lease after A's ran out")
        };
        let late = a
            .update("s", Some(&held_by_a), |s| s.summary = "A".into())
            .await
            .unwrap();
        assert!(matches!(late, Updated::LeaseLost));
        let Updated::Done(s) = b
            .update("s", Some(&held_by_b), |s| s.summary = "B".into())
            .await
            .unwrap()
        else {
            panic!("B's write under its lease")
        };
        assert_eq!(s.summary, "B");
        // A's turn ends with that refusal; the session is free for its next turn anywhere.
        drop(held_by_a);
        b.release(held_by_b).await;
        assert!(matches!(a.lease("s").await.unwrap(), Lease::Acquired(_)));
    }

    #[tokio::test]
    async fn a_schema_newer_than_this_binary_is_refused() {
        let location = fresh_database();
        Store::open(&location, TTL).await.unwrap();
        let Location::Postgres(url) = &location else {
            unreachable!()
        };
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("INSERT INTO mm_schema (version) VALUES (99)")
            .await
            .unwrap();
        let e = Store::open(&location, TTL).await.err().expect("refused");
        assert!(e.to_string().contains("newer than this mm"), "{e}");
    }

    /// A URL that does not parse, or a server that does not answer, stops startup with an
    /// error that says which; the password never appears in it.
    #[tokio::test]
    async fn a_bad_or_unreachable_postgres_store_is_named_at_start() {
        let bad = Location::Postgres("postgres://mm:pw@db:notaport/mm".into());
        let e = Store::open(&bad, TTL).await.err().expect("refused");
        assert!(matches!(e, StoreError::Config(_)), "{e}");
        assert!(e.to_string().contains("not a valid postgres:// URL"), "{e}");
        let port = mm_kit::peers::free_port();
        let down = Location::Postgres(format!("postgres://mm:s3cret@127.0.0.1:{port}/mm"));
        let e = Store::open(&down, TTL).await.err().expect("refused");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(
            e.to_string()
                .contains("cannot connect to the PostgreSQL store"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn locations_parse_and_hide_passwords() {
        let l = Location::try_from("postgres://mm:s3cret@db:5432/mm".to_string()).unwrap();
        assert!(matches!(l, Location::Postgres(_)));
        assert_eq!(l.to_string(), "postgres://mm:***@db:5432/mm");
        assert_eq!(String::from(l), "postgres://mm:s3cret@db:5432/mm");
        let l = Location::try_from("mm-data/sessions.redb".to_string()).unwrap();
        assert_eq!(l, Location::File("mm-data/sessions.redb".into()));
        assert!(Location::try_from(" ".to_string()).is_err());
    }

    #[tokio::test]
    async fn sessions_stored_before_the_enums_still_load() {
        // A store written by the previous release (`mm run` before this change).
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sessions-before-typed-edges.redb");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        std::fs::copy(fixture, &path).unwrap();
        let store = Store::open(&Location::File(path), TTL).await.unwrap();
        let sessions = store.list().await.unwrap();
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.turns.len(), 1);
        let a = &s.turns[0].attempts[0];
        assert!(a.legacy_verdict.is_empty());
        assert_ne!(a.verdict(), pb::Verdict::Unspecified);
        assert!(a
            .bursts
            .iter()
            .all(|b| b.stop() == upb::BurstStop::Budget && b.legacy_stop_reason.is_empty()));
        // Its policy was stored with the old fields set: they stay, the rest take defaults.
        let p = crate::policy::TurnPolicy::resolve(
            s.policy.as_ref().unwrap(),
            &crate::policy::TurnPolicy::default(),
        )
        .unwrap();
        assert_eq!((p.bursts, p.steps, p.commit_tokens), (2, 4, 24));
        assert_eq!(p.seed, None, "the old zero seed was the unset default");
    }
}
