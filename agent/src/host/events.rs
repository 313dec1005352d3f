//! What the agent's swarm reports: listeners, connections (admitted or
//! refused strangers), relay reservations and circuits, hole punches and
//! their outcome, identify and AutoNAT verdicts, each logged, counted and
//! passed to the agent's state.

use libp2p::{autonat, core::ConnectedPoint, dcutr, ping, relay, swarm::SwarmEvent};
use relaygate_common::metrics::{ReasonLabels, Side};

use super::{Behaviour, BehaviourEvent, Driver, RESERVE_RETRY};
use crate::{
    metrics::{PunchLabels, PunchResult, TransportLabels},
    paths::PunchEvent,
};

impl Driver {
    pub(super) fn event(
        &mut self,
        swarm: &mut libp2p::Swarm<Behaviour>,
        event: SwarmEvent<BehaviourEvent>,
    ) {
        let session = relaygate_common::metrics::SideLabels {
            side: Side::Session,
        };
        let peers = &self.metrics.peers;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if self.relay_of(listener_id).is_some() {
                    tracing::info!(%address, "relay reservation active; reachable by peer id at this address");
                    self.state.add_circuit_addr(address.to_string());
                    self.publish_circuits();
                } else {
                    tracing::debug!(%address, "hole-punch listener up");
                    *self.listeners_up.entry(listener_id).or_default() += 1;
                    if self.listeners_up.len() >= self.expected_listeners {
                        let _ = self.listening.send(true);
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } if self.relay_of(listener_id).is_some() => {
                self.state.remove_circuit_addr(&address.to_string());
                self.publish_circuits();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(gw) = self.relay_of(listener_id) {
                    if let Some(r) = self.relays.get_mut(&gw) {
                        r.listener = None;
                        r.reserved = false;
                    }
                    self.state.clear_circuit_addrs_of(&gw);
                    self.publish_circuits();
                    peers.reservation_active.set(self.reservations());
                    match &reason {
                        Err(e) => tracing::warn!(error = %e, "relay reservation failed or lost"),
                        Ok(()) => tracing::info!("relay reservation ended with its connection"),
                    }
                    // While the session is up, a lost reservation is taken again;
                    // a new session reserves anyway.
                    if swarm.is_connected(&gw) && self.gateways.contains(&gw) {
                        if let Some(r) = self.relays.get_mut(&gw) {
                            r.retry = Some(tokio::time::Instant::now() + RESERVE_RETRY);
                        }
                    } else {
                        self.relays.remove(&gw);
                    }
                } else if let Err(e) = reason {
                    tracing::warn!(error = %e, "hole-punch listener closed");
                }
            }
            SwarmEvent::ListenerError { error, .. } => tracing::debug!(%error, "listener error"),
            SwarmEvent::ConnectionEstablished {
                connection_id,
                endpoint,
                peer_id,
                ..
            } => {
                self.metrics
                    .connections_opened
                    .get_or_create(&session)
                    .inc();
                self.metrics
                    .connections_active
                    .get_or_create(&session)
                    .inc();
                let relayed = endpoint.is_relayed();
                let (addr, remote) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), address.clone()),
                    ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => (local_addr.clone(), send_back_addr.clone()),
                };
                tracing::debug!(peer = %peer_id, %remote, relayed, "connection up");
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(remote.clone()));
                }
                for r in self.pending_connects.remove(&peer_id).unwrap_or_default() {
                    let _ = r.send(Ok(()));
                }
                if self.gateways.contains(&peer_id) {
                    self.paths
                        .connection_up(peer_id, connection_id, remote, false, &addr);
                    return;
                }
                match self
                    .paths
                    .connection_up(peer_id, connection_id, remote, relayed, &addr)
                {
                    Some(PunchEvent::Started(transport)) => {
                        peers
                            .holepunch_attempts
                            .get_or_create(&TransportLabels { transport })
                            .inc();
                    }
                    Some(PunchEvent::Succeeded { transport, after }) => {
                        tracing::info!(peer = %peer_id, ?transport, ms = after.as_millis() as u64, "hole punch succeeded; new streams use the direct connection");
                        peers
                            .holepunch_results
                            .get_or_create(&PunchLabels {
                                transport,
                                result: PunchResult::Success,
                            })
                            .inc();
                        peers
                            .holepunch_seconds
                            .get_or_create(&TransportLabels { transport })
                            .observe(after.as_secs_f64());
                    }
                    None => {}
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                self.metrics
                    .connections_active
                    .get_or_create(&session)
                    .dec();
                self.paths.connection_down(connection_id);
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                if let Some(peer) = peer_id {
                    if self.paths.dial_failed(&peer) {
                        peers.holepunch_dial_failures.inc();
                    }
                    if !swarm.is_connected(&peer) {
                        for r in self.pending_connects.remove(&peer).unwrap_or_default() {
                            let _ = r.send(Err(error.to_string()));
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) if !matches!(e, ping::Failure::Unsupported) => {
                tracing::info!(%peer, error = %e, "ping failed; closing connection");
                swarm.close_connection(connection);
                if self.gateways.contains(&peer) {
                    let _ = self.gateway_lost.send(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => match e {
                relay::client::Event::ReservationReqAccepted {
                    renewal,
                    relay_peer_id,
                    ..
                } => {
                    if let Some(r) = self.relays.get_mut(&relay_peer_id) {
                        r.reserved = true;
                    }
                    peers.reservation_active.set(self.reservations());
                    let result = if renewal { "renewed" } else { "accepted" };
                    peers
                        .reservations
                        .get_or_create(&ReasonLabels::new(result))
                        .inc();
                }
                other => tracing::debug!(event = ?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => tracing::debug!(peer = %remote_peer_id, "DCUtR direct connection up"),
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; the relay stays in use");
                    if let Some(transport) = self.paths.punch_failed(&remote_peer_id, e.to_string())
                    {
                        peers
                            .holepunch_results
                            .get_or_create(&PunchLabels {
                                transport,
                                result: PunchResult::Failure,
                            })
                            .inc();
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let (v, text) = match &new {
                    autonat::NatStatus::Public(a) => (1, format!("public at {a}")),
                    autonat::NatStatus::Private => (0, "private (behind NAT)".to_string()),
                    autonat::NatStatus::Unknown => (-1, "unknown".to_string()),
                };
                peers.reachable.set(v);
                self.state.set_reachability(text.clone());
                tracing::info!(reachability = %text, "AutoNAT verdict from the gateway");
            }
            _ => {}
        }
    }
}
