//! Lease allocation: which public port each (agent, tunnel) owns.
//!
//! The in-memory table is the authority while the gateway runs; every change is
//! written through to the [`LeaseStore`] before it is granted, so a lease the
//! agent was told about survives a crash. A lease is never given to another
//! agent, so an advertised address keeps pointing at the same node.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use libp2p::PeerId;
use relaygate_common::{
    names::{LeasePort, PortRange},
    protocol::{LeaseGrant, LeaseOutcome, LeaseRefusal, TunnelRequest},
};

use prometheus_client::metrics::counter::Counter;

use crate::store::{Claim, Lease, LeaseKey, LeaseStore, StoreError};

/// Ports tried for one automatic lease when the store says other gateways
/// hold the ones this gateway picked.
const CLAIM_ROUNDS: usize = 16;

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
}

impl PortPolicy {
    fn allows(&self, port: LeasePort) -> bool {
        self.range.contains(port) || self.allowed.iter().any(|r| r.contains(port))
    }
}

#[derive(Default)]
struct Table {
    by_key: BTreeMap<LeaseKey, LeasePort>,
    by_port: HashMap<LeasePort, LeaseKey>,
}

impl Table {
    fn insert(&mut self, key: LeaseKey, port: LeasePort) -> Option<LeasePort> {
        let old = self.by_key.insert(key.clone(), port);
        if let Some(old) = old {
            self.by_port.remove(&old);
        }
        self.by_port.insert(port, key);
        old
    }
    /// Moves `key` to `port`; its previous port stays held by it until the
    /// move is settled, so no other agent can take it while the store has
    /// not yet agreed to the move.
    fn begin_move(&mut self, key: LeaseKey, port: LeasePort) -> Option<LeasePort> {
        let previous = self.insert(key.clone(), port);
        if let Some(p) = previous {
            self.by_port.insert(p, key);
        }
        previous
    }
    /// Ends a move: on success frees the previous port, on failure gives
    /// `key` its previous port back (or no lease, if it had none).
    fn settle_move(
        &mut self,
        key: &LeaseKey,
        port: LeasePort,
        previous: Option<LeasePort>,
        ok: bool,
    ) {
        let held_by_key = |t: &Self, p: &LeasePort| t.by_port.get(p) == Some(key);
        match (ok, previous) {
            (true, Some(p)) if p != port && held_by_key(self, &p) => {
                self.by_port.remove(&p);
            }
            (true, _) => {}
            (false, prev) => {
                if held_by_key(self, &port) {
                    self.by_port.remove(&port);
                }
                match prev {
                    Some(p) => {
                        self.by_key.insert(key.clone(), p);
                        self.by_port.insert(p, key.clone());
                    }
                    None => {
                        self.by_key.remove(key);
                    }
                }
            }
        }
    }
    fn count_for(&self, agent: &PeerId) -> usize {
        self.by_key.keys().filter(|k| &k.agent == agent).count()
    }
}

pub struct Leases {
    store: Arc<dyn LeaseStore>,
    policy: PortPolicy,
    table: Mutex<Table>,
    /// Leases refused because the store did not answer.
    pub unavailable: Counter,
}

/// A lease that still has to reach the store, with the port it replaces
/// (held for it until the store answers, and given back if it refuses).
struct Pending {
    lease: Lease,
    previous: Option<LeasePort>,
    /// The port the agent asked for by number, if it did.
    wanted: Option<LeasePort>,
}

impl Leases {
    /// Loads every stored lease.
    pub fn load(store: Arc<dyn LeaseStore>, policy: PortPolicy) -> Result<Self, StoreError> {
        let mut table = Table::default();
        for lease in store.load()? {
            table.insert(lease.key, lease.port);
        }
        Ok(Self {
            store,
            policy,
            table: Mutex::new(table),
            unavailable: Counter::default(),
        })
    }

