//! The embedded session store (redb): one table, session id → the `orchestrator.v1.Session`
//! message, prost-encoded. redb commits are durable and crash-safe, so a turn reported as
//! committed survives a crash; everything else (KV caches) is rebuilt from this text.
//!
//! Sessions stored before verdicts and stop reasons became enums carry them as text; they are
//! read in both forms (see [`upgrade`]) and written in the new one.

use mm_proto::muse::v1 as upb;
use mm_proto::orchestrator::v1 as pb;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store: {0}")]
    Db(String),
    #[error("session store holds an unreadable record for `{0}`")]
    Corrupt(String),
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: redb::Database,
}

impl Store {
    /// Opens (or creates) the store at `path`, creating its directory.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(db_err)?;
        }
        let db = redb::Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(SESSIONS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Writes a session; durable when this returns.
    pub fn put(&self, s: &pb::Session) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(SESSIONS).map_err(db_err)?;
            t.insert(s.id.as_str(), s.encode_to_vec().as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn get(&self, id: &str) -> Result<Option<pb::Session>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SESSIONS).map_err(db_err)?;
        match t.get(id).map_err(db_err)? {
            Some(v) => decode(id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every session, newest first.
    pub fn list(&self) -> Result<Vec<pb::Session>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SESSIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        out.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        Ok(out)
    }

    /// Removes a session; false when there was none.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = {
            let mut t = tx.open_table(SESSIONS).map_err(db_err)?;
            let old = t.remove(id).map_err(db_err)?;
            old.is_some()
        };
        tx.commit().map_err(db_err)?;
        Ok(existed)
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

    #[test]
    fn sessions_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/sessions.redb");
        let s = pb::Session {
            id: "a".into(),
            created_unix_ms: 1,
            summary: "x".into(),
            ..Default::default()
        };
        {
            let store = Store::open(&path).unwrap();
            store.put(&s).unwrap();
            store
                .put(&pb::Session {
                    id: "b".into(),
                    created_unix_ms: 2,
                    ..Default::default()
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap(), s);
        assert_eq!(
            store
                .list()
                .unwrap()
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert!(store.delete("a").unwrap());
        assert!(!store.delete("a").unwrap());
        assert!(store.get("a").unwrap().is_none());
    }

    #[test]
    fn sessions_stored_before_the_enums_still_load() {
        // A store written by the previous release (`mm run` before this change).
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sessions-before-typed-edges.redb");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        std::fs::copy(fixture, &path).unwrap();
        let store = Store::open(&path).unwrap();
        let sessions = store.list().unwrap();
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
