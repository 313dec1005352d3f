//! What the agent knows right now: its sessions (one per gateway of the
//! fleet it holds) and what each tunnel leased on each. Written by the
//! sessions, read by the admin API; a tunnel's advertised addresses are the
//! union of every gateway's.

use std::{collections::BTreeMap, sync::Mutex};

use libp2p::{Multiaddr, PeerId};
use relaygate_common::names::TunnelName;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub gateway: String,
    pub address: String,
    /// Seconds since the UNIX epoch.
    pub since: u64,
}

/// A gateway of the fleet as the agent last heard of it, held or not.
#[derive(Clone, Debug, Serialize)]
pub struct FleetGateway {
    pub gateway: String,
    pub addresses: Vec<String>,
    /// Whether the agent holds a session with it now.
    pub session: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TunnelStatus {
    pub name: String,
    pub target: String,
    pub port: Option<u16>,
    pub addresses: Vec<String>,
    /// The node's addresses through the gateways' relays, by its own peer
    /// id, where a gateway checked it.
    pub circuits: Vec<String>,
    /// Why the tunnel has no lease, if it has none.
    pub error: Option<String>,
}

/// `/v1/advertise`: what the node should advertise and what the agent
/// holds. Built in one place for the route, the console's overview and the
/// in-process doctor.
#[derive(Clone, Debug, Serialize)]
pub struct AdvertiseView {
    /// The configured gateway's session, else any (`null` without one).
    pub session: Option<SessionInfo>,
    pub sessions: Vec<SessionInfo>,
    pub fleet: Vec<FleetGateway>,
    pub tunnels: Vec<TunnelStatus>,
    /// This agent's own circuit addresses.
    pub circuit: Vec<String>,
    pub reachability: Option<String>,
}

#[derive(Default)]
pub struct AgentState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Sessions up, by gateway peer id (the configured gateway's first in
    /// `/v1/advertise`'s `session`).
    sessions: BTreeMap<PeerId, SessionInfo>,
    /// The gateway the agent was configured with.
    seed: Option<PeerId>,
    /// Every gateway of the fleet, as the last welcome or `Fleet` message named them.
    fleet: BTreeMap<PeerId, Vec<Multiaddr>>,
    /// Each tunnel's status before any gateway answered (or why it did not start).
    tunnels: BTreeMap<TunnelName, TunnelStatus>,
    /// What each gateway answered for each tunnel.
    grants: BTreeMap<TunnelName, BTreeMap<PeerId, TunnelStatus>>,
    /// This agent's addresses through the gateway's relay (`.../p2p-circuit/p2p/<me>`).
    circuit: Vec<String>,
    /// AutoNAT's verdict, in words.
    reachability: Option<String>,
}

impl AgentState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_seed(&self, gateway: PeerId) {
        self.lock().seed = Some(gateway);
    }

    /// The fleet's gateways, as a gateway last named them.
    pub fn set_fleet(&self, known: &BTreeMap<PeerId, Vec<Multiaddr>>) {
        self.lock().fleet = known.clone();
    }

    /// Every gateway known: the fleet, and any held outside it (the
    /// configured gateway before its welcome names the fleet).
    pub fn fleet(&self) -> Vec<FleetGateway> {
        let g = self.lock();
        let mut out: Vec<FleetGateway> = g
            .fleet
            .iter()
            .map(|(p, addrs)| FleetGateway {
                gateway: p.to_string(),
                addresses: addrs.iter().map(|a| a.to_string()).collect(),
                session: g.sessions.contains_key(p),
            })
            .collect();
        for (p, s) in g.sessions.iter().filter(|(p, _)| !g.fleet.contains_key(p)) {
            out.push(FleetGateway {
                gateway: p.to_string(),
                addresses: vec![s.address.clone()],
                session: true,
            });
        }
        out
    }

    pub fn session_up(&self, gateway: PeerId, address: &Multiaddr) {
        let since = relaygate_common::clock::unix_now();
        self.lock().sessions.insert(
            gateway,
            SessionInfo {
                gateway: gateway.to_string(),
                address: address.to_string(),
                since,
            },
        );
    }

    /// The session with `gateway` ended: what it granted is no longer advertised.
    pub fn session_down(&self, gateway: &PeerId) {
        let mut g = self.lock();
        g.sessions.remove(gateway);
        for per in g.grants.values_mut() {
            per.remove(gateway);
        }
    }

    pub fn set_tunnel(&self, name: &TunnelName, status: TunnelStatus) {
        self.lock().tunnels.insert(name.clone(), status);
    }

