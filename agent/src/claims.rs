//! The nodes behind the tunnels, claimed at the gateway so that it relays
//! circuits addressed to their own peer ids here (issue #17): after each
//! session's probe, the agent names each leased tunnel's node; the gateway
//! checks the claim through the tunnel and answers. An accepted node is
//! advertised at its circuit addresses through the gateway beside its
//! leased-port addresses.

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    names::TunnelName,
    protocol::{LeaseGrant, LeaseOutcome, NodeClaim},
};

use crate::config::TunnelConfig;

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
