//! The circuit relay v2 hop: answers RESERVE (members freely, `limited_peers`
//! with a Limit, anyone else PERMISSION_DENIED) and CONNECT (STOP toward the
//! reserved peer on the connection it reserved over, then relay the bytes).
//! Circuits to members carry no Limit, so go-libp2p and js-libp2p treat them
//! as full connections. A CONNECT to a node an agent fronts (`nodes.rs`)
//! goes to that agent's tunnel instead, with no Limit either.

use std::{collections::HashSet, sync::Arc, time::Duration};

use libp2p::{
    identity::Keypair, multiaddr::Protocol, swarm::ConnectionId, Multiaddr, PeerId, Stream,
};
use relaygate_common::circuit::{
    self, encode_addrs, read_message, write_message, HopMessage, HopType, Limit, Status,
    StopMessage, STOP_PROTOCOL,
};
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken, task::TaskTracker};

use crate::{
    circuit::{relay, Bounds, Ends},
    config::RelayConfig,
    guard::{Action, Guard},
    host::HostHandle,
    listener::DataPlane,
    metrics::{ClassLabels, Metrics, RelayDirection, RelayDirectionLabels, ReservationClass},
    nodes::{self, Fronted, NodeBook},
    registry::AgentRegistry,
    reservations::{Reservations, Reserved},
    stall::StallLedger,
};
use relaygate_common::metrics::ReasonLabels;

/// A peer must send its hop message this soon after opening the stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The reserved peer must accept a STOP this soon.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may reserve without a Limit.
pub struct Members {
    pub registry: Arc<AgentRegistry>,
    /// Its allow-list; follows a configuration reload.
    pub admission: Arc<crate::admission::Admission>,
}

impl Members {
    fn contains(&self, peer: &PeerId) -> bool {
        self.admission.allows(peer) || self.registry.contains(peer)
    }
}

pub struct Hop {
    pub key: Keypair,
    pub cfg: RelayConfig,
    pub books: Arc<Reservations>,
    pub members: Members,
    /// `relay.limited_peers`; a configuration reload replaces it.
    pub limited: arc_swap::ArcSwap<HashSet<PeerId>>,
    pub host: HostHandle,
    /// Addresses put in reservations; the listen addresses when empty.
    pub advertise: Vec<Multiaddr>,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
    /// Cancelled when the gateway drains: no new reservations.
    pub draining: CancellationToken,
    pub guard: Arc<Guard>,
    /// Hop requests being read or answered at once (`relay.max_pending_requests`,
    /// a share per source once half are taken).
    pub requests: crate::shares::Places,
    /// Circuits stalled by a reader that stopped, per peer whose bytes they hold.
    pub stalls: Arc<StallLedger>,
    /// Nodes agents front, and the data plane their circuits take.
    pub nodes: Arc<NodeBook>,
    pub dp: Arc<DataPlane>,
}

impl Hop {
    /// Serves one inbound hop stream.
    pub async fn serve(
        self: Arc<Self>,
        peer: PeerId,
        connection: ConnectionId,
        mut stream: Stream,
    ) {
        let msg =
            match tokio::time::timeout(REQUEST_TIMEOUT, read_message::<HopMessage, _>(&mut stream))
                .await
            {
                Err(_) => {
                    self.metrics.bad_input("relay_request_timeout");
                    return;
                }
                Ok(Err(e)) => {
                    self.metrics.bad_input(e.kind());
                    tracing::debug!(%peer, error = %e, "malformed hop message");
                    self.violation(peer, e.kind()).await;
                    self.deny_circuit(&mut stream, Status::MalformedMessage)
                        .await;
                    return;
                }
                Ok(Ok(m)) => m,
            };
        match msg.kind() {
            Some(HopType::Reserve) => self.reserve(peer, connection, stream).await,
            Some(HopType::Connect) => self.connect(peer, msg, stream).await,
            Some(HopType::Status) | None => {
                self.metrics.bad_input("relay_unexpected_message");
                self.violation(peer, "relay_unexpected_message").await;
                self.deny_circuit(&mut stream, Status::UnexpectedMessage)
                    .await;
            }
        }
    }

