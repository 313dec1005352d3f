//! The datagram channel: UDP tunnels' datagrams between gateway and agent,
//! each in a QUIC datagram (RFC 9221) on a connection of its own, beside the
//! session, authenticated with the libp2p identities. Datagrams are never
//! retransmitted or ordered here: a lost one is the inner protocol's to
//! recover, so one flow never waits behind another (no head-of-line
//! blocking, which a TCP lane would add).

pub mod endpoint;
pub mod frame;
pub mod quic_ids;

pub use frame::{CloseReason, Frame, FrameError, DATA_OVERHEAD};

/// The channel's ALPN; it versions the frame format.
pub const ALPN: &[u8] = b"relaygate-udp/1";

/// The gateway's default channel port (`udp.listen`), beside libp2p's 4001.
pub const DEFAULT_PORT: u16 = 4002;

#[derive(Debug, thiserror::Error)]
pub enum DgramError {
    #[error("datagram channel TLS: {0}")]
    Tls(String),
}
