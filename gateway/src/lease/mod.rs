//! Lease allocation: which public port each (agent, tunnel) owns.
//!
//! The in-memory table is the authority while the gateway runs; every change is
//! written through to the [`LeaseStore`] before it is granted, so a lease the
//! agent was told about survives a crash. A lease is given to another agent
//! only once it was freed: revoked by the operator, expired
//! (`leases.expire_after`, see [`expiry`]), or released because the agent's
//! tunnel no longer exists under its name.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use libp2p::PeerId;
use relaygate_common::{
    metrics::ReasonLabels,
    names::{LeasePort, PortRange},
};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::store::{Lease, LeaseKey, LeaseStore, StoreError};

pub mod expiry; // the sweeper: refreshes leases in use, frees expired ones
mod grant; // deciding and claiming ports for requested tunnels
pub mod lifecycle; // revocation and listing, across the table, the store and sessions
mod table; // the in-memory table and the pick order of free ports
#[cfg(test)]
mod tests;

use table::Table;

/// Which ports may be leased.
#[derive(Clone, Debug)]
pub struct PortPolicy {
    /// Handed out automatically.
    pub range: PortRange,
    /// May be asked for by number, in addition to `range`.
    pub allowed: Vec<PortRange>,
    /// Address leased ports bind to, to skip ports another process holds.
    pub bind: IpAddr,
    pub max_per_agent: usize,
    /// Leases of agents without a session for this long are freed; zero:
    /// never (`leases.expire_after`).
    pub expire_after: std::time::Duration,
}

impl PortPolicy {
    fn allows(&self, port: LeasePort) -> bool {
        self.range.contains(port) || self.allowed.iter().any(|r| r.contains(port))
    }
}

/// Why a lease was freed: the `reason` of `leases_freed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeReason {
    /// Unused for `leases.expire_after`.
    Expired,
    /// By the operator (admin API, CLI), or at another gateway of the fleet.
    Revoked,
    /// The agent's hello no longer names the tunnel.
    Renamed,
}

impl FreeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Renamed => "renamed",
        }
    }
}

/// Now, in milliseconds since the UNIX epoch: times of last use.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Leases {
    store: Arc<dyn LeaseStore>,
    /// Replaced on reload; decisions already made stand.
    policy: arc_swap::ArcSwap<PortPolicy>,
    table: Mutex<Table>,
    /// Leases refused because the store did not answer.
    pub unavailable: Counter,
    /// Leases freed, by [`FreeReason`].
    pub freed: Family<ReasonLabels, Counter>,
    /// Leases in the table (the `leases` gauge).
    pub gauge: Gauge,
    /// Times of last use on their way to the store.
    touches: Arc<Mutex<TouchQueue>>,
}

/// Leases whose use is still to be written to the store, and whether a
/// task is writing (one at a time: a store that does not answer holds one
/// thread, not one per session).
#[derive(Default)]
struct TouchQueue {
    keys: Vec<LeaseKey>,
    writing: bool,
}

impl Leases {
    /// Loads every stored lease, with when it was last in use.
    pub fn load(store: Arc<dyn LeaseStore>, policy: PortPolicy) -> Result<Self, StoreError> {
        let mut table = Table::default();
        let now = now_ms();
        let mut unrecorded = Vec::new();
        for (lease, at) in store.snapshot()? {
            // No time recorded (a store from before expiry): in use now, so
            // it is never freed early.
            if at.is_none() {
                unrecorded.push(lease.key.clone());
            }
            table.active.insert(lease.key.clone(), at.unwrap_or(now));
            table.insert(lease.key, lease.port);
        }
        // Recorded, so that restarts do not keep postponing its expiry.
        if !unrecorded.is_empty() {
            if let Err(e) = store.touch(&unrecorded, now) {
                tracing::warn!(error = %e, "cannot record when leases were last used");
            }
        }
        let gauge = Gauge::default();
        gauge.set(table.by_key.len() as i64);
        Ok(Self {
            store,
            policy: arc_swap::ArcSwap::from_pointee(policy),
            table: Mutex::new(table),
            unavailable: Counter::default(),
            freed: Family::default(),
            gauge,
            touches: Arc::default(),
        })
    }

    pub fn count(&self) -> usize {
        self.lock().by_key.len()
    }

    /// Applies a reloaded `leases.*`: to leases asked for from now on (one
    /// outside a new range is kept), and to the next sweep.
    pub fn set_policy(&self, policy: PortPolicy) {
        self.policy.store(Arc::new(policy));
    }

    pub fn expire_after(&self) -> std::time::Duration {
        self.policy.load().expire_after
    }

    pub fn all(&self) -> Vec<Lease> {
        self.lock().leases()
    }

    /// The port `key` holds here.
    pub fn port_of(&self, key: &LeaseKey) -> Option<LeasePort> {
        self.lock().by_key.get(key).copied()
    }