    async fn reserve(&self, peer: PeerId, connection: ConnectionId, mut stream: Stream) {
        if self.guard.check_peer(&peer, Action::Reservation).is_err() {
            return self
                .deny_reservation(&mut stream, Status::ResourceLimitExceeded)
                .await;
        }
        let class = if self.members.contains(&peer) {
            ReservationClass::Member
        } else if self.limited.load().contains(&peer) {
            ReservationClass::Limited
        } else {
            tracing::info!(%peer, "relay reservation refused: not a member (admit the agent, or add it to admission.allow or relay.limited_peers)");
            // A refused renewal ends the reservation it would have renewed.
            self.end_reservation(&peer, connection);
            return self
                .deny_reservation(&mut stream, Status::PermissionDenied)
                .await;
        };
        if self.draining.is_cancelled() {
            return self
                .deny_reservation(&mut stream, Status::ReservationRefused)
                .await;
        }
        let addrs = self.relay_addrs();
        if addrs.is_empty() {
            tracing::warn!("relay reservation refused: no address to give out (set advertise)");
            return self
                .deny_reservation(&mut stream, Status::ReservationRefused)
                .await;
        }
        let source = self
            .host
            .state
            .remote_ip(&peer)
            .map(|ip| self.guard.grouping().source(ip));
        let (kind, r) = match self.books.reserve(peer, connection, class, source) {
            Ok(x) => x,
            Err(status) => return self.deny_reservation(&mut stream, status).await,
        };
        // The connection must outlive idle periods while it holds the reservation.
        self.host.control.pin(connection, true);
        let answer = HopMessage {
            r#type: HopType::Status as i32,
            peer: None,
            reservation: Some(circuit::Reservation {
                expire: r.expires_unix,
                addrs: encode_addrs(&addrs),
                voucher: circuit::voucher(&self.key, peer, r.expires_unix),
            }),
            limit: self.limit_for(class),
            status: Some(Status::Ok as i32),
        };
        if let Err(e) = write_message(&mut stream, &answer).await {
            tracing::debug!(%peer, error = %e, "cannot answer reservation");
            return;
        }
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
        let m = &self.metrics.relay;
        match kind {
            Reserved::New => {
                m.reservations_accepted
                    .get_or_create(&ClassLabels { class })
                    .inc();
                tracing::info!(%peer, ?class, "relay reservation accepted");
            }
            Reserved::Renewed => {
                m.reservations_renewed.inc();
            }
        }
        self.sweep();
    }

    async fn violation(&self, peer: PeerId, kind: &str) {
        self.host.violation(&self.guard, peer, kind).await;
    }

    /// Drops expired and orphaned reservations, unpins their connections and
    /// updates `relay_reservations_active`.
    pub fn sweep(&self) {
        let control = &self.host.control;
        let (live, dropped) = self.books.sweep(|c| control.is_open(c));
        for c in dropped {
            control.pin(c, false);
        }
        self.metrics.relay.reservations_active.set(live as i64);
    }

    fn end_reservation(&self, peer: &PeerId, connection: ConnectionId) {
        if self.books.remove(peer, connection) {
            self.host.control.pin(connection, false);
        }
    }

