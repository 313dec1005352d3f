//! Raw libp2p streams for our own protocols: open one toward a connected
//! peer, and receive inbound ones from a queue.
//!
//! Written for relaygate rather than using `libp2p-stream` because a tunnel
//! opens one stream per public connection, in bursts: `libp2p-stream` holds a
//! single inbound slot (a burst silently drops streams) and opens outbound
//! streams one at a time per connection. Here inbound streams go to a deep
//! queue (a full queue drops and counts), and outbound opens run concurrently.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    future::{ready, Ready},
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use libp2p::{
    core::{
        transport::PortUse,
        upgrade::{InboundUpgrade, ReadyUpgrade, UpgradeInfo},
        Endpoint,
    },
    swarm::{
        handler::{
            ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
        },
        ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent,
        ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, StreamUpgradeError,
        SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId, Stream, StreamProtocol,
};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not connected to {0}")]
    NotConnected(PeerId),
    #[error("remote does not support {0}")]
    Unsupported(StreamProtocol),
    #[error("stream negotiation timed out")]
    Timeout,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed while opening the stream")]
    Closed,
}

/// An inbound stream for one of the accepted protocols.
pub struct Incoming {
    pub peer: PeerId,
    /// The connection it arrived on (answer on the same one with [`Control::open_stream_on`]).
    pub connection: ConnectionId,
    pub protocol: StreamProtocol,
    pub stream: Stream,
}

/// An outbound stream and the connection it runs on.
#[derive(Debug)]
pub struct Opened {
    pub stream: Stream,
    pub connection: ConnectionId,
    /// Whether that connection goes through a relay.
    pub relayed: bool,
}

/// A request to open a stream, routed to one connection's handler.
#[derive(Debug)]
pub struct OpenRequest {
    peer: PeerId,
    connection: Option<ConnectionId>,
    protocol: StreamProtocol,
    /// Set by the behaviour once it chose the connection.
    relayed: bool,
    reply: oneshot::Sender<Result<Opened, OpenError>>,
}

struct Inbound {
    protocols: Vec<StreamProtocol>,
    queue: mpsc::Sender<Incoming>,
    dropped: AtomicU64,
    /// Connections open now: recorded before any stream can arrive on them,
    /// so a stream's receiver can always ask about its own connection.
    open: std::sync::Mutex<std::collections::HashSet<ConnectionId>>,
    /// Connections kept open while idle (e.g. those holding a relay reservation).
    pinned: std::sync::Mutex<std::collections::HashSet<ConnectionId>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens streams; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Control {
    requests: mpsc::UnboundedSender<OpenRequest>,
    inbound: Arc<Inbound>,
}

impl Control {
    /// Opens a stream to `peer` over its newest direct connection, else its
    /// newest relayed one. Does not dial.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenError> {
        self.request(peer, None, protocol).await.map(|o| o.stream)
    }

    /// As [`Self::open_stream`], also saying which connection was used.
    pub async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Opened, OpenError> {
        self.request(peer, None, protocol).await
    }

    /// Opens a stream on one particular connection to `peer` (fails if it is gone).
    pub async fn open_stream_on(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenError> {
        self.request(peer, Some(connection), protocol)
            .await
            .map(|o| o.stream)
    }

    async fn request(
        &self,
        peer: PeerId,
        connection: Option<ConnectionId>,
        protocol: StreamProtocol,
    ) -> Result<Opened, OpenError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(OpenRequest {
                peer,
                connection,
                protocol,
                relayed: false,
                reply,
            })
            .map_err(|_| OpenError::Closed)?;
        rx.await.map_err(|_| OpenError::Closed)?
    }

    /// Whether `connection` is open.
    pub fn is_open(&self, connection: ConnectionId) -> bool {
        lock(&self.inbound.open).contains(&connection)
    }

    /// Keeps `connection` open while idle (`true`), or lets the idle timeout
    /// close it again (`false`).
    pub fn pin(&self, connection: ConnectionId, keep: bool) {
        let mut p = lock(&self.inbound.pinned);
        if keep {
            p.insert(connection);
        } else {
            p.remove(&connection);
        }
    }

    /// Inbound streams dropped because the queue was full.
    pub fn inbound_dropped(&self) -> u64 {
        self.inbound.dropped.load(Ordering::Relaxed)
    }
}

