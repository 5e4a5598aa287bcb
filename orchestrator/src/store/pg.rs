//! The shared backend (PostgreSQL), for several orchestrators over one store: sessions as
//! prost-encoded rows with a version for optimistic updates, and a turn lease per session
//! with an expiry, so two orchestrators never run one session's turn at once and a dead
//! orchestrator's lease runs out. Times are the server's (`now()`): orchestrators' clocks may
//! disagree, the database's is one.

use super::{decode, Deleted, StoreError, Updated};
use mm_proto::orchestrator::v1 as pb;
use prost::Message;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

/// The schema, one step per entry, applied in order once (`mm_schema` records which). Append;
/// never edit an applied step.
const MIGRATIONS: &[&str] = &[
    // 1: sessions and turn leases.
    "CREATE TABLE sessions (
         id text PRIMARY KEY,
         owner text NOT NULL,
         created_unix_ms bigint NOT NULL,
         version bigint NOT NULL DEFAULT 0,
         record bytea NOT NULL
     );
     CREATE INDEX sessions_newest_first ON sessions (created_unix_ms DESC, id DESC);
     CREATE TABLE turn_leases (
         session_id text PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
         holder text NOT NULL,
         expires_at timestamptz NOT NULL
     );",
];

/// Any advisory-lock key of our own: migrations run under it, one orchestrator at a time.
const MIGRATION_LOCK: i64 = 0x6d6d_5f73_746f_7265;
/// A statement that takes longer means the server is unreachable or stuck.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Optimistic updates that lose a race are retried this often.
const UPDATE_RETRIES: usize = 16;

/// How a lease request ended.
pub enum Leased {
    Acquired,
    /// Another holder's lease has not expired.
    Held,
    Missing,
}

#[derive(Clone)]
pub struct Pg {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    /// The connection; replaced when the server closed it.
    client: tokio::sync::Mutex<Arc<Client>>,
}

fn unreachable<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Statement errors the server reported are the store's; the rest (I/O, a closed connection)
/// mean it is unreachable, which a retry may fix.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Db(format!("{}: {}", db.code().code(), db.message())),
        None => unreachable(e),
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        StoreError::Unavailable(format!("cannot connect to the PostgreSQL store: {e}"))
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL store connection closed");
        }
    });
    Ok(client)
}

