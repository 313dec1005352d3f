//! The node's own identity, learnt from the node: connect to the tunnel's
//! target, negotiate a security protocol with multistream-select (Noise, or
//! TLS when the node offers only that), and run its handshake with a
//! throwaway key: the node proves its peer id as it would to any dialer.
//! Nothing else is sent; the connection closes after the handshake.

use std::time::Duration;

use libp2p::PeerId;
use relaygate_common::probe::peer_id_over;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::config::TargetAddr;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to the node at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("the node at {0}: {1}")]
    Node(String, relaygate_common::probe::ProbeError),
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
    peer_id_over(tcp.compat())
        .await
        .map_err(|e| ProbeError::Node(at.to_string(), e))
}
