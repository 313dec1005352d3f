//! Wire formats between agent and gateway.
//!
//! Two libp2p stream protocols run over the authenticated session:
//!
//! * [`CONTROL_PROTOCOL`]: opened once by the agent. Frames are a 4-byte big-endian
//!   length followed by a JSON [`ControlMessage`] of at most [`MAX_CONTROL_FRAME`]
//!   bytes. The agent sends `Hello`, the gateway answers `Welcome` or `Refused`.
//!   The stream stays open for the session's lifetime; its end ends the session.
//! * [`TUNNEL_PROTOCOL`]: opened by the gateway, one per public connection. It
//!   starts with a binary [`StreamHeader`]; the agent answers one [`StreamStatus`]
//!   byte, and from then on the stream carries the connection's bytes untouched.
//! * [`LANE_PROTOCOL`]: opened by the gateway when an agent has no lane of its
//!   own up: 32 random bytes (the secret its keys derive from; the stream is
//!   already confidential and authenticated), then the lane's records, so those
//!   tunnelled connections get the lane's multiplexer and flow control too.
//! * [`SERVICE_PROTOCOL`]: opened by a visitor agent toward a peer offering a
//!   named service (over the relay or a hole-punched connection). It starts with a
//!   [`ServiceRequest`]; the offering agent answers one [`StreamStatus`] byte, and
//!   then the stream carries framed bytes like a tunnel stream.
//! * [`FORWARD_PROTOCOL`]: between two gateways of a fleet, for a public
//!   connection that landed on one without a session to its agent: a
//!   `Forward` control frame (port, source, destination), then raw bytes.

use std::io;

use libp2p::StreamProtocol;

use crate::names::NameError;

mod control; // the control stream's JSON messages and their framing
mod stream; // binary headers of tunnel and service streams, and the status byte

pub use control::*;
pub use stream::*;

pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/control/1");
pub const TUNNEL_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/tunnel/1");
/// `relaygate-agent doctor` asks the gateway to connect to one of the agent's
/// leased ports from the gateway's side and report whether the target answered.
pub const DIALBACK_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/dialback/1");

/// A lane on one stream of the session (see `lane`), opened by the gateway.
pub const LANE_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/lane/1");
/// Bytes of the secret that start a [`LANE_PROTOCOL`] stream.
pub const LANE_SECRET_LEN: usize = 32;

/// A visitor's stream to a service offered by another agent.
pub const SERVICE_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/service/1");

/// Opened by a gateway of the fleet toward another that holds a session
/// with the agent a public connection is for: a `Forward` frame, then the
/// connection's bytes. Accepted only from the fleet's members.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/relaygate/forward/1");

/// Version carried in `Hello`/`Welcome` and in every stream header.
pub const WIRE_VERSION: u16 = 1;
/// Largest control frame either side accepts.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Most tunnels one agent may ask for in one session.
pub const MAX_TUNNELS_PER_HELLO: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("stream ended before a complete frame")]
    Truncated,
    #[error("frame of {0} bytes exceeds the limit of {MAX_CONTROL_FRAME}")]
    Oversized(usize),
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u16),
    #[error("malformed stream header: {0}")]
    Header(&'static str),
    #[error("invalid name in stream header: {0}")]
    Name(#[from] NameError),
}

impl WireError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Io(_) => "io",
            WireError::Truncated => "truncated",
            WireError::Oversized(_) => "oversized",
            WireError::Malformed(_) => "malformed",
            WireError::Version(_) => "version",
            WireError::Header(_) | WireError::Name(_) => "bad_header",
        }
    }
}

fn map_eof(e: io::Error) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        WireError::Truncated
    } else {
        WireError::Io(e)
    }
}

#[cfg(test)]
mod tests;