    async fn connect(&self, src: PeerId, msg: HopMessage, mut stream: Stream) {
        if self.draining.is_cancelled() {
            tracing::debug!(%src, "circuit refused: the gateway is draining");
            return self
                .deny_circuit(&mut stream, Status::ConnectionFailed)
                .await;
        }
        let Some(dst) = msg.peer_id() else {
            self.metrics.bad_input("relay_bad_peer_id");
            self.violation(src, "relay_bad_peer_id").await;
            return self
                .deny_circuit(&mut stream, Status::MalformedMessage)
                .await;
        };
        let control = &self.host.control;
        let res = self
            .books
            .lookup(&dst, |c| control.is_open(c))
            // A member that left (its session ended) no longer has a free pass.
            .filter(|r| r.class != ReservationClass::Member || self.members.contains(&dst));
        let Some(res) = res else {
            if let Some(fronted) = self.nodes.get(&dst) {
                return self.to_node(src, dst, fronted, stream).await;
            }
            tracing::debug!(%src, %dst, "circuit refused: no reservation");
            return self.deny_circuit(&mut stream, Status::NoReservation).await;
        };
        let src_ip = self.host.state.remote_ip(&src);
        let allowed = self
            .guard
            .check_peer(&src, Action::Circuit)
            .and_then(|()| match src_ip {
                Some(ip) => self.guard.check_ip(ip, Action::Circuit),
                None => Ok(()),
            });
        if allowed.is_err() {
            return self
                .deny_circuit(&mut stream, Status::ResourceLimitExceeded)
                .await;
        }
        // Per-IP caps count a source: an IPv4 address or an IPv6 prefix.
        let source = src_ip.map(|ip| self.guard.grouping().source(ip));
        let slot = match self
            .books
            .open_circuit(src, dst, source, &self.metrics.relay)
        {
            Ok(s) => s,
            Err(status) => return self.deny_circuit(&mut stream, status).await,
        };
        let limit = self.limit_for(res.class);
        let stop = match self.stop(src, dst, res.connection, limit).await {
            Ok(s) => s,
            Err(why) => {
                tracing::info!(%src, %dst, %why, "circuit failed: destination did not accept");
                self.metrics.dial_failed("relay_stop");
                return self
                    .deny_circuit(&mut stream, Status::ConnectionFailed)
                    .await;
            }
        };
        let ok = HopMessage {
            limit,
            ..HopMessage::answer(Status::Ok)
        };
        if write_message(&mut stream, &ok).await.is_err() {
            return;
        }
        let m = &self.metrics.relay;
        m.circuits_opened
            .get_or_create(&ClassLabels { class: res.class })
            .inc();
        tracing::debug!(%src, %dst, class = ?res.class, "circuit open");
        let bounds = Bounds {
            deadline: limit
                .and_then(|l| l.duration)
                .map(|s| Duration::from_secs(s.into())),
            data: limit.and_then(|l| l.data),
            idle: self.cfg.circuit_idle_timeout,
            rate: self.cfg.circuit_rate,
            stall: self.cfg.circuit_stall_timeout,
        };
        let ends = Ends {
            src,
            dst,
            ledger: self.stalls.clone(),
        };
        let up = m
            .bytes
            .get_or_create(&RelayDirectionLabels {
                direction: RelayDirection::SrcToDst,
            })
            .clone();
        let down = m
            .bytes
            .get_or_create(&RelayDirectionLabels {
                direction: RelayDirection::DstToSrc,
            })
            .clone();
        let closed = m.circuits_closed.clone();
        self.tracker.spawn(async move {
            let end = relay(stream, stop, bounds, up, down, ends).await;
            closed.get_or_create(&ReasonLabels::new(end.as_str())).inc();
            tracing::debug!(%src, %dst, end = end.as_str(), "circuit closed");
            drop(slot);
        });
    }

    /// A circuit to node `dst`, which `fronted`'s agent fronts: answered at
    /// once (the node's own handshake runs end to end through it), then
    /// carried to the agent's tunnel.
    async fn to_node(&self, src: PeerId, dst: PeerId, fronted: Fronted, mut stream: Stream) {
        let owner = self
            .members
            .registry
            .port(fronted.port.get())
            .filter(|o| o.agent == fronted.agent);
        let (Some(owner), Some(addr)) = (owner, self.host.state.remote_addr(&src)) else {
            tracing::debug!(%src, %dst, "circuit to a node refused: its agent's session is gone");
            return self
                .deny_circuit(&mut stream, Status::ConnectionFailed)
                .await;
        };
        let Some(source) = relaygate_common::proxy_transport::socket_addr_of(&addr) else {
            return self
                .deny_circuit(&mut stream, Status::ConnectionFailed)
                .await;
        };
        if self.guard.check_peer(&src, Action::Circuit).is_err()
            || self.guard.check_ip(source.ip(), Action::Circuit).is_err()
        {
            return self
                .deny_circuit(&mut stream, Status::ResourceLimitExceeded)
                .await;
        }
        let group = self.guard.grouping().source(source.ip());
        let slot = match self
            .books
            .open_circuit(src, dst, Some(group), &self.metrics.relay)
        {
            Ok(s) => s,
            Err(status) => return self.deny_circuit(&mut stream, status).await,
        };
        if write_message(&mut stream, &HopMessage::answer(Status::Ok))
            .await
            .is_err()
        {
            return;
        }
        let m = &self.metrics.relay;
        m.circuits_opened
            .get_or_create(&ClassLabels {
                class: ReservationClass::Node,
            })
            .inc();
        tracing::debug!(%src, %dst, agent = %owner.agent, %source, "circuit to a node open");
        let (dp, closed) = (self.dp.clone(), m.circuits_closed.clone());
        self.tracker.spawn(async move {
            let end = match nodes::carry_circuit(&dp, &owner, (src, source), stream.compat()).await
            {
                Ok(()) => "closed",
                Err(_) => "reset",
            };
            closed.get_or_create(&ReasonLabels::new(end)).inc();
            tracing::debug!(%src, %dst, end, "circuit to a node closed");
            drop(slot);
        });
    }

