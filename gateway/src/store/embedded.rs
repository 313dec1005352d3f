//! Leases in a redb file in the data dir: ACID, crash-safe, one writer (one
//! gateway, whose in-memory table decides; a claim is always granted). A
//! second table holds when each lease was last in use by a session.

use std::{fmt, path::Path};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use relaygate_common::names::LeasePort;

use super::{Claim, Lease, LeaseKey, LeaseStore, StoreError};

const LEASES: TableDefinition<&str, u16> = TableDefinition::new("leases/v1");
/// `<agent>/<tunnel>` -> milliseconds since the UNIX epoch of its last use.
const ACTIVE: TableDefinition<&str, u64> = TableDefinition::new("leases_active/v1");

pub struct EmbeddedStore {
    db: Database,
}

fn io<E: fmt::Display>(e: E) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |e: &dyn fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        // Create the table up front so an unwritable store fails at start, not at the first lease.
        let tx = db.begin_write().map_err(|e| open_err(&e))?;
        tx.open_table(LEASES).map_err(|e| open_err(&e))?;
        tx.open_table(ACTIVE).map_err(|e| open_err(&e))?;
        tx.commit().map_err(|e| open_err(&e))?;
        Ok(Self { db })
    }
}

impl LeaseStore for EmbeddedStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(LEASES).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let key: LeaseKey = k.value().parse()?;
            let port = LeasePort::new(v.value())
                .ok_or_else(|| StoreError::Corrupt(format!("port 0 for {key}")))?;
            out.push(Lease { key, port });
        }
        Ok(out)
    }

    fn claim(&self, lease: &Lease, _previous: Option<LeasePort>) -> Result<Claim, StoreError> {
        self.put(lease)?;
        Ok(Claim::Granted)
    }

    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let k = key.to_string();
            tx.open_table(LEASES)
                .map_err(io)?
                .remove(k.as_str())
                .map_err(io)?;
            tx.open_table(ACTIVE)
                .map_err(io)?
                .remove(k.as_str())
                .map_err(io)?;
        }
        tx.commit().map_err(io)
    }

    fn touch(&self, keys: &[LeaseKey], at: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let leases = tx.open_table(LEASES).map_err(io)?;
            let mut active = tx.open_table(ACTIVE).map_err(io)?;
            for key in keys {
                let k = key.to_string();
                if leases.get(k.as_str()).map_err(io)?.is_some() {
                    active.insert(k.as_str(), at).map_err(io)?;
                }
            }
        }
        tx.commit().map_err(io)
    }

    fn snapshot(&self) -> Result<Vec<(Lease, Option<u64>)>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let active = tx.open_table(ACTIVE).map_err(io)?;
        self.load()?
            .into_iter()
            .map(|l| {
                let at = active
                    .get(l.key.to_string().as_str())
                    .map_err(io)?
                    .map(|v| v.value());
                Ok((l, at))
            })
            .collect()
    }

    fn expire(&self, key: &LeaseKey, seen: Option<u64>) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let k = key.to_string();
            let mut active = tx.open_table(ACTIVE).map_err(io)?;
            let now = active.get(k.as_str()).map_err(io)?.map(|v| v.value());
            if now != seen {
                return Ok(false);
            }
            active.remove(k.as_str()).map_err(io)?;
            tx.open_table(LEASES)
                .map_err(io)?
                .remove(k.as_str())
                .map_err(io)?;
        }
        tx.commit().map_err(io)?;
        Ok(true)
    }

    fn port_of(&self, key: &LeaseKey) -> Result<Option<LeasePort>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = tx.open_table(LEASES).map_err(io)?;
        let v = table.get(key.to_string().as_str()).map_err(io)?;
        Ok(v.and_then(|v| LeasePort::new(v.value())))
    }
}

impl EmbeddedStore {
    /// Writes a lease as it is (the table above the store decided it).
    pub fn put(&self, lease: &Lease) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(LEASES).map_err(io)?;
            table
                .insert(lease.key.to_string().as_str(), lease.port.get())
                .map_err(io)?;
        }
        tx.commit().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    #[test]
    fn leases_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("rg-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("leases.redb");
        let key = LeaseKey {
            agent: PeerId::random(),
            tunnel: "node".parse().unwrap(),
        };
        let lease = Lease {
            key: key.clone(),
            port: LeasePort::new(20001).unwrap(),
        };
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.put(&lease).unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![lease]);
        s.remove(&key).unwrap();
        assert!(s.load().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_of_last_use_survive_reopen_and_guard_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        let key = LeaseKey {
            agent: PeerId::random(),
            tunnel: "node".parse().unwrap(),
        };
        let lease = Lease {
            key: key.clone(),
            port: LeasePort::new(20002).unwrap(),
        };
        let stranger = LeaseKey {
            agent: PeerId::random(),
            tunnel: "gone".parse().unwrap(),
        };
        {
            let s = EmbeddedStore::open(&path).unwrap();
            s.put(&lease).unwrap();
            assert_eq!(s.snapshot().unwrap(), vec![(lease.clone(), None)]);
            s.touch(&[key.clone(), stranger.clone()], 1_000).unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            s.snapshot().unwrap(),
            vec![(lease.clone(), Some(1_000))],
            "a key without a lease is not touched"
        );
        // Used since it was judged expired: kept.
        assert!(!s.expire(&key, None).unwrap());
        assert!(!s.expire(&key, Some(999)).unwrap());
        assert_eq!(s.port_of(&key).unwrap(), Some(lease.port));
        assert!(s.expire(&key, Some(1_000)).unwrap());
        assert!(s.snapshot().unwrap().is_empty());
        assert_eq!(s.port_of(&key).unwrap(), None);
    }
}