    pub fn count(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn all(&self) -> Vec<Lease> {
        self.lock()
            .by_key
            .iter()
            .map(|(k, p)| Lease {
                key: k.clone(),
                port: *p,
            })
            .collect()
    }

    /// Who holds `port`: this gateway's table, else the store (a lease
    /// another gateway of the fleet granted to an agent not in session here).
    pub async fn holder(&self, port: LeasePort) -> Result<Option<LeaseKey>, StoreError> {
        if let Some(key) = self.lock().by_port.get(&port) {
            return Ok(Some(key.clone()));
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.holder(port))
            .await
            .map_err(|e| StoreError::Unavailable(format!("lookup task: {e}")))?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (every
        // mutation is a single insert/remove), so poisoning is safe to ignore.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grants (or refuses) each requested tunnel of `agent`, persisting new leases.
    pub async fn acquire(&self, agent: PeerId, requests: &[TunnelRequest]) -> Vec<LeaseGrant> {
        let (mut grants, pending) = self.decide(agent, requests);
        // Claimed outside the lock; what the store would not take is rolled back.
        for (i, p) in pending {
            grants[i].outcome = self.settle(p).await;
        }
        grants
    }

    /// Claims a decided lease in the store, adopting what it knows better: the
    /// tunnel's port from another gateway, or another port when the picked one
    /// turned out held there.
    async fn settle(&self, mut p: Pending) -> LeaseOutcome {
        for _ in 0..CLAIM_ROUNDS {
            let store = self.store.clone();
            let (l, previous) = (p.lease.clone(), p.previous);
            let res = tokio::task::spawn_blocking(move || store.claim(&l, previous)).await;
            let key = p.lease.key.clone();
            match res {
                Ok(Ok(Claim::Granted)) => {
                    self.lock()
                        .settle_move(&key, p.lease.port, p.previous, true);
                    return LeaseOutcome::Granted { port: p.lease.port };
                }
                Ok(Ok(Claim::Existing(port))) => {
                    let mut t = self.lock();
                    t.settle_move(&key, p.lease.port, p.previous, false);
                    t.insert(key, port);
                    return LeaseOutcome::Granted { port };
                }
                Ok(Ok(Claim::Held(holder))) => {
                    let mut t = self.lock();
                    t.settle_move(&key, p.lease.port, p.previous, false);
                    // Learnt: another gateway leased it.
                    t.insert(holder, p.lease.port);
                    if p.wanted.is_some() {
                        return refuse(
                            LeaseRefusal::PortHeld,
                            format!("port {} is leased to another tunnel", p.lease.port),
                        );
                    }
                    match self.pick(&t, &key, None) {
                        Ok((port, true)) => {
                            p.previous = t.begin_move(key.clone(), port);
                            p.lease.port = port;
                        }
                        Ok((port, false)) => return LeaseOutcome::Granted { port },
                        Err((code, msg)) => return refuse(code, msg),
                    }
                }
                other => {
                    self.lock()
                        .settle_move(&key, p.lease.port, p.previous, false);
                    let err = match other {
                        Ok(Err(e)) => {
                            if matches!(e, StoreError::Unavailable(_)) {
                                self.unavailable.inc();
                            }
                            e.to_string()
                        }
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::error!(lease = %key, error = %err, "cannot store the lease; refusing it");
                    return refuse(
                        LeaseRefusal::StoreFailed,
                        format!("the gateway could not store the lease ({err}); retry later"),
                    );
                }
            }
        }
        self.lock()
            .settle_move(&p.lease.key, p.lease.port, p.previous, false);
        refuse(
            LeaseRefusal::RangeExhausted,
            "every port tried is leased through other gateways".into(),
        )
    }

    fn decide(
        &self,
        agent: PeerId,
        requests: &[TunnelRequest],
    ) -> (Vec<LeaseGrant>, Vec<(usize, Pending)>) {
        let mut t = self.lock();
        let mut seen = HashSet::new();
        let mut grants = Vec::with_capacity(requests.len());
        let mut pending = Vec::new();
        for (i, req) in requests.iter().enumerate() {
            let key = LeaseKey {
                agent,
                tunnel: req.name.clone(),
            };
            let outcome = if !seen.insert(req.name.clone()) {
                refuse(
                    LeaseRefusal::DuplicateName,
                    format!("tunnel name {} appears twice", req.name),
                )
            } else {
                match self.pick(&t, &key, req.port) {
                    Ok((port, changed)) => {
                        if changed {
                            let previous = t.begin_move(key.clone(), port);
                            pending.push((
                                i,
                                Pending {
                                    lease: Lease { key, port },
                                    previous,
                                    wanted: req.port,
                                },
                            ));
                        }
                        LeaseOutcome::Granted { port }
                    }
                    Err((code, msg)) => refuse(code, msg),
                }
            };
            grants.push(LeaseGrant {
                name: req.name.clone(),
                outcome,
            });
        }
        (grants, pending)
    }

    /// Chooses a port for `key`; `changed` says whether the table must be updated.
    fn pick(
        &self,
        t: &Table,
        key: &LeaseKey,
        wanted: Option<LeasePort>,
    ) -> Result<(LeasePort, bool), (LeaseRefusal, String)> {
        let existing = t.by_key.get(key).copied();
        match (existing, wanted) {
            (Some(p), None) => Ok((p, false)),
            (Some(p), Some(w)) if p == w => Ok((p, false)),
            (_, Some(w)) => {
                if !self.policy.allows(w) {
                    return Err((
                        LeaseRefusal::PortNotAllowed,
                        format!(
                            "port {w} is not allowed here; ask for none, or one in {} {}",
                            self.policy.range,
                            self.policy
                                .allowed
                                .iter()
                                .map(|r| r.to_string())
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                    ));
                }
                if let Some(holder) = t.by_port.get(&w) {
                    if holder != key {
                        return Err((
                            LeaseRefusal::PortHeld,
                            format!("port {w} is leased to another tunnel"),
                        ));
                    }
                }
                if existing.is_none() && t.count_for(&key.agent) >= self.policy.max_per_agent {
                    return Err(too_many(self.policy.max_per_agent));
                }
                Ok((w, true))
            }
            (None, None) => {
                if t.count_for(&key.agent) >= self.policy.max_per_agent {
                    return Err(too_many(self.policy.max_per_agent));
                }
                self.policy
                    .range
                    .iter()
                    .find(|p| !t.by_port.contains_key(p) && bindable(self.policy.bind, *p))
                    .map(|p| (p, true))
                    .ok_or((
                        LeaseRefusal::RangeExhausted,
                        format!("no free port left in {}", self.policy.range),
                    ))
            }
        }
    }
}

fn too_many(max: usize) -> (LeaseRefusal, String) {
    (
        LeaseRefusal::TooManyTunnels,
        format!("at most {max} tunnels per agent"),
    )
}

fn refuse(code: LeaseRefusal, message: String) -> LeaseOutcome {
    LeaseOutcome::Refused { code, message }
}

/// Skips ports another process already listens on when picking automatically.
fn bindable(ip: IpAddr, port: LeasePort) -> bool {
    std::net::TcpListener::bind((ip, port.get())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn leases(dir: &std::path::Path) -> Leases {
        let store = Arc::new(EmbeddedStore::open(&dir.join("l.redb")).unwrap());
        let policy = PortPolicy {
            range: "41000-41002".parse().unwrap(),
            allowed: vec!["41500".parse().unwrap()],
            bind: [127, 0, 0, 1].into(),
            max_per_agent: 2,
        };
        Leases::load(store, policy).unwrap()
    }

    fn req(name: &str, port: Option<u16>) -> TunnelRequest {
        TunnelRequest {
            name: name.parse().unwrap(),
            port: port.and_then(LeasePort::new),
        }
    }

    fn port(g: &LeaseGrant) -> Option<u16> {
        match g.outcome {
            LeaseOutcome::Granted { port } => Some(port.get()),
            _ => None,
        }
    }

    fn code(g: &LeaseGrant) -> Option<LeaseRefusal> {
        match g.outcome {
            LeaseOutcome::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn allocation_rules() {
        let dir = std::env::temp_dir().join(format!("rg-lease-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (PeerId::random(), PeerId::random());
        {
            let l = leases(&dir);
            let g = l
                .acquire(a, &[req("x", None), req("y", Some(41500)), req("x", None)])
                .await;
            assert!(port(&g[0]).is_some());
            assert_eq!(port(&g[1]), Some(41500));
            assert_eq!(code(&g[2]), Some(LeaseRefusal::DuplicateName));
            // another agent cannot take a held port, nor one outside the set
            let g = l
                .acquire(b, &[req("z", Some(41500)), req("w", Some(80))])
                .await;
            assert_eq!(code(&g[0]), Some(LeaseRefusal::PortHeld));
            assert_eq!(code(&g[1]), Some(LeaseRefusal::PortNotAllowed));
            // per-agent cap
            let g = l.acquire(a, &[req("third", None)]).await;
            assert_eq!(code(&g[0]), Some(LeaseRefusal::TooManyTunnels));
        }
        // reload: same ports for the same keys
        let l = leases(&dir);
        assert_eq!(l.count(), 2);
        let g = l.acquire(a, &[req("y", None)]).await;
        assert_eq!(port(&g[0]), Some(41500));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The real store, whose next put waits for a word from the test and
    /// then fails or succeeds as told.
    struct Gated {
        inner: EmbeddedStore,
        gate: Mutex<Option<std::sync::mpsc::Receiver<bool>>>,
    }

    impl LeaseStore for Gated {
        fn load(&self) -> Result<Vec<Lease>, StoreError> {
            self.inner.load()
        }
        fn claim(&self, lease: &Lease, previous: Option<LeasePort>) -> Result<Claim, StoreError> {
            let gate = self.gate.lock().unwrap().take();
            match gate.map(|g| g.recv().unwrap_or(false)) {
                Some(false) => Err(StoreError::Io("disk full".into())),
                _ => self.inner.claim(lease, previous),
            }
        }
        fn remove(&self, key: &LeaseKey) -> Result<(), StoreError> {
            self.inner.remove(key)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_being_moved_away_from_is_held_until_the_store_answers() {
        // On ecf9cf7 the old port was free while the new lease was being
        // stored, and a failed store put it back under its old owner even
        // if another agent had been given it meanwhile: two leases, one port.
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Arc::new(Gated {
            inner: EmbeddedStore::open(&dir.path().join("l.redb")).unwrap(),
            gate: Mutex::new(None),
        });
        let policy = PortPolicy {
            range: "41100-41102".parse().unwrap(),
            allowed: vec!["41600".parse().unwrap()],
            bind: [127, 0, 0, 1].into(),
            max_per_agent: 2,
        };
        let l = Arc::new(Leases::load(store.clone(), policy).unwrap());
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = port(&l.acquire(a, &[req("x", None)]).await[0]).unwrap();
        // A moves x to 41600; its store write waits.
        *store.gate.lock().unwrap() = Some(rx);
        let moving = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(a, &[req("x", Some(41600))]).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Meanwhile B asks for the port A is leaving.
        let g = l.acquire(b, &[req("y", Some(first))]).await;
        assert_eq!(
            code(&g[0]),
            Some(LeaseRefusal::PortHeld),
            "held during the move"
        );
        // The store refuses A's move: A keeps its old port, B never had it.
        tx.send(false).unwrap();
        let g = moving.await.unwrap();
        assert_eq!(code(&g[0]), Some(LeaseRefusal::StoreFailed));
        let mut ports: Vec<u16> = l.all().iter().map(|x| x.port.get()).collect();
        assert_eq!(ports, vec![first], "A holds its old port, alone");
        // A successful move frees the old port for others.
        let g = l.acquire(a, &[req("x", Some(41600))]).await;
        assert_eq!(port(&g[0]), Some(41600));
        let g = l.acquire(b, &[req("y", Some(first))]).await;
        assert_eq!(port(&g[0]), Some(first));
        ports = l.all().iter().map(|x| x.port.get()).collect();
        ports.sort();
        assert_eq!(ports, vec![first, 41600]);
    }
}
