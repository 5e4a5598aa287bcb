//! The embedded backend (redb): one table, session id → the prost-encoded session. redb commits
//! are durable and crash-safe, so a turn reported as committed survives a crash. redb locks its
//! file, so one orchestrator owns it and its turn leases can live in that process's memory.

use super::{decode, StoreError};
use mm_proto::orchestrator::v1 as pb;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct File {
    db: redb::Database,
}

impl File {
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

    /// Reads, changes and writes a session in one write transaction; None when there is none.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut pb::Session),
    ) -> Result<Option<pb::Session>, StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let updated = {
            let mut t = tx.open_table(SESSIONS).map_err(db_err)?;
            let current = match t.get(id).map_err(db_err)? {
                Some(v) => Some(decode(id, v.value())?),
                None => None,
            };
            match current {
                Some(mut s) => {
                    change(&mut s);
                    t.insert(id, s.encode_to_vec().as_slice()).map_err(db_err)?;
                    Some(s)
                }
                None => None,
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(updated)
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
