//! The [`Guard`] applied to libp2p connections: a pending inbound connection
//! is refused by IP (ban, rate, per-IP cap) before any handshake work; an
//! established one by peer id (ban). Counts and caps open connections per IP,
//! giving the count back however a counted connection ends.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    swarm::{
        dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure,
        NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

use crate::guard::{Action, Guard};

#[derive(Debug, thiserror::Error)]
#[error("refused by the gateway's guard: {0}")]
pub struct Refusal(&'static str);

pub struct Gate {
    guard: Arc<Guard>,
    /// Peers whose PROXY headers are believed (load balancers): their socket
    /// address is not the client's, so per-IP checks skip them.
    trusted: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    max_per_ip: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Each counted connection's peer and source (an IPv4 address or IPv6 prefix).
    by_connection: HashMap<ConnectionId, (PeerId, IpAddr)>,
    /// Connections still in their handshake, per source: each source may
    /// hold only its share of the gateway's pending places.
    max_pending_per_source: usize,
    max_pending: usize,
    pending: HashMap<IpAddr, usize>,
    pending_by_connection: HashMap<ConnectionId, IpAddr>,
}

impl Gate {
    pub fn new(
        guard: Arc<Guard>,
        trusted: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
        max_per_ip: usize,
        (max_pending, max_pending_per_source): (usize, usize),
    ) -> Self {
        Self {
            guard,
            trusted,
            max_per_ip,
            per_ip: HashMap::new(),
            by_connection: HashMap::new(),
            max_pending_per_source: max_pending_per_source.max(1),
            max_pending,
            pending: HashMap::new(),
            pending_by_connection: HashMap::new(),
        }
    }

    fn end_pending(&mut self, connection: ConnectionId) {
        if let Some(source) = self.pending_by_connection.remove(&connection) {
            decrement(&mut self.pending, source);
        }
    }

    fn client_ip(&self, addr: &Multiaddr) -> Option<IpAddr> {
        let ip = ip_of(addr)?;
        (!(self.trusted)(ip)).then_some(ip)
    }
}

fn decrement(counts: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

pub use relaygate_common::proxy_transport::ip_of;

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = self.client_ip(remote) else {
            return Ok(());
        };
        if let Err(why) = self.guard.check_ip(ip, Action::Connection) {
            return Err(ConnectionDenied::new(Refusal(why.as_str())));
        }
        let source = self.guard.grouping().source(ip);
        if self.per_ip.get(&source).copied().unwrap_or(0) >= self.max_per_ip {
            self.guard.count_refusal("connections_per_ip");
            return Err(ConnectionDenied::new(Refusal("connections_per_ip")));
        }
        // The share applies once half the places are taken: a quiet gateway
        // lets many agents behind one address start at once.
        let busy = self.pending_by_connection.len() * 2 >= self.max_pending;
        let pending = self.pending.entry(source).or_default();
        if busy && *pending >= self.max_pending_per_source {
            self.guard.count_refusal("pending_per_source");
            return Err(ConnectionDenied::new(Refusal("pending_per_source")));
        }
        *pending += 1;
        self.pending_by_connection.insert(connection, source);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.end_pending(connection);
        if self.guard.is_banned_peer(&peer) {
            self.guard.count_refusal("banned");
            return Err(ConnectionDenied::new(Refusal("banned")));
        }
        if let Some(ip) = self.client_ip(remote) {
            let source = self.guard.grouping().source(ip);
            *self.per_ip.entry(source).or_default() += 1;
            self.by_connection.insert(connection, (peer, source));
            self.guard.connected(peer, source);
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // A connection counted here ends either closed, or refused after us
        // by a behaviour listed later (`connection_limits`: per-peer caps),
        // which the swarm reports as a failed inbound connection. Both give
        // the count back; before, the second kept it until a restart, so a
        // twin agent retrying against the per-peer cap locked its address out.
        let connection_id = match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => connection_id,
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => connection_id,
            _ => return,
        };
        // A handshake that failed, or a connection refused while pending.
        self.end_pending(connection_id);
        if let Some((peer, source)) = self.by_connection.remove(&connection_id) {
            self.guard.disconnected(peer, source);
            decrement(&mut self.per_ip, source);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
