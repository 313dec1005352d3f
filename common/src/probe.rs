//! A libp2p node's identity, proven by the node: negotiate a security
//! protocol with multistream-select (Noise, or TLS when the node offers only
//! that) on a connection to it, and run its handshake with a throwaway key,
//! as any dialer would. The agent probes its node directly; the gateway
//! probes it through the agent's tunnel to check what the agent claims.

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    core::upgrade::{OutboundConnectionUpgrade, Version},
    identity::Keypair,
    noise, tls, PeerId,
};
use multistream_select::dialer_select_proto;

const NOISE: &str = "/noise";
const TLS: &str = "/tls/1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "speaks neither Noise nor TLS over multistream-select: {0} (is it a libp2p TCP listener?)"
    )]
    Negotiate(String),
    #[error("the security handshake failed: {0}")]
    Handshake(String),
}

/// The peer id the node at the other end of `io` proves. Nothing else is
/// sent; the caller closes `io` after.
pub async fn peer_id_over<S>(io: S) -> Result<PeerId, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = Keypair::generate_ed25519();
    let (protocol, io) = dialer_select_proto(io, [NOISE, TLS], Version::V1)
        .await
        .map_err(|e| ProbeError::Negotiate(e.to_string()))?;
    let failed = |e: &dyn std::fmt::Display| ProbeError::Handshake(e.to_string());
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