    /// Asks `dst` to accept a circuit from `src` on the connection it reserved over.
    async fn stop(
        &self,
        src: PeerId,
        dst: PeerId,
        connection: ConnectionId,
        limit: Option<Limit>,
    ) -> Result<Stream, String> {
        let open = self
            .host
            .control
            .open_stream_on(dst, connection, STOP_PROTOCOL);
        let mut stop = tokio::time::timeout(STOP_TIMEOUT, open)
            .await
            .map_err(|_| "timed out opening stop stream".to_string())?
            .map_err(|e| e.to_string())?;
        write_message(&mut stop, &StopMessage::connect(src, limit))
            .await
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(STOP_TIMEOUT, read_message::<StopMessage, _>(&mut stop))
            .await
            .map_err(|_| "timed out waiting for stop status".to_string())?
            .map_err(|e| {
                self.metrics.bad_input(e.kind());
                e.to_string()
            })?;
        match answer.status_answer() {
            Some(Status::Ok) => Ok(stop),
            Some(other) => Err(format!("destination answered {}", other.name())),
            None => {
                self.metrics.bad_input("relay_unexpected_message");
                Err("destination sent no status".into())
            }
        }
    }

    fn limit_for(&self, class: ReservationClass) -> Option<Limit> {
        match class {
            ReservationClass::Member | ReservationClass::Node => None,
            // Zero means "no limit" on the wire, so a zero dimension is left out.
            ReservationClass::Limited => Some(Limit {
                duration: Some(
                    u32::try_from(self.cfg.limit.duration.as_secs()).unwrap_or(u32::MAX),
                )
                .filter(|s| *s > 0),
                data: Some(self.cfg.limit.data).filter(|d| *d > 0),
            }),
        }
    }

    /// The relay's own addresses, each ending in `/p2p/<gateway>`.
    fn relay_addrs(&self) -> Vec<Multiaddr> {
        let base = if self.advertise.is_empty() {
            self.host.state.listen_addrs()
        } else {
            self.advertise.clone()
        };
        let me = self.host.peer_id;
        base.into_iter()
            .map(|a| match a.iter().last() {
                Some(Protocol::P2p(_)) => a,
                _ => a.with(Protocol::P2p(me)),
            })
            .collect()
    }

    async fn deny_reservation(&self, stream: &mut Stream, status: Status) {
        self.metrics
            .relay
            .reservations_denied
            .get_or_create(&ReasonLabels::new(status.name()))
            .inc();
        self.metrics
            .refuse(&format!("relay_{}", status.name().to_ascii_lowercase()));
        let _ = write_message(stream, &HopMessage::answer(status)).await;
        let _ = futures::AsyncWriteExt::close(stream).await;
    }

    async fn deny_circuit(&self, stream: &mut Stream, status: Status) {
        self.metrics
            .relay
            .circuits_denied
            .get_or_create(&ReasonLabels::new(status.name()))
            .inc();
        let _ = write_message(stream, &HopMessage::answer(status)).await;
        let _ = futures::AsyncWriteExt::close(stream).await;
    }
}
