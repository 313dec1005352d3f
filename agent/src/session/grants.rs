//! What a session does with the gateway's lease answers: the advertised
//! addresses of each granted tunnel (TCP on every host, UDP on the
//! gateway's own), the tunnels to ask for again, and the advertise files.

use libp2p::Multiaddr;
use relaygate_common::protocol::{LeaseGrant, LeaseOutcome, Proto, TunnelRequest};

use super::Session;
use crate::{
    advertise,
    claims::Nodes,
    config::{NodeId, TunnelConfig},
    metrics::Metrics,
    state::{AgentState, TunnelStatus},
};

impl Session {
    /// Records what the gateway answered for each tunnel (only for the
    /// tunnels `leases` names, when `only_named`), and publishes the result.
    pub(super) fn apply_grants(
        &self,
        welcome: &relaygate_common::protocol::Welcome,
        leases: &[LeaseGrant],
        dialled: &Multiaddr,
        nodes: &Nodes,
        only_named: bool,
    ) {
        let hosts = advertise::hosts(&welcome.fleet_hosts, &welcome.public_hosts, dialled);
        for t in &self.tunnels {
            let grant = leases.iter().find(|g| g.name == t.name);
            if only_named && grant.is_none() {
                continue;
            }
            let mut status = TunnelStatus {
                name: t.name.to_string(),
                target: t.target.to_string(),
                ..Default::default()
            };
            match grant.map(|g| &g.outcome) {
                Some(LeaseOutcome::Granted { port }) => {
                    let node = match nodes.get(&t.name) {
                        Some(Ok(p)) => Some(*p),
                        Some(Err(why)) => {
                            status.error = Some(why.clone());
                            t.node_peer_id.and_then(NodeId::given)
                        }
                        None => None,
                    };
                    let mut addrs = Vec::new();
                    if t.proto.tcp() {
                        addrs = advertise::addresses(&hosts, *port, node, Proto::Tcp);
                    }
                    if t.proto.udp() {
                        // Only this gateway's own hosts: a fleet's shared name
                        // may lead to a gateway without this agent's channel
                        // (fleet forwarding carries TCP only).
                        let own = advertise::hosts(&[], &welcome.public_hosts, dialled);
                        addrs.extend(advertise::addresses(&own, *port, node, Proto::Udp));
                    }
                    status.port = Some(port.get());
                    status.addresses = addrs.iter().map(|a| a.to_string()).collect();
                    tracing::info!(
                        tunnel = %t.name, target = %t.target, port = %port, gateway = %self.gateway,
                        advertise = %status.addresses.join(","),
                        "tunnel leased; point the node's advertise addresses here"
                    );
                }
                Some(LeaseOutcome::Refused { code, message }) => {
                    self.metrics.refuse(code.as_str());
                    tracing::error!(tunnel = %t.name, code = code.as_str(), %message, "gateway refused the tunnel's lease");
                    status.error = Some(format!("{}: {message}", code.as_str()));
                }
                None => status.error = Some("gateway did not answer for this tunnel".into()),
            }
            self.state.set_grant(self.gateway, &t.name, status);
        }
        publish(&self.state, &self.tunnels, &self.metrics);
    }

    /// The tunnels refused for a passing reason, to ask for again.
    pub(super) fn to_retry(&self, leases: &[LeaseGrant]) -> Vec<TunnelRequest> {
        leases
            .iter()
            .filter(
                |g| matches!(&g.outcome, LeaseOutcome::Refused { code, .. } if code.is_transient()),
            )
            .filter_map(|g| self.tunnels.iter().find(|t| t.name == g.name))
            .map(|t| TunnelRequest {
                name: t.name.clone(),
                port: t.port,
                proto: t.proto,
            })
            .collect()
    }
}

/// After a gateway granted, or a session ended: each tunnel's advertise file
/// gets what every gateway holding it granted, and `leases` counts the
/// tunnels leased on at least one.
pub fn publish(state: &AgentState, tunnels: &[TunnelConfig], metrics: &Metrics) {
    let mut leased = 0;
    for t in tunnels {
        let Some(status) = state.tunnel(&t.name).filter(|s| s.port.is_some()) else {
            continue;
        };
        leased += 1;
        let Some(path) = &t.advertise_file else {
            continue;
        };
        // The leased port's addresses, then the node's circuit addresses.
        let addrs: Vec<Multiaddr> = status
            .addresses
            .iter()
            .chain(&status.circuits)
            .filter_map(|a| a.parse().ok())
            .collect();
        if let Err(e) = advertise::write_file(path, &addrs) {
            tracing::error!(tunnel = %t.name, path = %path.display(), error = %e, "cannot write advertise file");
        }
    }
    metrics.leases.set(leased);
}
