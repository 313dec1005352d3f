//! The nodes behind the tunnels (issue #17): each session probes them (what
//! the node proves), names each leased tunnel's node to the gateway, which
//! checks the claim through the tunnel and answers, and probes again every
//! `node_recheck`. An accepted node is advertised at its circuit addresses
//! through the gateway beside its leased-port addresses.

use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    names::TunnelName,
    protocol::{write_control, ControlMessage, LeaseGrant, LeaseOutcome, NodeClaim, WireError},
};

use crate::{
    advertise,
    config::{NodeId, TunnelConfig},
    session::{publish, Session},
};

/// How long the node may take to answer the identity probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Each tunnel's node as the session's probe found it.
pub type Nodes = std::collections::HashMap<TunnelName, Result<PeerId, String>>;

/// Claims for the tunnels the gateway leased whose node proved its id.
pub fn claims(tunnels: &[TunnelConfig], nodes: &Nodes, leases: &[LeaseGrant]) -> Vec<NodeClaim> {
    tunnels
        .iter()
        .filter(|t| {
            leases
                .iter()
                .any(|g| g.name == t.name && matches!(g.outcome, LeaseOutcome::Granted { .. }))
        })
        .filter_map(|t| match nodes.get(&t.name) {
            Some(Ok(node)) => Some(NodeClaim {
                tunnel: t.name.clone(),
                node: node.to_string(),
            }),
            _ => None,
        })
        .collect()
}

/// `node`'s addresses through `gateway`'s relay: each advertised host with
/// the transport of the address the session dialled, then
/// `/p2p/<gateway>/p2p-circuit/p2p/<node>`.
pub fn circuit_addrs(
    hosts: &[Multiaddr],
    dialled: &Multiaddr,
    gateway: PeerId,
    node: PeerId,
) -> Vec<Multiaddr> {
    let transport: Vec<Protocol> = dialled
        .iter()
        .skip(1)
        .take_while(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    hosts
        .iter()
        .map(|h| {
            let mut a = h.clone();
            for p in &transport {
                a.push(p.clone());
            }
            a.with(Protocol::P2p(gateway))
                .with(Protocol::P2pCircuit)
                .with(Protocol::P2p(node))
        })
        .collect()
}

impl Session {
    /// Each tunnel's node identity for this session: learnt from the node
    /// (`node_peer_id = "auto"`), or given and checked against the node. A
    /// node that holds another id than the one given is an error on the
    /// tunnel (its advertised addresses would not reach it).
    pub(crate) async fn probe_nodes(&self, previous: &Nodes) -> Nodes {
        // All at once: a node that does not answer costs the timeout once.
        let probes = self.tunnels.iter().filter_map(|t| {
            let wanted = t.node_peer_id?;
            Some(async move {
                (
                    t,
                    wanted,
                    crate::probe::node_peer_id(&t.target, PROBE_TIMEOUT).await,
                )
            })
        });
        let mut nodes = Nodes::new();
        for (t, wanted, found) in futures::future::join_all(probes).await {
            match (wanted, found) {
                (NodeId::Auto, Ok(p)) => {
                    match previous.get(&t.name) {
                        Some(Ok(was)) if *was == p => {}
                        Some(Ok(was)) => {
                            tracing::warn!(tunnel = %t.name, node = %p, %was, "the node came back with another peer id; advertising and claiming the new one")
                        }
                        _ => {
                            tracing::info!(tunnel = %t.name, node = %p, "learnt the node's peer id")
                        }
                    }
                    nodes.insert(t.name.clone(), Ok(p));
                }
                (NodeId::Auto, Err(e)) => match previous.get(&t.name) {
                    // A node that does not answer for a moment keeps its id.
                    Some(Ok(was)) => {
                        nodes.insert(t.name.clone(), Ok(*was));
                    }
                    _ => {
                        tracing::warn!(tunnel = %t.name, error = %e, "cannot learn the node's peer id; advertising without it")
                    }
                },
                (NodeId::Given(id), Ok(p)) if p == id => {
                    nodes.insert(t.name.clone(), Ok(p));
                }
                (NodeId::Given(id), Ok(p)) => {
                    let why = format!(
                        "the node at {} holds peer id {p}, not the configured {id}; fix: set node_peer_id={p} (or auto), or point the tunnel at the node that holds {id}",
                        t.target
                    );
                    tracing::error!(tunnel = %t.name, "{why}");
                    nodes.insert(t.name.clone(), Err(why));
                }
                (NodeId::Given(id), Err(e)) => {
                    tracing::warn!(tunnel = %t.name, error = %e, "cannot check the node's peer id; advertising the configured one");
                    nodes.insert(t.name.clone(), Ok(id));
                }
            }
        }
        nodes
    }

    /// Names the nodes of newly leased tunnels to a gateway that takes claims.
    pub(crate) async fn claim_nodes<S>(
        &self,
        ctl: &mut S,
        welcome: &relaygate_common::protocol::Welcome,
        leases: &[LeaseGrant],
        nodes: &Nodes,
    ) -> Result<(), WireError>
    where
        S: tokio::io::AsyncWrite + Unpin,
    {
        if !welcome.node_claims {
            return Ok(());
        }
        let claims = crate::claims::claims(&self.tunnels, nodes, leases);
        if claims.is_empty() {
            return Ok(());
        }
        write_control(ctl, &ControlMessage::Nodes { claims }).await
    }

    /// The gateway's verdict on a node claim: an accepted node is advertised
    /// at its circuit addresses through this gateway.
    pub(crate) fn node_verdict(
        &self,
        welcome: &relaygate_common::protocol::Welcome,
        dialled: &Multiaddr,
        tunnel: &relaygate_common::names::TunnelName,
        node: &str,
        accepted: bool,
        reason: &str,
    ) {
        let node = match node.parse::<PeerId>() {
            Ok(n) if accepted => n,
            Ok(_) => {
                tracing::warn!(%tunnel, %node, gateway = %self.gateway, %reason, "the gateway refused the node's claim: no circuits to it through this gateway");
                self.state.set_circuits(self.gateway, tunnel, Vec::new());
                publish(&self.state, &self.tunnels, &self.metrics);
                return;
            }
            Err(_) => {
                self.metrics.bad_input("node_verdict");
                return;
            }
        };
        let hosts = advertise::hosts(&welcome.fleet_hosts, &welcome.public_hosts, dialled);
        let addrs: Vec<String> = crate::claims::circuit_addrs(&hosts, dialled, self.gateway, node)
            .iter()
            .map(|a| a.to_string())
            .collect();
        let circuit = addrs.join(",");
        self.state.set_circuits(self.gateway, tunnel, addrs);
        // Logged once published: the file and the admin API say the same.
        publish(&self.state, &self.tunnels, &self.metrics);
        tracing::info!(
            %tunnel, %node, gateway = %self.gateway, %circuit,
            "node reachable by its own peer id through the gateway's relay"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_addresses_name_the_gateway_then_the_node() {
        let (gw, node) = (PeerId::random(), PeerId::random());
        let dialled: Multiaddr = format!("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/{gw}")
            .parse()
            .expect("an address");
        let hosts: Vec<Multiaddr> = vec!["/dns4/gw.example.com".parse().expect("a host")];
        assert_eq!(
            circuit_addrs(&hosts, &dialled, gw, node),
            vec![
                format!("/dns4/gw.example.com/udp/4001/quic-v1/p2p/{gw}/p2p-circuit/p2p/{node}")
                    .parse::<Multiaddr>()
                    .expect("an address")
            ]
        );
    }
}