    /// What `gateway` answered for a tunnel.
    pub fn set_grant(&self, gateway: PeerId, name: &TunnelName, status: TunnelStatus) {
        self.lock()
            .grants
            .entry(name.clone())
            .or_default()
            .insert(gateway, status);
    }

    /// The node's circuit addresses through `gateway` (none: refused or unchecked).
    pub fn set_circuits(&self, gateway: PeerId, name: &TunnelName, circuits: Vec<String>) {
        if let Some(s) = self
            .lock()
            .grants
            .get_mut(name)
            .and_then(|per| per.get_mut(&gateway))
        {
            s.circuits = circuits;
        }
    }

    /// A tunnel as every gateway answered it together.
    pub fn tunnel(&self, name: &TunnelName) -> Option<TunnelStatus> {
        let g = self.lock();
        g.tunnels.get(name).map(|base| g.merged(name, base))
    }

    pub fn add_circuit_addr(&self, addr: String) {
        let mut g = self.lock();
        if !g.circuit.contains(&addr) {
            g.circuit.push(addr);
        }
    }

    pub fn remove_circuit_addr(&self, addr: &str) {
        self.lock().circuit.retain(|a| a != addr);
    }

    /// Forgets the circuit addresses through `relay`'s reservation.
    pub fn clear_circuit_addrs_of(&self, relay: &PeerId) {
        let through = format!("/p2p/{relay}/p2p-circuit");
        self.lock().circuit.retain(|a| !a.contains(&through));
    }

    pub fn circuit_addrs(&self) -> Vec<String> {
        self.lock().circuit.clone()
    }

    pub fn set_reachability(&self, text: String) {
        self.lock().reachability = Some(text);
    }

    pub fn reachability(&self) -> Option<String> {
        self.lock().reachability.clone()
    }

    /// The configured gateway's session, else any.
    pub fn session(&self) -> Option<SessionInfo> {
        let g = self.lock();
        g.seed
            .and_then(|s| g.sessions.get(&s))
            .or_else(|| g.sessions.values().next())
            .cloned()
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.lock().sessions.values().cloned().collect()
    }

    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        let g = self.lock();
        g.tunnels
            .iter()
            .map(|(name, base)| g.merged(name, base))
            .collect()
    }

    /// Everything `/v1/advertise` shows.
    pub fn advertise(&self) -> AdvertiseView {
        AdvertiseView {
            session: self.session(),
            sessions: self.sessions(),
            fleet: self.fleet(),
            tunnels: self.tunnels(),
            circuit: self.circuit_addrs(),
            reachability: self.reachability(),
        }
    }

    /// Reasons the agent is not ready (empty when it is).
    pub fn problems(&self) -> Vec<String> {
        let g = self.lock();
        let mut out = Vec::new();
        if g.sessions.is_empty() {
            out.push("no session with the gateway".into());
        }
        for t in g.tunnels.iter().map(|(name, base)| g.merged(name, base)) {
            if t.port.is_none() {
                out.push(format!(
                    "tunnel {} has no lease{}",
                    t.name,
                    t.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            } else if let Some(e) = &t.error {
                // Leased, but wrong (its node holds another peer id).
                out.push(format!("tunnel {}: {e}", t.name));
            }
        }
        out
    }
}

impl Inner {
    /// One tunnel over every gateway: its port (the same on each), the
    /// union of their addresses (the configured gateway's first), and an
    /// error when no gateway leased it, or when one found it wrong.
    fn merged(&self, name: &TunnelName, base: &TunnelStatus) -> TunnelStatus {
        let Some(per) = self.grants.get(name).filter(|p| !p.is_empty()) else {
            return base.clone();
        };
        let mut order: Vec<&TunnelStatus> = Vec::new();
        if let Some(s) = self.seed.and_then(|s| per.get(&s)) {
            order.push(s);
        }
        order.extend(
            per.iter()
                .filter(|(p, _)| Some(**p) != self.seed)
                .map(|(_, s)| s),
        );
        let mut out = TunnelStatus {
            name: base.name.clone(),
            target: base.target.clone(),
            ..Default::default()
        };
        for s in &order {
            if out.port.is_none() {
                out.port = s.port;
            }
            for a in &s.addresses {
                if !out.addresses.contains(a) {
                    out.addresses.push(a.clone());
                }
            }
            for a in &s.circuits {
                if !out.circuits.contains(a) {
                    out.circuits.push(a.clone());
                }
            }
        }
        out.error = if out.port.is_none() {
            order.iter().find_map(|s| s.error.clone())
        } else {
            order
                .iter()
                .filter(|s| s.port.is_some())
                .find_map(|s| s.error.clone())
        };
        out
    }
}
