//! The lease sweeper (`leases.expire_after`). Every period it records that
//! the leases of agents in session here are in use (so a gateway of the
//! fleet without their session does not free them), reads the store, closes
//! the ports of leases the store no longer has (freed at another gateway),
//! and frees the leases of agents that have had no session for
//! `expire_after`, judged by the time of last use the store recorded, so a
//! restart neither resets nor hastens it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use libp2p::PeerId;
use relaygate_common::names::{LeasePort, TunnelName};

use super::{blocking, lifecycle, now_ms, FreeReason, Leases};
use crate::{
    registry::AgentRegistry,
    store::{Lease, LeaseKey, StoreError},
};

/// The sweep's period never exceeds this (so a lease is freed within a
/// minute of its time), nor falls below `MIN_PERIOD` (the store's load).
const MAX_PERIOD: Duration = Duration::from_secs(60);
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// The sweep's period: a quarter of `expire_after`, so a gateway holding
/// the session refreshes a lease several times before another could judge
/// it expired; `MAX_PERIOD` when leases never expire (refreshes and the
/// fleet's revocations still run).
pub fn period(expire_after: Duration) -> Duration {
    if expire_after.is_zero() {
        return MAX_PERIOD;
    }
    (expire_after / 4).clamp(MIN_PERIOD, MAX_PERIOD)
}

/// Runs the sweep every [`period`] of the current `leases.expire_after`
/// (a reload changes it).
pub struct Sweeper {
    pub leases: Arc<Leases>,
    pub registry: Arc<AgentRegistry>,
}

/// A lease judged expired: its last use as judged, and as the store had it
/// (the store frees it only if no gateway recorded a use since).
#[derive(Debug, PartialEq)]
pub(super) struct Expired {
    pub key: LeaseKey,
    pub last: u64,
    pub seen: Option<u64>,
}

/// What one look at the store found to do.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    /// Served here, but no longer leased (freed at another gateway, or
    /// while the session was starting): their ports close.
    pub gone: Vec<(PeerId, TunnelName)>,
    pub expired: Vec<Expired>,
}

impl Sweeper {
    pub async fn run(self) {
        loop {
            tokio::time::sleep(period(self.leases.expire_after())).await;
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "lease sweep skipped: the store did not answer");
            }
        }
    }

    async fn round(&self) -> Result<(), StoreError> {
        let here = self.registry.agents();
        let in_use = self.leases.keys_of_agents(&here);
        self.leases.touch(in_use).await;
        let (generation, snapshot) = self.leases.store_snapshot().await?;
        let plan = self.leases.plan(
            generation,
            snapshot,
            &here,
            &self.registry.served(),
            now_ms(),
            self.leases.expire_after(),
        );
        for (agent, tunnel) in plan.gone {
            tracing::info!(%agent, %tunnel, "lease gone from the store (freed at another gateway of the fleet); closing its port");
            let key = LeaseKey { agent, tunnel };
            lifecycle::close(
                &self.registry,
                &key,
                "the lease was revoked at another gateway of the fleet",
            )
            .await;
        }
        for e in plan.expired {
            self.leases.expire(e).await?;
        }
        Ok(())
    }
}

impl Leases {
    /// The leases of these agents.
    fn keys_of_agents(&self, agents: &HashSet<PeerId>) -> Vec<LeaseKey> {
        self.lock()
            .by_key
            .keys()
            .filter(|k| agents.contains(&k.agent))
            .cloned()
            .collect()
    }

    /// The store's leases with their times, and the table's generation
    /// before it looked: leases settled later are not judged by it.
    async fn store_snapshot(&self) -> Result<(u64, Vec<(Lease, Option<u64>)>), StoreError> {
        let generation = self.lock().generation();
        let store = self.store.clone();
        Ok((generation, blocking(move || store.snapshot()).await?))
    }

