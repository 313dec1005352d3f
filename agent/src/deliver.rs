//! Delivery: how a tunnelled connection reaches the local target.
//!
//! * `plain`: an ordinary connection; the target sees the agent's address.
//! * `transparent`: the connection leaves from the remote's real address
//!   (IP_TRANSPARENT + SO_MARK; see `transparent`), so `getpeername()` on the
//!   target returns the remote, as behind an L4 balancer with
//!   `externalTrafficPolicy: Local`.
//! * `proxy-v1` / `proxy-v2`: a plain connection that starts with a PROXY
//!   protocol header naming the remote.

use std::{io, net::SocketAddr, time::Duration};

use relaygate_common::{
    protocol::{StreamHeader, StreamStatus},
    proxy::{self, ProxyVersion},
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpSocket, TcpStream},
};

use crate::config::TargetAddr;

// The mode is a config type, at the ground floor; re-exported for callers.
pub use crate::config::DeliveryMode;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("target {target} refused: {source}")]
    Refused { target: String, source: io::Error },
    #[error("target {target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("cannot resolve target {target}: {reason}")]
    Resolve { target: String, reason: String },
    #[error("cannot open a transparent socket from {source_addr}: {error}")]
    Transparent {
        source_addr: SocketAddr,
        error: io::Error,
    },
}

impl DeliverError {
    /// What the gateway is told.
    pub fn status(&self) -> StreamStatus {
        match self {
            DeliverError::Refused { .. } => StreamStatus::TargetRefused,
            DeliverError::Timeout { .. }
            | DeliverError::Resolve { .. }
            | DeliverError::Transparent { .. } => StreamStatus::TargetUnreachable,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            DeliverError::Resolve { .. } => "target_resolve",
            DeliverError::Transparent { .. } => "transparent_socket",
            _ => self.status().as_str(),
        }
    }
}

/// An ordinary connection to `target` within `timeout` (services use this).
pub async fn connect_plain(
    target: &TargetAddr,
    timeout: Duration,
) -> Result<TcpStream, DeliverError> {
    let t = target.to_string();
    let fut = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| DeliverError::Resolve {
                target: t.clone(),
                reason: e.to_string(),
            })?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(DeliverError::Refused {
            target: t.clone(),
            source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
        })
    };
    let stream =
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| DeliverError::Timeout {
                target: t.clone(),
                timeout,
            })??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A delivery: where to connect, on whose behalf, and how.
pub struct Delivery<'a> {
    pub mode: DeliveryMode,
    pub target: &'a TargetAddr,
    pub header: &'a StreamHeader,
    pub timeout: Duration,
    pub mark: u32,
}

impl Delivery<'_> {
    pub async fn connect(&self) -> Result<TcpStream, DeliverError> {
        let t = self.target.to_string();
        let source = proxy::canonical(self.header.source);
        let fut = async {
            let addr = self.resolve(source).await?;
            let mut stream = match self.mode {
                // An unspecified source (the gateway checking the node's
                // identity) has no one to stand for: a plain connection.
                DeliveryMode::Transparent if !source.ip().is_unspecified() => {
                    let sock = transparent_socket(source, addr, self.mark).map_err(|error| {
                        DeliverError::Transparent {
                            source_addr: source,
                            error,
                        }
                    })?;
                    sock.connect(addr).await
                }
                _ => TcpStream::connect(addr).await,
            }
            .map_err(|source| DeliverError::Refused {
                target: t.clone(),
                source,
            })?;
            let version = match self.mode {
                DeliveryMode::ProxyV1 => Some(ProxyVersion::V1),
                DeliveryMode::ProxyV2 => Some(ProxyVersion::V2),
                _ => None,
            };
            if let Some(v) = version {
                let h = proxy::encode(
                    v,
                    source,
                    self.header.destination,
                    self.header.peer.as_ref(),
                );
                stream
                    .write_all(&h)
                    .await
                    .map_err(|source| DeliverError::Refused {
                        target: t.clone(),
                        source,
                    })?;
            }
            Ok(stream)
        };
        let stream = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(DeliverError::Timeout {
                    target: t,
                    timeout: self.timeout,
                })
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The target's address; for transparent delivery, one of the source's family.
    async fn resolve(&self, source: SocketAddr) -> Result<SocketAddr, DeliverError> {
        let t = self.target.to_string();
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.target.host.as_str(), self.target.port))
                .await
                .map_err(|e| DeliverError::Resolve {
                    target: t.clone(),
                    reason: e.to_string(),
                })?
                .collect();
        let pick = if self.mode == DeliveryMode::Transparent {
            addrs.iter().find(|a| a.is_ipv4() == source.is_ipv4())
        } else {
            addrs.first()
        };
        pick.copied().ok_or_else(|| DeliverError::Resolve {
            target: t,
            reason: format!(
                "no {} address for a connection from {source}",
                if source.is_ipv4() { "IPv4" } else { "IPv6" }
            ),
        })
    }
}

/// A socket bound to the remote's own address, marked so its replies are routed back here.
fn transparent_socket(source: SocketAddr, target: SocketAddr, mark: u32) -> io::Result<TcpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if target.is_ipv4() {
        sock.set_ip_transparent_v4(true)?;
    } else {
        sock.set_ip_transparent_v6(true)?;
    }
    sock.set_mark(mark)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    match sock.bind(&source.into()) {
        // The remote's port is taken here: a node listening on 0.0.0.0 at
        // the port the remote dials from (libp2p peers dial from their
        // listen port), or a second connection from the same address and
        // port. The node still sees the remote's address, with another port.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            tracing::debug!(%source, "the remote's port is in use here; delivering from its address with another port");
            sock.bind(&SocketAddr::new(source.ip(), 0).into())?;
        }
        r => r?,
    }
    Ok(TcpSocket::from_std_stream(sock.into()))
}
