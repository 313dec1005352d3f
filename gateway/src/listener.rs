//! Leased public ports: accept TCP connections and hand each one to the
//! agent as a new tunnel stream, headed by the source the gateway saw.
//!
//! Data path: public socket -> stream to agent -> the agent's delivery. The
//! gateway writes the header and starts forwarding at once; the agent's status
//! byte gates the reverse direction, so a refused target resets the public
//! connection without costing a round trip on the happy path.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::{
    lane::{self, LaneStream},
    metrics::Side,
    protocol::{StreamHeader, StreamStatus},
    proxy::{self, Spoof, SpoofCheck},
    transport::DataPath,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

pub use crate::dataplane::{DataPlane, PlaneSettings};

use crate::{guard::Action, metrics::Metrics, registry::TunnelStats, shares::Share};

/// How long the agent may take to connect to its target and answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a trusted balancer may take to send its PROXY header.
const PROXY_TIMEOUT: Duration = Duration::from_secs(5);
/// When the header is optional: how long to wait before treating the peer as direct.
const PROXY_OPTIONAL_WAIT: Duration = Duration::from_millis(500);

/// A bound public port of one tunnel.
pub struct PublicPort {
    pub agent: PeerId,
    /// The session's connection: tunnel streams go there, never to another
    /// connection of the same peer (such as `doctor`'s).
    pub connection: ConnectionId,
    pub stats: Arc<TunnelStats>,
    /// The TCP side, unless the tunnel carries UDP only.
    pub listener: Option<TcpListener>,
    /// The UDP side, when the tunnel carries UDP.
    pub udp: Option<crate::udp::port::UdpPort>,
    /// The port is this session's, not the forwarder's, while this lives.
    pub claim: crate::fleet::ports::LocalClaim,
}

pub async fn bind(ip: std::net::IpAddr, port: u16) -> io::Result<TcpListener> {
    // tokio sets SO_REUSEADDR, so a restarted gateway rebinds despite TIME_WAIT.
    TcpListener::bind((ip, port)).await
}

impl PublicPort {
    /// Accepts until the session ends or the gateway stops accepting.
    pub async fn serve(
        mut self,
        dp: Arc<DataPlane>,
        udp: Arc<crate::udp::UdpPlane>,
        session: CancellationToken,
    ) {
        let port = self.stats.port.get();
        let (udp_port, listener) = (self.udp.take(), self.listener.take());
        let udp_side = async {
            match udp_port {
                Some(u) => u.serve(udp, session.clone()).await,
                None => session.cancelled().await,
            }
        };
        let Some(listener) = listener else {
            udp_side.await;
            tracing::debug!(port, tunnel = %self.stats.name, "public port closed");
            return;
        };
        // The listener lives in this half only: once it stops accepting
        // (shutdown), the port refuses new connections at once, while the
        // UDP half may still run until the session ends.
        let tcp_side = async {
            let listener = listener;
            accept_admitted(
                &listener,
                &dp,
                port,
                &session,
                |tcp, source, share, slot| {
                    let conn = Connection {
                        _slot: slot,
                        share,
                        tcp,
                        source,
                        agent: self.agent,
                        connection: self.connection,
                        stats: self.stats.clone(),
                        dp: dp.clone(),
                    };
                    dp.tracker.spawn(conn.run());
                },
            )
            .await;
        };
        tokio::join!(tcp_side, udp_side);
        tracing::debug!(port, tunnel = %self.stats.name, "public port closed");
    }
}

/// A connection's place under the port's `limits.max_connections_per_tunnel`.
pub(crate) struct Place(Slots);

/// Connections open on one port, against the cap a reload may change.
pub(crate) type Slots = Arc<std::sync::atomic::AtomicUsize>;