    /// Compares the table with the store as it was at `generation`, learns
    /// the newer times of last use and the leases of other gateways, forgets
    /// the leases the store no longer has, and judges expiry.
    pub(super) fn plan(
        &self,
        generation: u64,
        snapshot: Vec<(Lease, Option<u64>)>,
        here: &HashSet<PeerId>,
        served: &[(PeerId, TunnelName, LeasePort)],
        now: u64,
        expire_after: Duration,
    ) -> Plan {
        let mut plan = Plan::default();
        let store: HashMap<LeaseKey, (LeasePort, Option<u64>)> = snapshot
            .into_iter()
            .map(|(l, at)| (l.key, (l.port, at)))
            .collect();
        let mut t = self.lock();
        let settled = |t: &super::Table, k: &LeaseKey| !t.newer_than(k, generation);
        // Gone from the store, or moved there to another port (revoked at
        // another gateway, and leased again there).
        let forgotten: Vec<LeaseKey> = t
            .by_key
            .iter()
            .filter(|(k, p)| store.get(*k).map(|(sp, _)| sp) != Some(*p) && settled(&t, k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in forgotten {
            tracing::debug!(lease = %k, "lease no longer in the store as it is here; forgotten");
            t.remove(&k);
        }
        for (agent, tunnel, port) in served {
            let key = LeaseKey {
                agent: *agent,
                tunnel: tunnel.clone(),
            };
            if t.by_key.get(&key) != Some(port) && settled(&t, &key) {
                plan.gone.push((*agent, tunnel.clone()));
            }
        }
        // Leases of other gateways: listed, and judged like the table's.
        let previous = std::mem::take(&mut t.others);
        for (k, (port, at)) in &store {
            if !t.by_key.contains_key(k) {
                let first_seen = previous.get(k).and_then(|(_, a)| *a).unwrap_or(now);
                t.others.insert(k.clone(), (*port, at.or(Some(first_seen))));
            }
        }
        if expire_after.is_zero() {
            self.update_gauge(&t);
            return plan;
        }
        let limit = expire_after.as_millis() as u64;
        let keys: Vec<LeaseKey> = t.by_key.keys().chain(t.others.keys()).cloned().collect();
        for k in keys {
            if here.contains(&k.agent) || !settled(&t, &k) {
                continue;
            }
            let seen = store.get(&k).and_then(|(_, at)| *at);
            let mine = t
                .active
                .get(&k)
                .copied()
                .or_else(|| t.others.get(&k).and_then(|(_, a)| *a));
            // Never recorded anywhere: counts as in use from now.
            let last = mine.max(seen).unwrap_or(now);
            if t.by_key.contains_key(&k) {
                t.active.insert(k.clone(), last);
            }
            if now.saturating_sub(last) >= limit {
                plan.expired.push(Expired { key: k, last, seen });
            }
        }
        self.update_gauge(&t);
        plan
    }

    /// Frees a lease judged expired, unless it was used since: here (a
    /// session was granted it after the judgement) or at another gateway
    /// (the store's time moved). Taken from the table first, so a session
    /// racing with it gets a new port rather than this one.
    pub(super) async fn expire(&self, e: Expired) -> Result<bool, StoreError> {
        let (port, active) = {
            let mut t = self.lock();
            let active = t.active.get(&e.key).copied();
            if active.is_some_and(|a| a > e.last) {
                return Ok(false);
            }
            (t.remove(&e.key), active)
        };
        let (store, key, seen) = (self.store.clone(), e.key.clone(), e.seen);
        let gone = blocking(move || store.expire(&key, seen)).await;
        if !matches!(gone, Ok(true)) {
            if let Some(p) = port {
                self.lock().restore(&e.key, p, active);
            }
            return gone;
        }
        if let Some(p) = port {
            self.freed_now(&e.key, p, FreeReason::Expired);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lease::PortPolicy,
        store::{EmbeddedStore, LeaseStore},
    };
    use relaygate_common::protocol::{LeaseOutcome, TunnelRequest};

    fn leases(dir: &std::path::Path) -> (Arc<EmbeddedStore>, Leases) {
        let store = Arc::new(EmbeddedStore::open(&dir.join("l.redb")).unwrap());
        let policy = PortPolicy {
            range: "41200-41203".parse().unwrap(),
            allowed: vec![],
            bind: [127, 0, 0, 1].into(),
            max_per_agent: 4,
            expire_after: std::time::Duration::ZERO,
        };
        (store.clone(), Leases::load(store, policy).unwrap())
    }

    async fn lease(l: &Leases, agent: PeerId, name: &str) -> (LeaseKey, LeasePort) {
        let g = l
            .acquire(
                agent,
                &[TunnelRequest {
                    name: name.parse().unwrap(),
                    port: None,
                    proto: Default::default(),
                }],
            )
            .await;
        match g[0].outcome {
            LeaseOutcome::Granted { port } => (
                LeaseKey {
                    agent,
                    tunnel: name.parse().unwrap(),
                },
                port,
            ),
            _ => panic!("refused: {g:?}"),
        }
    }

    async fn snapshot(l: &Leases) -> (u64, Vec<(Lease, Option<u64>)>) {
        l.store_snapshot().await.unwrap()
    }

    #[tokio::test]
    async fn judged_by_the_recorded_time_never_while_in_session() {
        let dir = tempfile::tempdir().unwrap();
        let (store, l) = leases(dir.path());
        let (a, b) = (PeerId::random(), PeerId::random());
        let (ka, _) = lease(&l, a, "x").await;
        let (kb, _) = lease(&l, b, "y").await;
        l.touches_written().await;
        let used = store
            .snapshot()
            .unwrap()
            .into_iter()
            .find_map(|(l, at)| (l.key == ka).then_some(at))
            .flatten()
            .unwrap();
        let e = Duration::from_secs(10);
        let (g, snap) = snapshot(&l).await;
        let later = used + 10_000;
        // b is in session here: only a's lease expires.
        let plan = l.plan(g, snap, &[b].into(), &[], later, e);
        assert_eq!(plan.expired.len(), 1, "{plan:?}");
        assert_eq!(plan.expired[0].key, ka);
        // Not yet, 1 ms before.
        let (g, snap) = snapshot(&l).await;
        assert!(l
            .plan(g, snap, &[].into(), &[], later - 1, e)
            .expired
            .is_empty());
        // Never, with expire_after = 0.
        let (g, snap) = snapshot(&l).await;
        assert!(l
            .plan(g, snap, &[].into(), &[], later * 2, Duration::ZERO)
            .expired
            .is_empty());
        // Another gateway recorded a use after the judgement: kept.
        let (g, snap) = snapshot(&l).await;
        let plan = l.plan(g, snap, &[b].into(), &[], later, e);
        store.touch(std::slice::from_ref(&ka), used + 1).unwrap();
        for x in plan.expired {
            assert!(!l.expire(x).await.unwrap());
        }
        assert!(l.port_of(&ka).is_some(), "kept in the table too");
        // A session was granted it after the judgement: kept.
        let (g, snap) = snapshot(&l).await;
        let plan = l.plan(g, snap, &[b].into(), &[], later + 10_000, e);
        assert_eq!(plan.expired.len(), 1);
        assert_eq!(plan.expired[0].last, used + 1, "the store's newer time");
        tokio::time::sleep(Duration::from_millis(5)).await;
        lease(&l, a, "x").await;
        l.touches_written().await;
        store.touch(std::slice::from_ref(&ka), used + 1).unwrap(); // the store alone would free it
        for x in plan.expired {
            assert!(!l.expire(x).await.unwrap());
        }
        // Expired for real: gone from table and store, counted.
        let far = now_ms() + 3_600_000;
        let (g, snap) = snapshot(&l).await;
        let plan = l.plan(g, snap, &[b].into(), &[], far, e);
        for x in plan.expired {
            assert!(l.expire(x).await.unwrap());
        }
        assert_eq!(l.port_of(&ka), None);
        assert!(l.port_of(&kb).is_some());
        assert_eq!(store.port_of(&ka).unwrap(), None);
        let freed = l
            .freed
            .get_or_create(&relaygate_common::metrics::ReasonLabels::new("expired"))
            .get();
        assert_eq!(freed, 1);
    }

    #[tokio::test]
    async fn a_lease_the_store_lost_closes_where_it_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (store, l) = leases(dir.path());
        let a = PeerId::random();
        let (ka, pa) = lease(&l, a, "x").await;
        let (kb, pb) = lease(&l, a, "y").await;
        let (kc, pc) = lease(&l, a, "z").await;
        // Another gateway of the fleet revoked x, and revoked z and leased
        // it again on another port.
        store.remove(&ka).unwrap();
        store.remove(&kc).unwrap();
        let moved = LeasePort::new(pc.get() + 1).unwrap();
        store
            .put(&Lease {
                key: kc.clone(),
                port: moved,
            })
            .unwrap();
        let served = [
            (a, ka.tunnel.clone(), pa),
            (a, kb.tunnel.clone(), pb),
            (a, kc.tunnel.clone(), pc),
        ];
        let (g, snap) = snapshot(&l).await;
        let plan = l.plan(g, snap, &[a].into(), &served, now_ms(), Duration::ZERO);
        assert_eq!(
            plan.gone,
            vec![(a, ka.tunnel.clone()), (a, kc.tunnel.clone())]
        );
        assert_eq!(l.port_of(&ka), None, "forgotten");
        assert_eq!(l.port_of(&kc), None, "forgotten, until asked again");
        assert_eq!(l.port_of(&kb), Some(pb));
        assert_eq!(
            l.list(&AgentRegistry::default())
                .iter()
                .find(|v| v.tunnel == "z")
                .map(|v| v.port),
            Some(moved.get()),
            "listed as the store has it"
        );
    }
}
