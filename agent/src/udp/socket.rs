//! A UDP flow's own socket toward the node: from the agent's address
//! (plain), or bound to the remote's address and port with IP_TRANSPARENT
//! and the delivery mark (transparent), so the node's QUIC stack sees the
//! real remote and its replies are routed back to this socket by the same
//! nftables rule and policy route as TCP's.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// A flow's receive buffer for the node's replies (capped by
/// `net.core.rmem_max`): a burst from the node waits here for the channel.
const FLOW_BUFFER: usize = 1 << 20;

/// How the socket was bound, for `deliveries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The agent's own address.
    Plain,
    /// The remote's address and port.
    Transparent,
    /// The remote's address with another port: its port is taken here (a
    /// node listening on 0.0.0.0 at the port the remote sends from).
    PortRemapped,
}

impl Bound {
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::Plain => "connected",
            Bound::Transparent => "connected",
            Bound::PortRemapped => "port_remapped",
        }
    }
}

/// A connected socket from the agent's own address.
pub async fn plain(target: SocketAddr) -> io::Result<(UdpSocket, Bound)> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).await?;
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(FLOW_BUFFER);
    s.connect(target).await?;
    Ok((s, Bound::Plain))
}

/// A connected socket bound to `remote` (a foreign address), marked.
pub fn transparent(
    remote: SocketAddr,
    target: SocketAddr,
    mark: u32,
) -> io::Result<(UdpSocket, Bound)> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if target.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(FLOW_BUFFER);
    // No SO_REUSEADDR: two flows must not share one 4-tuple.
    let bound = match s.bind(&remote.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            s.bind(&SocketAddr::new(remote.ip(), 0).into())?;
            Bound::PortRemapped
        }
        r => {
            r?;
            Bound::Transparent
        }
    };
    s.connect(&target.into())?;
    Ok((UdpSocket::from_std(s.into())?, bound))
}