impl Pg {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`) and brings the
    /// schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Config(format!(
                "store is not a valid postgres:// URL ({e}); e.g. postgres://mm@db:5432/mm"
            ))
        })?;
        config
            .connect_timeout(Duration::from_secs(5))
            .application_name("mm");
        let mut client = connect(&config).await?;
        migrate(&mut client).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client: tokio::sync::Mutex::new(Arc::new(client)),
            }),
        })
    }

    /// The connection, reconnecting when the server closed the last one.
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut client = self.inner.client.lock().await;
        if client.is_closed() {
            *client = Arc::new(connect(&self.inner.config).await?);
        }
        Ok(client.clone())
    }

    /// Runs one statement (or a few) on the connection, bounded by [`STATEMENT_TIMEOUT`].
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        tokio::time::timeout(STATEMENT_TIMEOUT, f(client))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the PostgreSQL store did not answer within {STATEMENT_TIMEOUT:?}"
                ))
            })?
            .map_err(pg_err)
    }

    pub async fn put(&self, s: &pb::Session) -> Result<(), StoreError> {
        let record = s.encode_to_vec();
        self.run(|c| async move {
            c.execute(
                "INSERT INTO sessions (id, owner, created_unix_ms, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, version = sessions.version + 1",
                &[&s.id, &s.owner, &s.created_unix_ms, &record],
            )
            .await
        })
        .await
        .map(drop)
    }

    pub async fn get(&self, id: &str) -> Result<Option<pb::Session>, StoreError> {
        Ok(self.versioned(id).await?.map(|(_, s)| s))
    }

    async fn versioned(&self, id: &str) -> Result<Option<(i64, pb::Session)>, StoreError> {
        let row = self
            .run(|c| async move {
                c.query_opt("SELECT version, record FROM sessions WHERE id = $1", &[&id])
                    .await
            })
            .await?;
        match row {
            Some(r) => Ok(Some((r.get(0), decode(id, r.get::<_, &[u8]>(1))?))),
            None => Ok(None),
        }
    }

    /// Every session, newest first.
    pub async fn list(&self) -> Result<Vec<pb::Session>, StoreError> {
        let rows = self
            .run(|c| async move {
                c.query(
                    "SELECT id, record FROM sessions ORDER BY created_unix_ms DESC, id DESC",
                    &[],
                )
                .await
            })
            .await?;
        rows.iter()
            .map(|r| decode(r.get(0), r.get::<_, &[u8]>(1)))
            .collect()
    }

    /// Reads, changes and writes a session, retrying when another writer got in between. With
    /// a `fence` (a lease holder), the write happens only while that holder has the lease.
    pub async fn update(
        &self,
        id: &str,
        fence: Option<&str>,
        mut change: impl FnMut(&mut pb::Session),
    ) -> Result<Updated, StoreError> {
        for _ in 0..UPDATE_RETRIES {
            let Some((version, mut s)) = self.versioned(id).await? else {
                return Ok(Updated::Missing);
            };
            change(&mut s);
            let record = s.encode_to_vec();
            let written = self
                .run(|c| async move {
                    c.execute(
                        "UPDATE sessions SET record = $3, version = version + 1
                         WHERE id = $1 AND version = $2 AND ($4::text IS NULL OR EXISTS (
                             SELECT 1 FROM turn_leases WHERE session_id = $1 AND holder = $4))",
                        &[&id, &version, &record, &fence],
                    )
                    .await
                })
                .await?;
            if written == 1 {
                return Ok(Updated::Done(Box::new(s)));
            }
            if let Some(holder) = fence {
                if !self.holds(id, holder).await? {
                    return Ok(Updated::LeaseLost);
                }
            }
        }
        Err(StoreError::Db(format!(
            "session `{id}` kept changing under {UPDATE_RETRIES} attempts to update it"
        )))
    }

    async fn holds(&self, id: &str, holder: &str) -> Result<bool, StoreError> {
        self.run(|c| async move {
            c.query_opt(
                "SELECT 1 FROM turn_leases WHERE session_id = $1 AND holder = $2",
                &[&id, &holder],
            )
            .await
        })
        .await
        .map(|r| r.is_some())
    }

    /// Removes a session, unless a turn holds its lease.
    pub async fn delete(&self, id: &str) -> Result<Deleted, StoreError> {
        let deleted = self
            .run(|c| async move {
                c.execute(
                    "DELETE FROM sessions WHERE id = $1 AND NOT EXISTS (
                         SELECT 1 FROM turn_leases WHERE session_id = $1 AND expires_at > now())",
                    &[&id],
                )
                .await
            })
            .await?;
        if deleted == 1 {
            return Ok(Deleted::Done);
        }
        Ok(match self.versioned(id).await? {
            Some(_) => Deleted::Leased,
            None => Deleted::Missing,
        })
    }

    /// Takes the session's turn lease for `ttl`, unless another holder's has not expired.
    pub async fn lease(&self, id: &str, holder: &str, ttl: Duration) -> Result<Leased, StoreError> {
        let secs = ttl.as_secs_f64();
        let taken = self
            .run(|c| async move {
                c.query_opt(
                    "INSERT INTO turn_leases (session_id, holder, expires_at)
                     SELECT id, $2, now() + make_interval(secs => $3) FROM sessions WHERE id = $1
                     ON CONFLICT (session_id) DO UPDATE
                         SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                         WHERE turn_leases.expires_at <= now()
                     RETURNING 1",
                    &[&id, &holder, &secs],
                )
                .await
            })
            .await?;
        if taken.is_some() {
            return Ok(Leased::Acquired);
        }
        Ok(match self.versioned(id).await? {
            Some(_) => Leased::Held,
            None => Leased::Missing,
        })
    }

    /// Extends `holder`'s lease by `ttl` from now; false when it is no longer theirs.
    pub async fn renew(&self, id: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let secs = ttl.as_secs_f64();
        self.run(|c| async move {
            c.execute(
                "UPDATE turn_leases SET expires_at = now() + make_interval(secs => $3)
                 WHERE session_id = $1 AND holder = $2",
                &[&id, &holder, &secs],
            )
            .await
        })
        .await
        .map(|n| n == 1)
    }

    pub async fn release(&self, id: &str, holder: &str) -> Result<(), StoreError> {
        self.run(|c| async move {
            c.execute(
                "DELETE FROM turn_leases WHERE session_id = $1 AND holder = $2",
                &[&id, &holder],
            )
            .await
        })
        .await
        .map(drop)
    }
}

/// Applies the migrations this database lacks, under an advisory lock so orchestrators starting
/// together apply each once. A schema newer than this binary knows is refused, not written to.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS mm_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg_err)?;
    let applied: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM mm_schema", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        return Err(StoreError::Config(format!(
            "the PostgreSQL store's schema is version {applied}, newer than this mm knows ({known}): upgrade mm"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(step).await.map_err(pg_err)?;
        tx.execute("INSERT INTO mm_schema (version) VALUES ($1)", &[&version])
            .await
            .map_err(pg_err)?;
        tracing::info!(version, "PostgreSQL store migrated");
    }
    tx.commit().await.map_err(pg_err)
}
