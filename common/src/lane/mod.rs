//! The lane: the tunnel data path between an agent and its gateway.
//!
//! A few TCP connections per agent session (see `slot`), dialled by the agent to the gateway's
//! libp2p TCP port (the gateway tells the two apart by the first byte: a TLS
//! record here, multistream-select there). A TLS 1.3 handshake with libp2p-tls
//! certificates authenticates both peer ids, as the session does, and gives
//! the keys of the lane's own AEAD records (see `seal`). Over them a small
//! multiplexer carries one stream per public connection.
//!
//! Why not tunnel streams on the libp2p session: measured on the same machine,
//! this path moves about twice the bytes per CPU second of QUIC or
//! Noise+yamux streams and holds a few KiB per idle connection instead of
//! 15-20 (see docs/performance.md). The libp2p session stays for control,
//! relay and hole punching, and carries tunnel streams whenever no lane is up.

mod flow;
mod frame;
mod gather;
mod mux;
mod reader;
mod rewind;
mod seal;
mod slot;
mod socket;
mod splice;
mod stream;
mod tls;
mod writer;

#[cfg(test)]
mod tests;

pub use flow::{Budget, LaneFlow, ACCEPT_WINDOW, MAX_WINDOW, MIN_WINDOW, OPEN_WINDOW};
pub use frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD};
pub use mux::{Lane, LaneConfig, LaneLink, Role};
pub use rewind::Rewind;
pub use seal::{LaneKeys, MAX_RECORD, PAYLOAD_OFFSET, RECORD_HEADER, TAG_LEN};
pub use slot::{LaneCount, LaneSlot, MAX_LANES};
pub use socket::{prepare as prepare_socket, tcp_rtt_probe, RttProbe, NOTSENT_LOWAT};
pub use splice::splice;
pub use stream::{LaneReader, LaneStream, LaneWriter, Recv};
pub use tls::{Accepted, LaneTls, TLS_HANDSHAKE_RECORD};

#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("lane protocol violation: {0}")]
    Protocol(&'static str),
    #[error("the peer sent nothing for three keep-alive intervals")]
    Silent,
    #[error("the peer closed the lane")]
    Ended,
    #[error("the lane is closed")]
    Closed,
    #[error("lane handshake: {0}")]
    Handshake(String),
    #[error("lane handshake timed out")]
    HandshakeTimeout,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl LaneError {
    /// Label for `bad_input`/refusal counters.
    pub fn kind(&self) -> &'static str {
        match self {
            LaneError::Protocol(_) => "lane_protocol",
            LaneError::Silent => "lane_silent",
            LaneError::Ended => "lane_ended",
            LaneError::Closed => "lane_closed",
            LaneError::Handshake(_) => "lane_handshake",
            LaneError::HandshakeTimeout => "lane_handshake_timeout",
            LaneError::Io(_) => "lane_io",
        }
    }
}
