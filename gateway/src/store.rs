//! Where leases are kept. The [`LeaseStore`] trait is small on purpose: a
//! store shared by several gateways (etcd) only has to load, put and remove.
//! [`EmbeddedStore`] keeps them in a redb file: ACID, crash-safe, one writer.

use std::{fmt, path::Path, str::FromStr};

use libp2p::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use relaygate_common::names::{LeasePort, TunnelName};

/// One lease: this agent's tunnel owns this public port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub agent: PeerId,
    pub tunnel: TunnelName,
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.agent, self.tunnel)
    }
}

impl FromStr for LeaseKey {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StoreError::Corrupt(format!("bad lease key {s:?}"));
        let (agent, tunnel) = s.split_once('/').ok_or_else(bad)?;
        Ok(Self {
            agent: agent.parse().map_err(|_| bad())?,
            tunnel: tunnel.parse().map_err(|_| bad())?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: LeaseKey,
    pub port: LeasePort,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lease store {path}: {message} (check the data dir is writable, has space, and no other gateway uses it)")]
    Open { path: String, message: String },
    #[error("lease store i/o: {0}")]
    Io(String),
    #[error("lease store holds an invalid record: {0}")]
    Corrupt(String),
}

pub trait LeaseStore: Send + Sync + 'static {
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    fn put(&self, lease: &Lease) -> Result<(), StoreError>;
    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError>;
}

const LEASES: TableDefinition<&str, u16> = TableDefinition::new("leases/v1");

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

    fn put(&self, lease: &Lease) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(LEASES).map_err(io)?;
            table
                .insert(lease.key.to_string().as_str(), lease.port.get())
                .map_err(io)?;
        }
        tx.commit().map_err(io)
    }

    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut table = tx.open_table(LEASES).map_err(io)?;
            table.remove(key.to_string().as_str()).map_err(io)?;
        }
        tx.commit().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