impl Place {
    fn take(slots: &Slots, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        if slots.fetch_add(1, Ordering::AcqRel) >= max {
            slots.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(slots.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Accepts on a leased port's `listener` until `stop` or the gateway stops
/// accepting; each connection that passes [`admit`] goes to `serve`.
pub(crate) async fn accept_admitted(
    listener: &TcpListener,
    dp: &DataPlane,
    port: u16,
    stop: &CancellationToken,
    mut serve: impl FnMut(TcpStream, SocketAddr, Option<Share>, Place),
) {
    let slots = Slots::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            _ = dp.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, source) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(port, error = %e, "accept failed");
                dp.metrics.refuse("accept_failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some((share, place)) = admit(dp, &tcp, source, &slots) {
            serve(tcp, source, share, place);
        }
    }
}

/// The checks a just-accepted connection passes before it gets a task: the
/// guard (bans, rates) and its source's share, when its socket's peer is
/// the client (a balancer's client is checked after its PROXY header), and
/// a place under the port's connection limit. `None` resets it.
pub(crate) fn admit(
    dp: &DataPlane,
    tcp: &TcpStream,
    source: SocketAddr,
    slots: &Slots,
) -> Option<(Option<Share>, Place)> {
    let settings = dp.settings.load();
    let direct = !settings.proxy.trusts(source.ip());
    if direct
        && dp
            .guard
            .check_ip(source.ip(), Action::TunnelConnection)
            .is_err()
    {
        let _ = tcp.set_zero_linger();
        return None;
    }
    let share = match direct.then(|| dp.sources.try_take(source.ip())) {
        Some(None) => {
            dp.metrics.refuse("connections_per_source");
            let _ = tcp.set_zero_linger();
            return None;
        }
        Some(share) => share,
        None => None,
    };
    let Some(slot) = Place::take(slots, settings.max_per_tunnel) else {
        dp.metrics.refuse("tunnel_connection_limit");
        let _ = tcp.set_zero_linger();
        return None;
    };
    Some((share, slot))
}

/// Once the PROXY policy named the client: the guard and the client's
/// share, for a client behind a trusted balancer (a direct one passed
/// them at accept).
pub(crate) fn settle(dp: &DataPlane, share: &mut Option<Share>, origin: &Origin) -> io::Result<()> {
    if origin.untrusted {
        return Ok(());
    }
    if dp
        .guard
        .check_ip(origin.source.ip(), Action::TunnelConnection)
        .is_err()
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "source refused by the guard",
        ));
    }
    if share.is_none() {
        match dp.sources.try_take(origin.source.ip()) {
            Some(s) => *share = Some(s),
            None => {
                dp.metrics.refuse("connections_per_source");
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the source holds its share of connections",
                ));
            }
        }
    }
    Ok(())
}

struct Connection {
    /// This connection's place under `max_connections_per_tunnel`.
    _slot: Place,
    /// Its source's place under `max_connections_per_source`.
    share: Option<Share>,
    tcp: TcpStream,
    /// The socket's peer; the PROXY header's source replaces it when trusted.
    source: SocketAddr,
    agent: PeerId,
    connection: ConnectionId,
    stats: Arc<TunnelStats>,
    dp: Arc<DataPlane>,
}

/// Who the connection is from, after the PROXY policy was applied.
pub struct Origin {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Bytes read past a PROXY header; they belong to the connection.
    pub prefix: Vec<u8>,
    /// An untrusted peer: a PROXY header in its first bytes is refused.
    pub untrusted: bool,
    /// The dialer's peer id, on a circuit to a node (the agent may pass it
    /// on in PROXY v2); none on a leased port.
    pub peer: Option<PeerId>,
}

