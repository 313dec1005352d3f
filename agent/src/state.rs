//! What the agent knows right now: whether its session is up and what each
//! tunnel leased. Written by the session, read by the admin API.

use std::{collections::BTreeMap, sync::Mutex, time::SystemTime};

use libp2p::{Multiaddr, PeerId};
use relaygate_common::names::{LeasePort, TunnelName};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub gateway: String,
    pub address: String,
    /// Seconds since the UNIX epoch.
    pub since: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TunnelStatus {
    pub name: String,
    pub target: String,
    pub port: Option<u16>,
    pub addresses: Vec<String>,
    /// Why the tunnel has no lease, if it has none.
    pub error: Option<String>,
}

#[derive(Default)]
pub struct AgentState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    session: Option<SessionInfo>,
    tunnels: BTreeMap<TunnelName, TunnelStatus>,
    /// This agent's addresses through the gateway's relay (`.../p2p-circuit/p2p/<me>`).
    circuit: Vec<String>,
    /// AutoNAT's verdict, in words.
    reachability: Option<String>,
}

impl AgentState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn session_up(&self, gateway: PeerId, address: &Multiaddr) {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.lock().session = Some(SessionInfo {
            gateway: gateway.to_string(),
            address: address.to_string(),
            since,
        });
    }

    pub fn session_down(&self) {
        self.lock().session = None;
    }

    pub fn set_tunnel(&self, name: &TunnelName, status: TunnelStatus) {
        self.lock().tunnels.insert(name.clone(), status);
    }

    pub fn leased(&self, name: &TunnelName) -> Option<LeasePort> {
        self.lock()
            .tunnels
            .get(name)
            .and_then(|t| t.port)
            .and_then(LeasePort::new)
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

    pub fn clear_circuit_addrs(&self) {
        self.lock().circuit.clear();
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

    pub fn session(&self) -> Option<SessionInfo> {
        self.lock().session.clone()
    }

    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        self.lock().tunnels.values().cloned().collect()
    }

    /// Reasons the agent is not ready (empty when it is).
    pub fn problems(&self) -> Vec<String> {
        let g = self.lock();
        let mut out = Vec::new();
        if g.session.is_none() {
            out.push("no session with the gateway".into());
        }
        for t in g.tunnels.values() {
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
