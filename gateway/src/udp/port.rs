//! One leased UDP port: its socket, its flows, and the checks a new remote
//! passes before it gets a flow. One task per port owns all of it, so the
//! data path takes no lock; frames from the agent arrive on a queue.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use relaygate_common::{
    dgram::{CloseReason, Frame},
    names::TunnelName,
    protocol::StreamStatus,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{flows::Flows, AgentUdp, FromAgent, UdpPlane};
use crate::{guard::Action, metrics::Direction, registry::TunnelStats, shares::Share};

/// Largest datagram read from a remote (a UDP payload can be up to 64 KiB;
/// larger than the channel carries is dropped as `too_large`).
const RECV_BUF: usize = 65_536;

/// Binds a leased UDP port.
pub fn bind(ip: IpAddr, port: u16) -> std::io::Result<UdpSocket> {
    let addr = SocketAddr::new(ip, port);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    // Generous buffers: a burst of flows must not be lost to the kernel.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// A bound UDP port, before it serves.
pub struct UdpPort {
    pub socket: UdpSocket,
    pub agent: Arc<AgentUdp>,
    pub stats: Arc<TunnelStats>,
}

/// What a flow holds of shared bounds, released when it ends.
pub struct Places {
    _share: Share,
    _total: Total,
}

struct Total(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for Total {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Port {
    plane: Arc<UdpPlane>,
    agent: Arc<AgentUdp>,
    socket: UdpSocket,
    tunnel: TunnelName,
    stats: Arc<TunnelStats>,
    flows: Flows<Places>,
    sources: crate::shares::Shares,
    new_flows: DefaultDirectRateLimiter,
    /// Bandwidth caps, policed per datagram.
    pace: crate::caps::ConnPacers,
}

impl UdpPort {
    /// Serves until `stop` (the session's end or the lease's): then every
    /// flow ends and the socket closes.
    pub async fn serve(self, plane: Arc<UdpPlane>, stop: CancellationToken) {
        let Some((slot, mut rx)) = self.agent.add_port() else {
            tracing::error!(peer = %self.agent.peer, "more than 256 UDP ports in one session; this one is not served");
            return;
        };
        let cfg = &plane.cfg;
        let quota = Quota::per_second(
            std::num::NonZeroU32::new(cfg.new_flows_per_second)
                .unwrap_or(std::num::NonZeroU32::MIN),
        )
        .allow_burst(
            std::num::NonZeroU32::new(cfg.new_flows_burst).unwrap_or(std::num::NonZeroU32::MIN),
        );
        let mut p = Port {
            sources: crate::shares::Shares::new(cfg.max_flows_per_source, plane.guard.grouping()),
            new_flows: RateLimiter::direct(quota),
            pace: plane
                .caps
                .pacers(Arc::new((self.agent.peer, self.stats.name.clone()))),
            plane: plane.clone(),
            agent: self.agent.clone(),
            socket: self.socket,
            tunnel: self.stats.name.clone(),
            stats: self.stats,
            flows: Flows::new(slot),
        };
        let mut buf = vec![0u8; RECV_BUF];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = p.socket.recv_from(&mut buf) => match r {
                    Ok((n, src)) => p.on_remote(src, &buf[..n]),
                    // ICMP errors of earlier sends surface here; not fatal.
                    Err(e) => tracing::trace!(error = %e, "udp recv"),
                },
                Some(msg) = rx.recv() => p.on_agent(msg),
                _ = tick.tick() => p.expire(),
            }
        }
        for id in p.flows.ids() {
            p.end(id, CloseReason::Ended, "ended");
        }
        self.agent.remove_port(slot);
        tracing::debug!(tunnel = %p.tunnel, "UDP port closed");
    }
}

impl Port {
    /// `src` as the socket reported it (v4-mapped on a `::` bind): flows are
    /// keyed and answered by it; checks and the agent see its canonical form.
    fn on_remote(&mut self, src: SocketAddr, pkt: &[u8]) {
        let plane = self.plane.clone();
        let m = &plane.metrics.udp;
        let id = match self.flows.id_of(&src) {
            Some(id) => id,
            None => match self.admit(src) {
                Ok(id) => id,
                Err(reason) => return m.drop(reason),
            },
        };
        if !self.pace.inbound.police(pkt.len()) {
            return m.drop("bandwidth");
        }
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let was_validated = flow.validated;
        let now_validated = flow.note_remote_packet(pkt);
        m.carried(Direction::inbound, pkt.len(), was_validated);
        self.stats.bytes_in.inc_by(pkt.len() as u64);
        let frame = if flow.opened {
            Frame::Data {
                flow: id,
                payload: pkt,
            }
            .encode()
        } else {
            Frame::Open {
                flow: id,
                tunnel: self.tunnel.as_str(),
                remote: relaygate_common::proxy::canonical(src),
                payload: pkt,
            }
            .encode()
        };
        // Held node datagrams this remote's bytes now cover.
        let released = flow.release();
        if now_validated {
            self.flows.validated();
            m.flows_unvalidated.dec();
            m.flows_validated.inc();
        }
        // Strangers get only part of the channel's send buffer: a flood of
        // new flows must not crowd out flows that proved their address.
        let validated = was_validated || now_validated;
        if let Err(e) = self.agent.send_as(frame, validated) {
            m.drop(e.as_str());
        }
        for d in released {
            self.plane.unhold(d.len());
            self.send_remote(id, &d, true);
        }
    }

    /// The checks a new remote passes, in order of cost; each refusal is
    /// counted by its reason.
    fn admit(&mut self, reported: SocketAddr) -> Result<u32, &'static str> {
        let src = relaygate_common::proxy::canonical(reported);
        let cfg = &self.plane.cfg;
        if self.plane.stop_accepting.is_cancelled() {
            return Err("stopping");
        }
        if !self.agent.has_channel() {
            return Err("no_channel");
        }
        if self.plane.guard.is_banned_ip(src.ip()) {
            return Err("banned");
        }
        // Unkeyed before the guard's per-source rate: spoofed sources
        // cannot grow its keyed state faster than this.
        if self.new_flows.check().is_err() {
            return Err("new_flow_rate");
        }
        if self
            .plane
            .guard
            .check_ip(src.ip(), Action::TunnelConnection)
            .is_err()
        {
            return Err("refused");
        }
        if self.flows.len() >= cfg.max_flows_per_tunnel {
            return Err("flows_per_tunnel");
        }
        if self.flows.unvalidated() >= cfg.max_unvalidated_per_tunnel {
            // Room for the newcomer at the cost of the oldest stranger;
            // flows that proved their address are never evicted.
            if let Some(old) = self.flows.evict_oldest_unvalidated() {
                self.ended(old, CloseReason::Evicted, "evicted", true);
            }
        }
        let share = self.sources.try_take(src.ip()).ok_or("flows_per_source")?;
        let total = &self.plane.flows;
        if total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cfg.max_flows).then_some(n + 1)
            })
            .is_err()
        {
            return Err("flows_total");
        }
        let places = Places {
            _share: share,
            _total: Total(total.clone()),
        };
        let id = self.flows.insert(reported, places);
        let m = &self.plane.metrics.udp;
        m.flows_opened.inc();
        m.flows_unvalidated.inc();
        if self.flows.len().is_multiple_of(1024) {
            self.flows.compact();
        }
        Ok(id)
    }

    fn on_agent(&mut self, msg: FromAgent) {
        let plane = self.plane.clone();
        let m = &plane.metrics.udp;
        match msg {
            FromAgent::Data { flow, payload } => {
                let Some(f) = self.flows.get_mut(flow) else {
                    // Ended here; tell the agent so it lets go too.
                    let _ = self.agent.send(
                        Frame::Close {
                            flow,
                            reason: CloseReason::UnknownFlow,
                        }
                        .encode(),
                    );
                    return m.drop("unknown_flow");
                };
                f.note_node_packet(&payload);
                if !self.pace.outbound.police(payload.len()) {
                    return m.drop("bandwidth");
                }
                if f.may_send(payload.len()) {
                    self.send_remote(flow, &payload, false);
                } else if self.plane.try_hold(payload.len()) {
                    let n = payload.len();
                    if !f.hold(payload) {
                        self.plane.unhold(n);
                        m.drop("amplification");
                    }
                } else {
                    m.drop("amplification");
                }
            }
            FromAgent::Opened { flow, status } => {
                if status == StreamStatus::Connected {
                    if let Some(f) = self.flows.get_mut(flow) {
                        f.opened = true;
                    }
                } else {
                    tracing::debug!(tunnel = %self.tunnel, ?status, "the agent could not open a UDP flow");
                    if let Some(f) = self.flows.remove(flow) {
                        self.ended(f, CloseReason::TargetRefused, "target_refused", false);
                    }
                }
            }
            FromAgent::Close { flow, reason } => {
                if reason == CloseReason::UnknownFlow {
                    // The agent lost it (restarted): the next datagram opens it again.
                    if let Some(f) = self.flows.get_mut(flow) {
                        f.opened = false;
                    }
                } else if let Some(f) = self.flows.remove(flow) {
                    // Already closed at the agent: nothing to tell it.
                    self.ended(f, reason, reason.as_str(), false);
                }
            }
        }
    }

    /// Sends a node datagram to its flow's remote. `released` ones were
    /// counted against the budget when released.
    fn send_remote(&mut self, id: u32, d: &[u8], released: bool) {
        let Some(f) = self.flows.get_mut(id) else {
            return;
        };
        let validated = f.validated;
        if released {
            f.last = Instant::now();
            f.bytes_out += d.len() as u64;
        } else {
            f.sent(d.len());
        }
        let remote = f.remote;
        match self.socket.try_send_to(d, remote) {
            Ok(_) => {
                self.plane
                    .metrics
                    .udp
                    .carried(Direction::outbound, d.len(), validated);
                self.stats.bytes_out.inc_by(d.len() as u64);
            }
            Err(_) => self.plane.metrics.udp.drop("socket_full"),
        }
    }

    fn expire(&mut self) {
        let cfg = &self.plane.cfg;
        let gone = self
            .flows
            .expired(Instant::now(), cfg.idle_timeout, cfg.handshake_timeout);
        for id in gone {
            self.end(id, CloseReason::Idle, "idle");
        }
        // A ban added since: its flows end within a tick.
        let guard = &self.plane.guard;
        let banned: Vec<u32> = self
            .flows
            .iter()
            .filter(|f| guard.is_banned_ip(relaygate_common::proxy::canonical(f.remote).ip()))
            .map(|f| f.id)
            .collect();
        for id in banned {
            self.end(id, CloseReason::Ended, "banned");
        }
    }

    /// Ends a flow and tells the agent.
    fn end(&mut self, id: u32, reason: CloseReason, label: &str) {
        if let Some(f) = self.flows.remove(id) {
            self.ended(f, reason, label, true);
        }
    }

    fn ended(&self, f: super::flows::Flow<Places>, reason: CloseReason, label: &str, tell: bool) {
        let m = &self.plane.metrics.udp;
        m.closed(label);
        if f.validated {
            m.flows_validated.dec();
        } else {
            m.flows_unvalidated.dec();
        }
        self.plane.unhold(f.held_bytes());
        if tell {
            let _ = self
                .agent
                .send(Frame::Close { flow: f.id, reason }.encode());
        }
    }
}
