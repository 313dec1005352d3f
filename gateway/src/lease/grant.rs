//! Granting leases: deciding each requested tunnel's port under the table's
//! lock (the wanted one if allowed and free, else the next in the pick
//! order), then claiming it in the store, which may know better (another
//! gateway of the fleet leased the tunnel or the port), and releasing a
//! hello's renamed tunnels once its own are granted.

use std::{collections::HashSet, net::IpAddr};

use libp2p::PeerId;
use relaygate_common::{
    names::{LeasePort, TunnelName},
    protocol::{LeaseGrant, LeaseOutcome, LeaseRefusal, TunnelRequest},
};

use super::{now_ms, FreeReason, Leases, Table};
use crate::store::{Claim, Lease, LeaseKey, StoreError};

/// Ports tried for one automatic lease when the store says other gateways
/// hold the ones this gateway picked.
const CLAIM_ROUNDS: usize = 16;

/// A lease that still has to reach the store, with the port it replaces
/// (held for it until the store answers, and given back if it refuses).
struct Pending {
    lease: Lease,
    previous: Option<LeasePort>,
    /// The port the agent asked for by number, if it did.
    wanted: Option<LeasePort>,
}

impl Leases {
    /// Grants (or refuses) each requested tunnel of `agent`, persisting new
    /// leases: a request made again on the session (a subset of its tunnels).
    pub async fn acquire(&self, agent: PeerId, requests: &[TunnelRequest]) -> Vec<LeaseGrant> {
        self.grant(agent, requests, None).await
    }

    /// Grants a hello's tunnels, which with `paused` (tunnels the agent has
    /// but does not run now) are every tunnel the agent has: its leases
    /// under other names are released once these are granted, and do not
    /// count towards `max_tunnels_per_agent` meanwhile.
    pub async fn acquire_all(
        &self,
        agent: PeerId,
        requests: &[TunnelRequest],
        paused: &[TunnelName],
    ) -> Vec<LeaseGrant> {
        let names: HashSet<TunnelName> = requests
            .iter()
            .map(|r| r.name.clone())
            .chain(paused.iter().cloned())
            .collect();
        let grants = self.grant(agent, requests, Some(&names)).await;
        let renamed = self.lock().renamed(&agent, &names);
        for key in renamed {
            if let Err(e) = self.free(&key, FreeReason::Renamed).await {
                tracing::warn!(lease = %key, error = %e, "cannot release the lease of a renamed tunnel; kept for now");
            }
        }
        grants
    }

    async fn grant(
        &self,
        agent: PeerId,
        requests: &[TunnelRequest],
        named: Option<&HashSet<TunnelName>>,
    ) -> Vec<LeaseGrant> {
        let (mut grants, pending) = self.decide(agent, requests, named);
        // Claimed outside the lock; what the store would not take is rolled back.
        for (i, p) in pending {
            grants[i].outcome = self.settle(p).await;
        }
        // In use from now: a lease granted is never judged by an old time.
        let mine: Vec<LeaseKey> = grants
            .iter()
            .filter(|g| matches!(g.outcome, LeaseOutcome::Granted { .. }))
            .map(|g| LeaseKey {
                agent,
                tunnel: g.name.clone(),
            })
            .collect();
        self.touch_soon(mine);
        self.update_gauge(&self.lock());
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
                    match self.pick(&t, &key, None, None) {
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
        named: Option<&HashSet<TunnelName>>,
    ) -> (Vec<LeaseGrant>, Vec<(usize, Pending)>) {
        let now = now_ms();
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
                match self.pick(&t, &key, req.port, named) {
                    Ok((port, changed)) => {
                        // In use from now, under the lock a sweep takes
                        // before it expires a lease: none expires under a
                        // session being granted it.
                        t.active.insert(key.clone(), now);
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

    /// Chooses a port for `key`; `changed` says whether the table must be
    /// updated. With `named`, only the agent's leases under these names count
    /// towards its cap.
    fn pick(
        &self,
        t: &Table,
        key: &LeaseKey,
        wanted: Option<LeasePort>,
        named: Option<&HashSet<TunnelName>>,
    ) -> Result<(LeasePort, bool), (LeaseRefusal, String)> {
        let policy = self.policy.load();
        let existing = t.by_key.get(key).copied();
        match (existing, wanted) {
            (Some(p), None) => Ok((p, false)),
            (Some(p), Some(w)) if p == w => Ok((p, false)),
            (_, Some(w)) => {
                if !policy.allows(w) {
                    return Err((
                        LeaseRefusal::PortNotAllowed,
                        format!(
                            "port {w} is not allowed here; ask for none, or one in {} {}",
                            policy.range,
                            policy
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
                if existing.is_none() && t.count_for(&key.agent, named) >= policy.max_per_agent {
                    return Err(too_many(policy.max_per_agent));
                }
                Ok((w, true))
            }
            (None, None) => {
                if t.count_for(&key.agent, named) >= policy.max_per_agent {
                    return Err(too_many(policy.max_per_agent));
                }
                t.pick_free(&policy.range, |p| bindable(policy.bind, p))
                    .map(|p| (p, true))
                    .ok_or((
                        LeaseRefusal::RangeExhausted,
                        format!("no free port left in {}", policy.range),
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
