//! A session's public ports: each granted lease bound for the protocols
//! its tunnel carries (TCP, UDP or both on one number), and served until
//! the session ends or the lease is revoked.

use std::sync::Arc;

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::protocol::{LeaseGrant, LeaseOutcome, LeaseRefusal};
use tokio_util::sync::CancellationToken;

use super::Sessions;
use crate::{
    listener::{self, PublicPort},
    registry::{OpenPort, TunnelStats},
    udp::{port::UdpPort, AgentUdp},
};

impl Sessions {
    /// Starts accepting on bound ports, each until the session ends or its
    /// lease is revoked (a child of the session's token).
    pub(super) fn serve_ports(
        &self,
        ports: Vec<PublicPort>,
        session: &CancellationToken,
    ) -> Vec<OpenPort> {
        ports
            .into_iter()
            .map(|p| {
                let stop = session.child_token();
                OpenPort {
                    stats: p.stats.clone(),
                    stop: stop.clone(),
                    task: tokio::spawn(p.serve(self.dataplane.clone(), self.udp.clone(), stop)),
                }
            })
            .collect()
    }

    /// Binds the granted ports (a port that cannot be bound becomes a
    /// `bind_failed` refusal) and counts the refusals.
    pub(super) async fn open_ports(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        grants: &mut [LeaseGrant],
        asked: &[relaygate_common::protocol::TunnelRequest],
        udp: Option<&Arc<AgentUdp>>,
    ) -> Vec<PublicPort> {
        let mut ports = Vec::new();
        for g in grants.iter_mut() {
            let proto = asked
                .iter()
                .find(|t| t.name == g.name)
                .map(|t| t.proto)
                .unwrap_or_default();
            match &g.outcome {
                LeaseOutcome::Granted { port } if proto.udp() && udp.is_none() => {
                    tracing::warn!(%peer, tunnel = %g.name, %port, "tunnel asks for UDP; this gateway carries none (udp.enabled = false)");
                    g.outcome = LeaseOutcome::Refused {
                        code: LeaseRefusal::UdpOff,
                        message: "this gateway carries no UDP tunnels (udp.enabled = false); use proto=tcp or another gateway".into(),
                    };
                    self.metrics.refuse(LeaseRefusal::UdpOff.as_str());
                }
                LeaseOutcome::Granted { port } => {
                    let claim = self.ports.claim(port.get()).await;
                    match self.bind_both(port.get(), proto, udp).await {
                        Ok((l, u)) => {
                            let stats = Arc::new(TunnelStats::new(
                                &self.metrics,
                                &peer,
                                g.name.clone(),
                                *port,
                            ));
                            ports.push(PublicPort {
                                agent: peer,
                                connection,
                                stats: stats.clone(),
                                listener: l,
                                udp: u.zip(udp).map(|(socket, agent)| UdpPort {
                                    socket,
                                    agent: agent.clone(),
                                    stats,
                                }),
                                claim,
                            });
                        }
                        Err(e) => {
                            tracing::error!(%peer, tunnel = %g.name, %port, error = %e, "cannot bind leased port");
                            g.outcome = LeaseOutcome::Refused {
                                code: LeaseRefusal::BindFailed,
                                message: format!("gateway cannot bind port {port}: {e}"),
                            };
                        }
                    }
                }
                LeaseOutcome::Refused { code, message } => {
                    self.metrics.refuse(code.as_str());
                    tracing::warn!(%peer, tunnel = %g.name, code = code.as_str(), %message, "lease refused");
                }
            }
        }
        ports
    }

    /// Binds a leased port for each protocol the tunnel carries; either
    /// failing fails both.
    async fn bind_both(
        &self,
        port: u16,
        proto: relaygate_common::protocol::Proto,
        udp: Option<&Arc<AgentUdp>>,
    ) -> std::io::Result<(
        Option<tokio::net::TcpListener>,
        Option<tokio::net::UdpSocket>,
    )> {
        let tcp = match proto.tcp() {
            true => Some(listener::bind(self.bind, port).await?),
            false => None,
        };
        let udp = match (proto.udp(), udp) {
            (true, Some(_)) => Some(crate::udp::port::bind(self.bind, port)?),
            _ => None,
        };
        Ok((tcp, udp))
    }
}
