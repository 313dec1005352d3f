//! The gateway's libp2p TCP transport with PROXY protocol: behind a load
//! balancer, a connection from a trusted address starts with a PROXY v1/v2
//! header naming the real peer; it is read before the Noise handshake and
//! becomes the connection's remote address (what identify reports as observed,
//! what DCUtR and logs use). A header from anyone else is refused and counted.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    future::{ready, BoxFuture, Ready},
    stream::FuturesUnordered,
    AsyncRead, AsyncWrite, FutureExt, StreamExt,
};
use libp2p::{
    core::{
        transport::{DialOpts, ListenerId, TransportError, TransportEvent},
        Transport,
    },
    multiaddr::Protocol,
    tcp, Multiaddr,
};

use crate::proxy;

/// How long a trusted peer may take to send its header, and an untrusted one its first bytes.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Gives a new connection a place while it is looked at (any value it
/// drops when done), or a refusal reason.
pub type Admit = dyn Fn(IpAddr) -> Result<Box<dyn Send>, &'static str> + Send + Sync;

/// Who may send PROXY headers, and where refusals are counted.
#[derive(Clone)]
pub struct ProxyAcceptor {
    pub trusted: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    /// Trusted peers must send a header.
    pub required: bool,
    /// Called with a reason (`proxy_untrusted`, `proxy_missing`, `proxy_malformed`) for each refusal.
    pub refused: Arc<dyn Fn(&'static str) + Send + Sync>,
    /// Asked for every new connection, by its socket's address, before
    /// anything is read: a place it holds until the transport is done with
    /// its first bytes, or the refusal reason (counted through `refused`).
    pub admit: Arc<Admit>,
    /// Where connections that start with a TLS record go (agents' lanes);
    /// without it they are handed to libp2p like any other.
    pub lanes: Option<tokio::sync::mpsc::Sender<Diverted>>,
}

/// A connection taken from the libp2p listener for the lane acceptor.
pub struct Diverted {
    pub tcp: tokio::net::TcpStream,
    /// Bytes read past a PROXY header; they belong to the connection.
    pub prefix: Vec<u8>,
    /// The real source (a trusted balancer's PROXY header's, else the socket's).
    pub remote: SocketAddr,
}

type Upgrade = Ready<Result<Prefixed, io::Error>>;
type Pending = BoxFuture<'static, Option<TransportEvent<Upgrade, io::Error>>>;

pub struct ProxyTcp {
    inner: tcp::tokio::Transport,
    acceptor: ProxyAcceptor,
    pending: FuturesUnordered<Pending>,
}

impl ProxyTcp {
    pub fn new(config: tcp::Config, acceptor: ProxyAcceptor) -> Self {
        Self {
            inner: tcp::tokio::Transport::new(config),
            acceptor,
            pending: FuturesUnordered::new(),
        }
    }
}

impl Transport for ProxyTcp {
    type Output = Prefixed;
    type Error = io::Error;
    type ListenerUpgrade = Upgrade;
    type Dial = BoxFuture<'static, Result<Prefixed, io::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<io::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<io::Error>> {
        let dial = self.inner.dial(addr, opts)?;
        Ok(dial.map(|r| r.map(Prefixed::plain)).boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Upgrade, io::Error>> {
        loop {
            if let Poll::Ready(Some(done)) = self.pending.poll_next_unpin(cx) {
                match done {
                    Some(ev) => return Poll::Ready(ev),
                    None => continue, // refused: already counted and closed
                }
            }
            match Pin::new(&mut self.inner).poll(cx) {
                Poll::Ready(TransportEvent::Incoming {
                    listener_id,
                    upgrade,
                    local_addr,
                    send_back_addr,
                }) => {
                    let Some(ip) = ip_of(&send_back_addr) else {
                        continue;
                    };
                    let place = match (self.acceptor.admit)(ip.to_canonical()) {
                        Ok(place) => place,
                        Err(reason) => {
                            (self.acceptor.refused)(reason);
                            continue; // dropping the upgrade closes the socket
                        }
                    };
                    let acceptor = self.acceptor.clone();
                    self.pending.push(
                        async move {
                            let _place = place;
                            let stream = upgrade.into_inner().ok()?;
                            let (stream, addr) = admit(stream, &send_back_addr, &acceptor).await?;
                            Some(TransportEvent::Incoming {
                                listener_id,
                                upgrade: ready(Ok(stream)),
                                local_addr,
                                send_back_addr: addr,
                            })
                        }
                        .boxed(),
                    );
                }
                Poll::Ready(other) => {
                    return Poll::Ready(
                        other.map_upgrade(|u| ready(u.into_inner().map(Prefixed::plain))),
                    )
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Applies the PROXY policy to a new connection: returns the stream (with any
/// bytes read past a header) and the remote address to report, or None to drop it.
async fn admit(
    stream: tcp::tokio::TcpStream,
    send_back: &Multiaddr,
    acceptor: &ProxyAcceptor,
) -> Option<(Prefixed, Multiaddr)> {
    let ip = ip_of(send_back)?;
    let mut tcp = stream.0;
    if !(acceptor.trusted)(ip.to_canonical()) {
        // Peek, do not read: the bytes stay for the Noise handshake.
        let mut first = [0u8; 16];
        if let Ok(Ok(n)) = tokio::time::timeout(HEADER_TIMEOUT, tcp.peek(&mut first)).await {
            if proxy::has_signature(&first[..n]) {
                (acceptor.refused)("proxy_untrusted");
                return None;
            }
            if acceptor.lanes.is_some() && n > 0 && first[0] == crate::lane::TLS_HANDSHAKE_RECORD {
                let remote = tcp.peer_addr().ok()?;
                divert(acceptor, tcp, Vec::new(), remote).await;
                return None;
            }
        }
        return Some((
            Prefixed::plain(tcp::tokio::TcpStream(tcp)),
            send_back.clone(),
        ));
    }
    let read = tokio::time::timeout(HEADER_TIMEOUT, proxy::read_header(&mut tcp)).await;
    let (source, prefix) = match read {
        Ok(Ok((Some(h), rest))) => (h.source, rest),
        Ok(Ok((None, rest))) if !acceptor.required => (None, rest),
        Ok(Err(_)) => {
            (acceptor.refused)("proxy_malformed");
            return None;
        }
        _ => {
            (acceptor.refused)("proxy_missing");
            return None;
        }
    };
    if acceptor.lanes.is_some() {
        let mut first = [0u8; 1];
        let starts_tls = match prefix.first() {
            Some(b) => *b == crate::lane::TLS_HANDSHAKE_RECORD,
            None => matches!(
                tokio::time::timeout(HEADER_TIMEOUT, tcp.peek(&mut first)).await,
                Ok(Ok(1)) if first[0] == crate::lane::TLS_HANDSHAKE_RECORD
            ),
        };
        if starts_tls {
            let remote = match source {
                Some(s) => proxy::canonical(s),
                None => tcp.peer_addr().ok()?,
            };
            divert(acceptor, tcp, prefix, remote).await;
            return None;
        }
    }
    let addr = match source.map(proxy::canonical) {
        Some(SocketAddr::V4(a)) => Multiaddr::empty()
            .with(Protocol::Ip4(*a.ip()))
            .with(Protocol::Tcp(a.port())),
        Some(SocketAddr::V6(a)) => Multiaddr::empty()
            .with(Protocol::Ip6(*a.ip()))
            .with(Protocol::Tcp(a.port())),
        None => send_back.clone(),
    };
    Some((
        Prefixed {
            prefix,
            pos: 0,
            inner: tcp::tokio::TcpStream(tcp),
        },
        addr,
    ))
}

/// The IP a multiaddr starts from (`/ip4/...`, `/ip6/...`), if any.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

/// `/ip4/a.b.c.d/tcp/p` or `/ip4/.../udp/p/quic-v1` -> `a.b.c.d:p`.
pub fn socket_addr_of(addr: &Multiaddr) -> Option<std::net::SocketAddr> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::from(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::from(a)),
            Protocol::Tcp(port) | Protocol::Udp(port) => {
                return ip.map(|i| std::net::SocketAddr::new(i, port))
            }
            _ => {}
        }
    }
    None
}

/// Hands a lane's connection over; a full queue drops it (the agent retries).
async fn divert(
    acceptor: &ProxyAcceptor,
    tcp: tokio::net::TcpStream,
    prefix: Vec<u8>,
    remote: SocketAddr,
) {
    if let Some(lanes) = &acceptor.lanes {
        if lanes
            .try_send(Diverted {
                tcp,
                prefix,
                remote,
            })
            .is_err()
        {
            (acceptor.refused)("lane_queue_full");
        }
    }
}

/// A TCP stream that first yields bytes already read past a PROXY header.
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: tcp::tokio::TcpStream,
}

impl Prefixed {
    fn plain(inner: tcp::tokio::TcpStream) -> Self {
        Self {
            prefix: Vec::new(),
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