    /// The port `key` holds: this gateway's table, else the store (a lease
    /// another gateway of the fleet granted).
    pub async fn find(&self, key: &LeaseKey) -> Result<Option<LeasePort>, StoreError> {
        if let Some(p) = self.port_of(key) {
            return Ok(Some(p));
        }
        let (store, key) = (self.store.clone(), key.clone());
        blocking(move || store.port_of(&key)).await
    }

    fn update_gauge(&self, t: &Table) {
        self.gauge.set(t.by_key.len() as i64);
    }

    /// Who holds `port`: this gateway's table, else the store (a lease
    /// another gateway of the fleet granted to an agent not in session here).
    pub async fn holder(&self, port: LeasePort) -> Result<Option<LeaseKey>, StoreError> {
        if let Some(key) = self.lock().by_port.get(&port) {
            return Ok(Some(key.clone()));
        }
        let store = self.store.clone();
        blocking(move || store.holder(port)).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (every
        // mutation is a single insert/remove), so poisoning is safe to ignore.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `keys` are in use now, here and in the store (where a
    /// failure is logged: the table's time still holds on this gateway).
    pub async fn touch(&self, keys: Vec<LeaseKey>) {
        if keys.is_empty() {
            return;
        }
        let now = self.touch_here(&keys);
        let store = self.store.clone();
        if let Err(e) = blocking(move || store.touch(&keys, now)).await {
            tracing::warn!(error = %e, "cannot record that leases are in use");
        }
    }

    /// As [`Self::touch`], without waiting for the store: a session starting
    /// or ending is not held up by a store that does not answer. Queued
    /// writes are coalesced into one blocking task at a time.
    pub fn touch_soon(&self, keys: Vec<LeaseKey>) {
        if keys.is_empty() {
            return;
        }
        self.touch_here(&keys);
        let mut q = self.touches.lock().unwrap_or_else(|e| e.into_inner());
        q.keys.extend(keys);
        if q.writing {
            return;
        }
        q.writing = true;
        let (queue, store) = (self.touches.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || loop {
            let keys = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.keys.is_empty() {
                    q.writing = false;
                    return;
                }
                std::mem::take(&mut q.keys)
            };
            if let Err(e) = store.touch(&keys, now_ms()) {
                tracing::warn!(error = %e, "cannot record that leases are in use");
            }
        });
    }

    /// Waits until the queued times of last use are written.
    #[cfg(test)]
    pub(crate) async fn touches_written(&self) {
        loop {
            {
                let q = self.touches.lock().unwrap_or_else(|e| e.into_inner());
                if !q.writing && q.keys.is_empty() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Records the use in the table; its time.
    fn touch_here(&self, keys: &[LeaseKey]) -> u64 {
        let now = now_ms();
        let mut t = self.lock();
        for k in keys {
            if t.by_key.contains_key(k) {
                t.active.insert(k.clone(), now);
            }
        }
        now
    }

    /// Every lease of `agent` here.
    pub fn keys_of(&self, agent: &PeerId) -> Vec<LeaseKey> {
        self.lock()
            .by_key
            .keys()
            .filter(|k| &k.agent == agent)
            .cloned()
            .collect()
    }

    /// Frees `key`'s lease, from the table and the store, logs it and
    /// counts it; its port goes to the back of the pick order. The port it
    /// held (None: no such lease here; the store's copy is removed anyway).
    /// Taken from the table first, so a request racing with it gets a new
    /// port; put back if the store fails.
    pub async fn free(
        &self,
        key: &LeaseKey,
        reason: FreeReason,
    ) -> Result<Option<LeasePort>, StoreError> {
        let (port, active) = {
            let mut t = self.lock();
            let active = t.active.get(key).copied();
            (t.remove(key), active)
        };
        let (store, k) = (self.store.clone(), key.clone());
        let removed = blocking(move || {
            let held = store.port_of(&k)?;
            store.remove(&k)?;
            Ok(held)
        })
        .await;
        let held = match removed {
            Ok(held) => held,
            Err(e) => {
                if let Some(p) = port {
                    self.lock().restore(key, p, active);
                }
                return Err(e);
            }
        };
        let port = port.or(held);
        if let Some(p) = port {
            self.freed_now(key, p, reason);
        }
        Ok(port)
    }

    /// Counts and logs a lease gone from the store.
    fn freed_now(&self, key: &LeaseKey, port: LeasePort, reason: FreeReason) {
        self.freed
            .get_or_create(&ReasonLabels::new(reason.as_str()))
            .inc();
        self.update_gauge(&self.lock());
        let port = port.get();
        match reason {
            FreeReason::Expired => {
                tracing::info!(agent = %key.agent, tunnel = %key.tunnel, port, "lease expired")
            }
            FreeReason::Revoked => {
                tracing::info!(agent = %key.agent, tunnel = %key.tunnel, port, "lease revoked")
            }
            FreeReason::Renamed => {
                tracing::info!(agent = %key.agent, tunnel = %key.tunnel, port, "lease released: the agent no longer has a tunnel of this name")
            }
        }
    }
}

/// Runs a store call off the async workers (redb's file, etcd's round trips).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task: {e}")))?
}
