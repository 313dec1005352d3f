//! The node's own identity, learnt from the node: connect to the tunnel's
//! target, negotiate a security protocol with multistream-select (Noise, or
//! TLS when the node offers only that), and run its handshake with a
//! throwaway key: the node proves its peer id as it would to any dialer.
//! Nothing else is sent; the connection closes after the handshake.

use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    core::upgrade::{OutboundConnectionUpgrade, Version},
    identity::Keypair,
    noise, tls, PeerId,
};
use multistream_select::dialer_select_proto;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::config::TargetAddr;

const NOISE: &str = "/noise";
const TLS: &str = "/tls/1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to the node at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("the node at {0} speaks neither Noise nor TLS over multistream-select: {1} (is it a libp2p TCP listener?)")]
    Negotiate(String, String),
    #[error("the security handshake with the node at {0} failed: {1}")]
    Handshake(String, String),
    #[error("no answer from the node at {0} within {1:?}")]
    Timeout(String, Duration),
}

/// The peer id of the libp2p node listening at `target`.
pub async fn node_peer_id(target: &TargetAddr, timeout: Duration) -> Result<PeerId, ProbeError> {
    let at = target.to_string();
    tokio::time::timeout(timeout, probe(&at))
        .await
        .map_err(|_| ProbeError::Timeout(at.clone(), timeout))?
}

async fn probe(at: &str) -> Result<PeerId, ProbeError> {
    let tcp = tokio::net::TcpStream::connect(at)
        .await
        .map_err(|e| ProbeError::Connect(at.to_string(), e))?;
    handshake(tcp.compat(), at).await
}

async fn handshake<S>(io: S, at: &str) -> Result<PeerId, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = Keypair::generate_ed25519();
    let (protocol, io) = dialer_select_proto(io, [NOISE, TLS], Version::V1)
        .await
        .map_err(|e| ProbeError::Negotiate(at.to_string(), e.to_string()))?;
    let failed = |e: &dyn std::fmt::Display| ProbeError::Handshake(at.to_string(), e.to_string());
    match protocol {
        NOISE => {
            let cfg = noise::Config::new(&key).map_err(|e| failed(&e))?;
            let (peer, _) = cfg
                .upgrade_outbound(io, NOISE)
                .await
                .map_err(|e| failed(&e))?;
            Ok(peer)
        }
        _ => {
            let cfg = tls::Config::new(&key).map_err(|e| failed(&e))?;
            let (peer, _) = cfg
                .upgrade_outbound(io, TLS)
                .await
                .map_err(|e| failed(&e))?;
            Ok(peer)
        }
    }
}
