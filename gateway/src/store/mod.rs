//! Where leases are kept. The [`LeaseStore`] trait is small on purpose:
//! load, claim and remove, and when each lease was last in use (for
//! `leases.expire_after`). A claim is atomic in the store, so several
//! gateways sharing one store never give a port to two tunnels, and a tunnel
//! gets the same port from each. [`EmbeddedStore`] keeps leases in a redb
//! file (one gateway); [`EtcdStore`] in etcd (a fleet).

use std::{fmt, str::FromStr};

use libp2p::PeerId;
use relaygate_common::names::{LeasePort, TunnelName};

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{connect_client, EtcdStore};

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
    #[error("lease store unavailable: {0} (leases already granted keep working; new ones are refused until it answers)")]
    Unavailable(String),
}

/// What the store says to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Recorded: the key holds the port.
    Granted,
    /// The key already holds this other port (another gateway leased it):
    /// the tunnel keeps that one.
    Existing(LeasePort),
    /// Another key holds the port.
    Held(LeaseKey),
}

/// Called from blocking threads (`spawn_blocking`), never from async tasks.
pub trait LeaseStore: Send + Sync + 'static {
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    /// Records that `lease.key` holds `lease.port`, giving up `previous`
    /// (its port until now, if any), unless another key holds the port or
    /// the key holds another port in the store that this gateway did not
    /// know of.
    fn claim(&self, lease: &Lease, previous: Option<LeasePort>) -> Result<Claim, StoreError>;
    /// Removes the lease and its time of last use.
    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError>;
    /// Records that `keys` were in use by a session at `at` (milliseconds
    /// since the UNIX epoch). A key without a lease is skipped: a lease
    /// removed meanwhile is not brought back.
    fn touch(&self, keys: &[LeaseKey], at: u64) -> Result<(), StoreError>;
    /// Every lease with its recorded time of last use (`None`: never recorded).
    fn snapshot(&self) -> Result<Vec<(Lease, Option<u64>)>, StoreError>;
    /// Removes an expired lease, unless its time of last use is no longer
    /// `seen` (a gateway of the fleet used it since). Whether the lease is
    /// gone from the store now.
    fn expire(&self, key: &LeaseKey, seen: Option<u64>) -> Result<bool, StoreError>;
    /// The port `key` holds, as the store knows it now.
    fn port_of(&self, key: &LeaseKey) -> Result<Option<LeasePort>, StoreError> {
        Ok(self
            .load()?
            .into_iter()
            .find(|l| &l.key == key)
            .map(|l| l.port))
    }
    /// Who holds `port`, as the store knows it now (leases other gateways
    /// granted included).
    fn holder(&self, port: LeasePort) -> Result<Option<LeaseKey>, StoreError> {
        Ok(self
            .load()?
            .into_iter()
            .find(|l| l.port == port)
            .map(|l| l.key))
    }
}