impl Connection {
    async fn run(mut self) {
        let m = &self.dp.metrics;
        let public = Metrics::side(Side::Public);
        m.connections_opened.get_or_create(&public).inc();
        let active = m.connections_active.get_or_create(&public).clone();
        active.inc();
        self.stats.opened.inc();
        self.stats.active.inc();
        let _ = self.tcp.set_nodelay(true);
        let result = match read_origin(&mut self.tcp, self.source, &self.dp).await {
            Ok(origin) => match settle(&self.dp, &mut self.share, &origin) {
                Ok(()) => {
                    self.stats.saw(origin.source);
                    self.forward(origin).await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::debug!(source = %self.source, tunnel = %self.stats.name, error = %e, "public connection reset");
            // RST, so the remote learns at once that the connection is gone.
            let _ = self.tcp.set_zero_linger();
        }
        active.dec();
        self.stats.active.dec();
    }

    /// Sends the stream header and any bytes read past a PROXY header.
    async fn announce(&mut self, stream: &mut LaneStream, origin: Origin) -> io::Result<()> {
        let header = StreamHeader {
            tunnel: self.stats.name.clone(),
            source: origin.source,
            destination: origin.destination,
            peer: None,
        };
        stream.write_all(&header.encode()).await?;
        if !origin.prefix.is_empty() {
            stream.write_all(&origin.prefix).await?;
            self.stats.bytes_in.inc_by(origin.prefix.len() as u64);
        }
        tracing::debug!(
            source = %origin.source, peer = %self.source, tunnel = %self.stats.name, agent = %self.agent,
            "public connection"
        );
        Ok(())
    }

    /// Over one of the agent's lanes when it has one, else as a session stream.
    async fn forward(&mut self, origin: Origin) -> io::Result<()> {
        if let Some(stream) = open_lane(&self.dp, &self.agent).await {
            self.dp.metrics.tunnel_path(DataPath::Lane);
            return self.forward_lane(stream, origin).await;
        }
        if let Some(lanes) = &self.dp.session_lanes {
            if let Some(lane) = lanes.get(self.agent, self.connection).await {
                if let Ok(stream) = lane.open().await {
                    self.dp.metrics.tunnel_path_named("session_lane");
                    return self.forward_lane(stream, origin).await;
                }
            }
        }
        self.dp.metrics.tunnel_path(DataPath::Session);
        // Boxed: the fallback path's state would otherwise size every
        // connection's task, idle ones included.
        Box::pin(self.forward_session(origin)).await
    }

    async fn forward_lane(&mut self, mut stream: LaneStream, origin: Origin) -> io::Result<()> {
        // The header's locals live only in this call, not in the splice's
        // state: an idle connection's task stays small.
        // Whoever the client is (direct, or behind a trusted balancer), its
        // own bytes must not start a PROXY header.
        let mut check = SpoofCheck::default();
        let mut done = check_spoof(&mut check, &origin.prefix, &self.dp.metrics)?;
        let tracked = self.dp.track(self.agent, &self.stats, &origin);
        self.announce(&mut stream, origin).await?;
        let metrics = &self.dp.metrics;
        let first = move |bytes: &[u8]| {
            if !done {
                done = check_spoof(&mut check, bytes, metrics)?;
            }
            Ok(done)
        };
        lane::splice(
            stream,
            &mut self.tcp,
            tracked.outbound(&self.stats.bytes_out),
            tracked.inbound(&self.stats.bytes_in),
            self.dp.idle_timeout(),
            first,
            // The client's first bytes go out with the open; the agent holds
            // them (within the stream's credit) until the target is connected.
            async |lane| agent_status(lane, metrics).await,
        )
        .await
        .map(|_| ())
    }

    async fn forward_session(&mut self, origin: Origin) -> io::Result<()> {
        let (tr, tw) = self.tcp.split();
        let to = crate::session_stream::Agent {
            peer: self.agent,
            connection: self.connection,
            stats: &self.stats,
        };
        crate::session_stream::carry(&self.dp, to, origin, tr, tw).await
    }
}

/// A new stream on one of `agent`'s lanes, if it has one that is open.
pub(crate) async fn open_lane(dp: &DataPlane, agent: &PeerId) -> Option<LaneStream> {
    // A lane that closed as the stream opened is skipped by the next pick.
    for _ in 0..lane::MAX_LANES {
        let lane = dp.lanes.get(agent)?;
        match lane.open().await {
            Ok(stream) => return Some(stream),
            Err(e) => tracing::debug!(%agent, error = %e, "lane closed; trying the next"),
        }
    }
    None
}

/// A new stream on one of `agent`'s lanes, else on the lane over its
/// session (`session_lane.rs`), when lanes are on.
pub(crate) async fn open_any_lane(
    dp: &DataPlane,
    agent: &PeerId,
    connection: ConnectionId,
) -> Option<LaneStream> {
    if let Some(s) = open_lane(dp, agent).await {
        return Some(s);
    }
    let lane = dp.session_lanes.as_ref()?.get(*agent, connection).await?;
    lane.open().await.ok()
}

/// Who a connection is from: its socket's peer, or the client a trusted
/// balancer's PROXY header names (policy `proxy_protocol`).
pub(crate) async fn read_origin(
    tcp: &mut TcpStream,
    source: SocketAddr,
    dp: &DataPlane,
) -> io::Result<Origin> {
    let destination = proxy::canonical(tcp.local_addr()?);
    let source = proxy::canonical(source);
    let settings = dp.settings.load();
    let policy = &settings.proxy;
    if !policy.trusts(source.ip()) {
        // Always checked: a spoofed header must never reach a target that reads PROXY.
        return Ok(Origin {
            source,
            destination,
            prefix: Vec::new(),
            untrusted: true,
            peer: None,
        });
    }
    let wait = if policy.required {
        PROXY_TIMEOUT
    } else {
        PROXY_OPTIONAL_WAIT
    };
    let metrics = &dp.metrics;
    // The buffer outlives a timeout: what a client sent before it gave
    // up waiting for a header is the start of its stream, not lost.
    let mut buf = Vec::new();
    let mut read =
        tokio::time::timeout(wait, Box::pin(proxy::read_header_into(&mut *tcp, &mut buf))).await;
    if read.is_err() && !policy.required && !buf.is_empty() && proxy::looks_like_proxy(&buf) {
        // A header under way: give it the whole header time.
        read = tokio::time::timeout(
            PROXY_TIMEOUT.saturating_sub(wait),
            Box::pin(proxy::read_header_into(&mut *tcp, &mut buf)),
        )
        .await;
    }
    match read {
        Ok(Ok(Some(h))) => Ok(Origin {
            source: h.source.map(proxy::canonical).unwrap_or(source),
            destination: h.destination.map(proxy::canonical).unwrap_or(destination),
            prefix: buf,
            untrusted: false,
            peer: None,
        }),
        Ok(Ok(None)) if !policy.required => Ok(Origin {
            source,
            destination,
            prefix: buf,
            untrusted: false,
            peer: None,
        }),
        Err(_) if !policy.required && !proxy::looks_like_proxy(&buf) => Ok(Origin {
            source,
            destination,
            prefix: buf,
            untrusted: false,
            peer: None,
        }),
        Ok(Ok(None)) | Err(_) => {
            metrics.refuse("proxy_missing");
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "PROXY header required from this peer",
            ))
        }
        Ok(Err(e)) => {
            metrics.refuse("proxy_malformed");
            metrics.bad_input("proxy_header");
            Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
    }
}

/// Refuses a client's own PROXY header (counted as `proxy_untrusted`);
/// `Ok(true)` once its bytes can no longer start one.
pub(crate) fn check_spoof(
    check: &mut SpoofCheck,
    bytes: &[u8],
    metrics: &Metrics,
) -> io::Result<bool> {
    match check.feed(bytes) {
        Spoof::Header => {
            metrics.refuse("proxy_untrusted");
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a PROXY header from the client itself",
            ))
        }
        Spoof::Clean => Ok(true),
        Spoof::Undecided => Ok(false),
    }
}

/// Reads the agent's status byte: `Ok` once it connected the target; any
/// other answer is counted and becomes the error that resets the connection.
pub(crate) async fn agent_status<R: AsyncRead + Unpin>(
    r: &mut R,
    metrics: &Metrics,
) -> io::Result<()> {
    let status = tokio::time::timeout(STATUS_TIMEOUT, r.read_u8())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "agent did not answer"))??;
    match StreamStatus::from_byte(status) {
        Some(StreamStatus::Connected) => Ok(()),
        Some(s) => {
            metrics.refuse(s.as_str());
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, s.as_str()))
        }
        None => {
            metrics.bad_input("stream_status");
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown stream status",
            ))
        }
    }
}
