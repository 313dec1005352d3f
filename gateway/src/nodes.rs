//! Nodes reachable by their own peer id through the relay. An agent claims
//! the peer id of the node behind each of its tunnels; the gateway checks
//! the claim itself, by running the node's security handshake through that
//! agent's tunnel (as any dialer would), and only then relays circuits
//! addressed to that peer id (`hop.rs`) to the agent, which splices them to
//! the node like a tunnelled connection. One agent fronts a node id at a
//! time; a claim on an id another agent fronts is refused.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::{
    names::{LeasePort, TunnelName},
    probe::peer_id_over,
    protocol::StreamHeader,
};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::listener::{self, agent_status, DataPlane};

/// How long the check of one claim may take, the agent's connect included.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Who fronts a node, from which session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fronted {
    pub agent: PeerId,
    pub tunnel: TunnelName,
    pub port: LeasePort,
    /// The agent's session (`AgentRegistry::register`'s id): a session that
    /// ends releases only what it claimed.
    pub session: u64,
    /// Unix seconds.
    pub since: u64,
}

/// What `/v1/nodes` lists.
#[derive(Serialize)]
pub struct NodeView {
    pub node: String,
    pub agent: String,
    pub tunnel: String,
    pub port: u16,
    pub since: u64,
}

/// Which agent fronts which node id.
#[derive(Default)]
pub struct NodeBook {
    by_node: Mutex<HashMap<PeerId, Fronted>>,
}

impl NodeBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Fronted>> {
        self.by_node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `f.agent` fronts `node`; the agent's earlier node on the
    /// same tunnel (a node that came back with another identity) is let go.
    /// Refused with the agent that fronts it already, if another does.
    pub fn claim(&self, node: PeerId, f: Fronted) -> Result<(), PeerId> {
        let mut book = self.lock();
        match book.get(&node) {
            Some(held) if held.agent != f.agent => return Err(held.agent),
            // A late check of a session the agent has since replaced.
            Some(held) if held.session > f.session => return Ok(()),
            _ => {}
        }
        book.retain(|n, h| {
            !(h.agent == f.agent && h.tunnel == f.tunnel && *n != node && h.session <= f.session)
        });
        book.insert(node, f);
        Ok(())
    }

    pub fn get(&self, node: &PeerId) -> Option<Fronted> {
        self.lock().get(node).cloned()
    }

    /// Lets go of what one session of `agent` claimed.
    pub fn release(&self, agent: &PeerId, session: u64) {
        self.lock()
            .retain(|_, h| !(h.agent == *agent && h.session == session));
    }

    /// Lets go of `node`, whoever fronts it (the admin API); whether it was held.
    pub fn clear(&self, node: &PeerId) -> bool {
        self.lock().remove(node).is_some()
    }

    pub fn list(&self) -> Vec<NodeView> {
        let mut out: Vec<NodeView> = self
            .lock()
            .iter()
            .map(|(n, h)| NodeView {
                node: n.to_string(),
                agent: h.agent.to_string(),
                tunnel: h.tunnel.to_string(),
                port: h.port.get(),
                since: h.since,
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

/// Runs the node's handshake through `agent`'s tunnel `tunnel` and says
/// whether the node proved `claimed`; `Err` says why not, for the agent.
pub async fn check(
    dp: &DataPlane,
    (agent, connection): (PeerId, ConnectionId),
    tunnel: &TunnelName,
    port: LeasePort,
    claimed: PeerId,
) -> Result<(), String> {
    let run = async {
        // The lane (or the session's lane) carries it: the bytes of a
        // handshake, unframed, as a remote's would be.
        let Some(mut stream) = listener::open_any_lane(dp, &agent, connection).await else {
            return Err("the gateway checks a node over a lane, and none is up to this agent (session.data_path = \"lane\" on both ends)".to_string());
        };
        let header = StreamHeader {
            tunnel: tunnel.clone(),
            // Unspecified: the agent connects from its own address, even
            // with transparent delivery (nothing to spoof for a check).
            source: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            destination: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port.get())),
            peer: None,
        };
        stream
            .write_all(&header.encode())
            .await
            .map_err(|e| format!("cannot reach the agent: {e}"))?;
        agent_status(&mut stream, &dp.metrics)
            .await
            .map_err(|e| format!("the agent could not reach its node: {e}"))?;
        peer_id_over(stream.compat())
            .await
            .map_err(|e| format!("the node behind tunnel {tunnel}: {e}"))
    };
    match tokio::time::timeout(CHECK_TIMEOUT, run).await {
        Ok(Ok(proved)) if proved == claimed => Ok(()),
        Ok(Ok(proved)) => Err(format!(
            "the node behind tunnel {tunnel} proved peer id {proved}, not {claimed}"
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "the node behind tunnel {tunnel} did not finish its handshake within {CHECK_TIMEOUT:?}"
        )),
    }
}

/// Carries a circuit to a node fronted by `owner`: the circuit's bytes
/// (the dialer's own handshake with the node, then its streams) go to the
/// agent like a public connection of the node's tunnel, from `source`, the
/// dialer's address as this gateway saw it, naming `dialer`.
pub async fn carry_circuit<S>(
    dp: &DataPlane,
    owner: &crate::registry::PortOwner,
    (dialer, source): (PeerId, SocketAddr),
    circuit: S,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let origin = listener::Origin {
        source,
        destination: SocketAddr::from((Ipv4Addr::UNSPECIFIED, owner.stats.port.get())),
        prefix: Vec::new(),
        untrusted: false,
        peer: Some(dialer),
    };
    let to = crate::session_stream::Agent {
        peer: owner.agent,
        connection: owner.connection,
        stats: &owner.stats,
    };
    owner.stats.opened.inc();
    owner.stats.active.inc();
    owner.stats.saw(source);
    let (r, w) = tokio::io::split(circuit);
    let carried = match listener::open_any_lane(dp, &owner.agent, owner.connection).await {
        Some(lane) => crate::session_stream::carry_on_lane(dp, to, origin, lane, r, w).await,
        None => crate::session_stream::carry(dp, to, origin, r, w).await,
    };
    owner.stats.active.dec();
    carried
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fronted(agent: PeerId, tunnel: &str, session: u64) -> Fronted {
        Fronted {
            agent,
            tunnel: tunnel.parse().expect("a tunnel name"),
            port: LeasePort::new(20000).expect("a port"),
            session,
            since: 0,
        }
    }

    #[test]
    fn one_agent_fronts_a_node_and_a_new_identity_replaces_the_old() {
        let book = NodeBook::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let (n1, n2) = (PeerId::random(), PeerId::random());
        assert_eq!(book.claim(n1, fronted(a, "node", 1)), Ok(()));
        assert_eq!(book.claim(n1, fronted(b, "node", 7)), Err(a));
        // The node came back as n2: n1 is no longer fronted.
        assert_eq!(book.claim(n2, fronted(a, "node", 1)), Ok(()));
        assert!(book.get(&n1).is_none());
        assert_eq!(book.claim(n1, fronted(b, "node", 7)), Ok(()));
        // A later session's claims survive the end of an earlier one.
        assert_eq!(book.claim(n2, fronted(a, "node", 2)), Ok(()));
        book.release(&a, 1);
        assert!(book.get(&n2).is_some());
        book.release(&a, 2);
        assert!(book.get(&n2).is_none());
        assert!(book.clear(&n1));
        assert!(book.list().is_empty());
    }
}
