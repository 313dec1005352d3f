//! Any gateway answers: a public connection that lands on a gateway without
//! a session to its agent is carried to a gateway of the fleet that has one.
//!
//! Outbound: the forwarder listens on every leased port another gateway
//! serves (their etcd records say which) and this one does not, admits each
//! connection as a leased port does (guard, shares, PROXY policy), and
//! carries it on a `/relaygate/forward/1` stream to a gateway serving the
//! port, headed by the client's real address: on a stream of this gateway's
//! lane to it (`links.rs`), else of a libp2p connection. Inbound: a forward
//! stream is taken only from a member of the fleet, and goes to the agent
//! like any public connection of that port (on its lane when it has one).

use std::{collections::BTreeSet, io, net::IpAddr, sync::Arc, time::Duration};

use libp2p::{Multiaddr, PeerId, Stream};
use prometheus_client::metrics::counter::Counter;
use relaygate_common::{
    lane::{self, LaneStream},
    meter::Tally,
    metrics::ReasonLabels,
    protocol::{read_control, write_control, ControlMessage, FORWARD_PROTOCOL},
    proxy,
    streams::OpenError,
    transport::DataPath,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::{
    circuit::{self, Bounds, End, Ends},
    fleet::{
        links::Links,
        members::Fleet,
        ports::{ForwardSlot, PortTable},
    },
    host::{Command, HostHandle},
    lanes::FleetLane,
    listener::{self, DataPlane, Origin},
    registry::AgentRegistry,
    session_stream,
};

/// How a forwarded connection reaches the other gateway.
enum Carrier {
    Lane(LaneStream),
    Stream(Compat<Stream>),
}

/// The `Forward` frame, then what was read past a PROXY header.
async fn head<S: AsyncWrite + Unpin>(
    s: &mut S,
    frame: &ControlMessage,
    prefix: &[u8],
) -> io::Result<()> {
    write_control(s, frame)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    if !prefix.is_empty() {
        s.write_all(prefix).await?;
    }
    Ok(())
}

/// How long reaching the other gateway may take, dial included.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a forwarding gateway may take to send the `Forward` frame.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Ports are checked again this often, beside every change.
const RECONCILE: Duration = Duration::from_secs(1);

pub struct Forwarder {
    pub fleet: Arc<Fleet>,
    pub registry: Arc<AgentRegistry>,
    pub ports: Arc<PortTable>,
    pub dp: Arc<DataPlane>,
    pub host: HostHandle,
    /// Where leased ports are bound (`leases.bind`).
    pub bind: IpAddr,
    /// Lanes to the other gateways.
    pub links: Links,
}

impl Forwarder {
    /// Follows the fleet's ports until the gateway stops accepting.
    pub async fn run(self: Arc<Self>) {
        let mut fleet = self.fleet.port_changes();
        let mut local = self.ports.changes();
        let mut sessions = self.registry.changes();
        let mut tick = tokio::time::interval(RECONCILE);
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = fleet.changed() => {}
                _ = local.changed() => {}
                _ = sessions.changed() => {}
                _ = tick.tick() => {}
                _ = self.dp.stop_accepting.cancelled() => break,
            }
        }
        for port in self.ports.forwarding() {
            self.ports.stop_forwarding(port);
        }
    }

    /// Listens on the ports served elsewhere and not here; lets go of the rest.
    async fn reconcile(self: &Arc<Self>) {
        let mine: BTreeSet<u16> = self.registry.ports().into_iter().collect();
        let wanted: BTreeSet<u16> = self
            .fleet
            .served_elsewhere()
            .difference(&mine)
            .copied()
            .collect();
        for port in self.ports.forwarding() {
            if !wanted.contains(&port) {
                tracing::debug!(port, "no other gateway serves this port; not forwarding it");
                self.ports.stop_forwarding(port);
            }
        }
        for port in wanted {
            let Some(slot) = self.ports.start_forwarding(port) else {
                continue;
            };
            match listener::bind(self.bind, port).await {
                Ok(l) => {
                    tracing::debug!(port, "forwarding this port to the gateways that serve it");
                    tokio::spawn(self.clone().accept(l, slot));
                }
                Err(e) => {
                    // Tried again at the next change or tick.
                    tracing::debug!(port, error = %e, "cannot bind a port to forward");
                    self.ports.forwarding_ended(&slot);
                }
            }
        }
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, slot: ForwardSlot) {
        let port = slot.port;
        listener::accept_admitted(
            &listener,
            &self.dp,
            port,
            &slot.cancel,
            |tcp, source, share, place| {
                let me = self.clone();
                self.dp.tracker.spawn(async move {
                    let (mut tcp, mut share) = (tcp, share);
                    if let Err(e) = me.outbound(&mut tcp, source, &mut share, port).await {
                        tracing::debug!(%source, port, error = %e, "forwarded connection reset");
                        let _ = tcp.set_zero_linger();
                    }
                    drop(place);
                });
            },
        )
        .await;
        // The socket closes before the slot tells a waiting session so.
        drop(listener);
        drop(slot);
    }

    /// Carries one connection to a gateway serving `port`.
    async fn outbound(
        &self,
        tcp: &mut TcpStream,
        source: std::net::SocketAddr,
        share: &mut Option<crate::shares::Share>,
        port: u16,
    ) -> io::Result<()> {
        let dp = &self.dp;
        let origin = listener::read_origin(tcp, source, dp).await?;
        listener::settle(dp, share, &origin)?;
        let _ = tcp.set_nodelay(true);
        let (peer, carrier) = self.open(port).await?;
        let Some(lease) = relaygate_common::names::LeasePort::new(port) else {
            return Err(io::Error::other("port 0 is not a lease"));
        };
        let frame = ControlMessage::Forward {
            port: lease,
            source: origin.source,
            destination: origin.destination,
        };
        dp.metrics
            .forwarded
            .get_or_create(&ReasonLabels::new("out"))
            .inc();
        let (up, down) = (Counter::default(), Counter::default());
        match carrier {
            Carrier::Lane(mut stream) => {
                head(&mut stream, &frame, &origin.prefix).await?;
                dp.metrics.tunnel_path_named("fleet_lane");
                tracing::debug!(source = %origin.source, port, gateway = %peer, path = "lane", "public connection forwarded");
                // The stream's own window bounds a client that stops reading:
                // its unread bytes hold that window, not the lane.
                lane::splice(
                    stream,
                    tcp,
                    Tally::new(&down),
                    Tally::new(&up),
                    dp.idle_timeout(),
                    |_| Ok(true),
                    async |_| Ok(()),
                )
                .await
                .map(|_| ())
            }
            Carrier::Stream(mut stream) => {
                head(&mut stream, &frame, &origin.prefix).await?;
                dp.metrics.tunnel_path_named("fleet_stream");
                tracing::debug!(source = %origin.source, port, gateway = %peer, path = "stream", "public connection forwarded");
                // Bounded here as on the far gateway: a client that stops
                // reading holds this connection's window to it, so it takes a
                // share of that gateway's stalls (the ledger ends the oldest
                // past it), and a quiet connection ends after `limits.idle_timeout`.
                let bounds = Bounds {
                    deadline: None,
                    data: None,
                    idle: dp.idle_timeout(),
                    rate: 0,
                    stall: Duration::ZERO,
                };
                let ends = Ends {
                    src: peer,
                    dst: peer,
                    ledger: dp.stalls.clone(),
                };
                match circuit::relay(tcp.compat(), stream.into_inner(), bounds, up, down, ends)
                    .await
                {
                    End::Closed => Ok(()),
                    End::Stalled => {
                        dp.stalled_readers.inc();
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client stopped reading",
                        ))
                    }
                    other => Err(io::Error::other(other.as_str())),
                }
            }
        }
    }

    /// A way to one of the gateways serving `port`, trying each: its lane,
    /// else a forward stream of a libp2p connection to it.
    async fn open(&self, port: u16) -> io::Result<(PeerId, Carrier)> {
        let mut holders = self.fleet.holders(port);
        // A gateway already reached first: a dead one (its record lives
        // until its TTL ends) costs a dial timeout only when no other is up.
        let connected = self.host.state.peers();
        holders.sort_by_key(|h| {
            !(self.links.is_up(&h.peer) || connected.iter().any(|(c, _)| *c == h.peer))
        });
        if holders.is_empty() {
            self.dp.metrics.refuse("forward_no_gateway");
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no gateway of the fleet serves this port",
            ));
        }
        let mut last = String::new();
        for h in holders {
            if let Some(at) = &h.lane {
                match tokio::time::timeout(OPEN_TIMEOUT, self.links.open(h.peer, at)).await {
                    Ok(Ok(s)) => return Ok((h.peer, Carrier::Lane(s))),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "lane: timed out".into(),
                }
                tracing::debug!(gateway = %h.peer, error = %last, "no lane to the gateway; trying a libp2p stream");
            }
            match tokio::time::timeout(OPEN_TIMEOUT, self.open_to(h.peer, h.addrs)).await {
                Ok(Ok(s)) => return Ok((h.peer, Carrier::Stream(s.compat()))),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            self.dp.metrics.dial_failed("forward");
        }
        Err(io::Error::other(format!(
            "no gateway serving port {port} answered: {last}"
        )))
    }

    async fn open_to(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<Stream, OpenError> {
        let control = &self.dp.control;
        match control.open_stream(peer, FORWARD_PROTOCOL).await {
            Err(OpenError::NotConnected(_)) => {}
            other => return other,
        }
        self.host.send(Command::Dial { peer, addrs }).await;
        let mut wait = Duration::from_millis(5);
        loop {
            tokio::time::sleep(wait).await;
            match control.open_stream(peer, FORWARD_PROTOCOL).await {
                Err(OpenError::NotConnected(_)) => {
                    wait = (wait * 2).min(Duration::from_millis(100))
                }
                other => return other,
            }
        }
    }

    /// Serves the lanes other gateways dial here: each stream they open is
    /// a forwarded connection.
    pub async fn serve_links(self: Arc<Self>, mut lanes: mpsc::Receiver<FleetLane>) {
        while let Some((peer, lane)) = lanes.recv().await {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(stream) = lane.accept().await {
                    me.dp.tracker.spawn(me.clone().inbound(peer, stream));
                }
                tracing::debug!(gateway = %peer, "lane from a gateway of the fleet closed");
            });
        }
    }

    /// A forward stream from `peer`: refused unless `peer` is a gateway of
    /// the fleet; otherwise carried to the session serving its port.
    pub async fn inbound<S>(self: Arc<Self>, peer: PeerId, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let dp = &self.dp;
        if dp.stop_accepting.is_cancelled() {
            dp.metrics.refuse("shutting_down");
            return;
        }
        if !self.fleet.is_member(&peer) {
            dp.metrics.refuse("forward_not_member");
            tracing::warn!(%peer, "forward stream from a peer that is not a gateway of the fleet; reset");
            return;
        }
        let frame = tokio::time::timeout(HEADER_TIMEOUT, read_control(&mut stream)).await;
        let (port, source, destination) = match frame {
            Ok(Ok(ControlMessage::Forward {
                port,
                source,
                destination,
            })) => (port, source, destination),
            Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
                dp.metrics.bad_input("forward_header");
                return;
            }
        };
        let Some(owner) = self.registry.port(port.get()) else {
            // The agent's session here just ended: the other gateway's
            // client is reset, and its next connection finds another.
            dp.metrics.refuse("forward_no_session");
            return;
        };
        let source = proxy::canonical(source);
        // The forwarding gateway spent the source's rate; a ban made since
        // (they are shared) still holds here.
        if dp.guard.is_banned_ip(source.ip()) {
            dp.metrics.refuse("banned");
            return;
        }
        dp.metrics
            .forwarded
            .get_or_create(&ReasonLabels::new("in"))
            .inc();
        owner.stats.opened.inc();
        owner.stats.active.inc();
        owner.stats.saw(source);
        let origin = Origin {
            source,
            destination: proxy::canonical(destination),
            prefix: Vec::new(),
            untrusted: false,
            peer: None,
        };
        let to = session_stream::Agent {
            peer: owner.agent,
            connection: owner.connection,
            stats: &owner.stats,
        };
        let (r, w) = tokio::io::split(stream);
        // The agent's lanes when it has them, as for a connection landing here.
        let carried = match listener::open_lane(dp, &owner.agent).await {
            Some(lane) => {
                dp.metrics.tunnel_path(DataPath::Lane);
                session_stream::carry_on_lane(dp, to, origin, lane, r, w).await
            }
            None => {
                dp.metrics.tunnel_path(DataPath::Session);
                session_stream::carry(dp, to, origin, r, w).await
            }
        };
        if let Err(e) = carried {
            tracing::debug!(%source, port = %port, error = %e, "forwarded connection reset");
        }
        owner.stats.active.dec();
    }
}