pub struct Behaviour {
    requests: mpsc::UnboundedReceiver<OpenRequest>,
    inbound: Arc<Inbound>,
    /// Open connections per peer, oldest first, with whether each is relayed.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
}

/// Builds the behaviour, its control, and the queue of inbound streams for
/// `accept` (at most `queue` waiting before new ones are dropped).
pub fn new(
    accept: Vec<StreamProtocol>,
    queue: usize,
) -> (Behaviour, Control, mpsc::Receiver<Incoming>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let inbound = Arc::new(Inbound {
        protocols: accept,
        queue: tx,
        dropped: AtomicU64::new(0),
        open: Default::default(),
        pinned: Default::default(),
    });
    let control = Control {
        requests: req_tx,
        inbound: inbound.clone(),
    };
    (
        Behaviour {
            requests: req_rx,
            inbound,
            connections: HashMap::new(),
        },
        control,
        rx,
    )
}

impl Behaviour {
    fn handler(&self, peer: PeerId, connection: ConnectionId) -> Handler {
        Handler {
            peer,
            connection,
            inbound: self.inbound.clone(),
            pending: VecDeque::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        lock(&self.inbound.open).insert(connection);
        Ok(self.handler(peer, connection))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        lock(&self.inbound.open).insert(connection);
        Ok(self.handler(peer, connection))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connections
                    .entry(e.peer_id)
                    .or_default()
                    .push((e.connection_id, e.endpoint.is_relayed()));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                lock(&self.inbound.open).remove(&connection_id);
                lock(&self.inbound.pinned).remove(&connection_id);
                if let Some(v) = self.connections.get_mut(&peer_id) {
                    v.retain(|(c, _)| *c != connection_id);
                    if v.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
            }
            _ => {}
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

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(req)) = self.requests.poll_recv(cx) {
            // The asked-for connection, else the newest direct one (the one most
            // likely alive after a reconnect, and a hole-punched path beats the
            // relay), else the newest relayed one.
            let conns = self.connections.get(&req.peer);
            let chosen = match req.connection {
                Some(c) => conns.and_then(|v| v.iter().find(|(x, _)| *x == c)),
                None => conns.and_then(|v| {
                    v.iter()
                        .rev()
                        .find(|(_, relayed)| !relayed)
                        .or_else(|| v.last())
                }),
            }
            .copied();
            match chosen {
                Some((conn, relayed)) => {
                    let mut req = req;
                    req.relayed = relayed;
                    return Poll::Ready(ToSwarm::NotifyHandler {
                        peer_id: req.peer,
                        handler: NotifyHandler::One(conn),
                        event: req,
                    });
                }
                None => {
                    let _ = req.reply.send(Err(OpenError::NotConnected(req.peer)));
                }
            }
        }
        Poll::Pending
    }
}

pub struct Handler {
    peer: PeerId,
    connection: ConnectionId,
    inbound: Arc<Inbound>,
    pending: VecDeque<OpenRequest>,
}

type Reply = (
    StreamProtocol,
    bool,
    oneshot::Sender<Result<Opened, OpenError>>,
);

impl ConnectionHandler for Handler {
    type FromBehaviour = OpenRequest;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Protocols(self.inbound.protocols.clone()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        lock(&self.inbound.pinned).contains(&self.connection)
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        match self.pending.pop_front() {
            Some(req) => Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    ReadyUpgrade::new(req.protocol.clone()),
                    (req.protocol, req.relayed, req.reply),
                ),
            }),
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, req: OpenRequest) {
        self.pending.push_back(req);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Reply>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                let incoming = Incoming {
                    peer: self.peer,
                    connection: self.connection,
                    protocol,
                    stream,
                };
                if self.inbound.queue.try_send(incoming).is_err() {
                    self.inbound.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.peer, "inbound stream queue full; stream dropped");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: (_, relayed, reply),
            }) => {
                let _ = reply.send(Ok(Opened {
                    stream,
                    connection: self.connection,
                    relayed,
                }));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, _, reply),
                error,
            }) => {
                let e = match error {
                    StreamUpgradeError::Timeout => OpenError::Timeout,
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported(protocol),
                    StreamUpgradeError::Io(e) => OpenError::Io(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(e));
            }
            _ => {}
        }
    }
}

/// Inbound upgrade accepting any of several protocols, keeping which one was chosen.
#[derive(Clone)]
pub struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;
    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;
    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}
