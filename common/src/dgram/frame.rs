//! The datagram channel's frames: one per QUIC datagram, each naming the
//! flow it belongs to. The ALPN (`relaygate-udp/1`) versions the format, so
//! no frame carries a version byte. Fields are big-endian; addresses use the
//! stream header's codec (`u8 family 4|6 | ip | u16 port`).
//!
//! ```text
//! DATA    both      u8 0x00 | u32 flow | payload
//! OPEN    gw→agent  u8 0x01 | u32 flow | u8 name_len | tunnel | addr remote | payload
//! OPENED  agent→gw  u8 0x02 | u32 flow | u8 status (StreamStatus)
//! CLOSE   both      u8 0x03 | u32 flow | u8 reason (CloseReason)
//! ```
//!
//! OPEN carries the flow's first datagram, so a flow costs no round trip;
//! the gateway sends OPEN instead of DATA until OPENED arrives, so a lost
//! OPEN heals with the next datagram.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::protocol::{put_addr, StreamStatus};

const DATA: u8 = 0x00;
const OPEN: u8 = 0x01;
const OPENED: u8 = 0x02;
const CLOSE: u8 = 0x03;

/// Bytes a DATA frame adds to its payload.
pub const DATA_OVERHEAD: usize = 5;

/// Why a flow ended, as one side tells the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing moved for the idle timeout.
    Idle = 0,
    /// The node's socket answered with an ICMP error.
    TargetRefused = 1,
    /// Evicted to make room (an unvalidated flow under a flood).
    Evicted = 2,
    /// The agent holds as many flows as it may.
    Busy = 3,
    /// The receiver has no flow of that id.
    UnknownFlow = 4,
    /// The session or the lease ended.
    Ended = 5,
}

impl CloseReason {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Idle,
            1 => Self::TargetRefused,
            2 => Self::Evicted,
            3 => Self::Busy,
            4 => Self::UnknownFlow,
            5 => Self::Ended,
            _ => return None,
        })
    }

    /// The `udp_flows_closed_total` reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::TargetRefused => "target_refused",
            Self::Evicted => "evicted",
            Self::Busy => "busy",
            Self::UnknownFlow => "unknown_flow",
            Self::Ended => "ended",
        }
    }
}

/// One decoded frame, borrowing the datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        flow: u32,
        payload: &'a [u8],
    },
    Open {
        flow: u32,
        tunnel: &'a str,
        remote: SocketAddr,
        payload: &'a [u8],
    },
    Opened {
        flow: u32,
        status: StreamStatus,
    },
    Close {
        flow: u32,
        reason: CloseReason,
    },
}

/// Why a frame could not be decoded; counted as `bad_input{dgram_frame}`,
/// never an end to the (authenticated) channel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("datagram frame too short")]
    Short,
    #[error("unknown datagram frame kind {0:#04x}")]
    Kind(u8),
    #[error("bad field in a datagram frame: {0}")]
    Field(&'static str),
}

impl<'a> Frame<'a> {
    pub fn flow(&self) -> u32 {
        match self {
            Frame::Data { flow, .. }
            | Frame::Open { flow, .. }
            | Frame::Opened { flow, .. }
            | Frame::Close { flow, .. } => *flow,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Frame::Data { flow, payload } => {
                out.reserve(payload.len());
                out.push(DATA);
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Frame::Open {
                flow,
                tunnel,
                remote,
                payload,
            } => {
                out.reserve(payload.len());
                out.push(OPEN);
                out.extend_from_slice(&flow.to_be_bytes());
                // Tunnel names are at most 64 bytes (`TunnelName`).
                out.push(tunnel.len().min(255) as u8);
                out.extend_from_slice(&tunnel.as_bytes()[..tunnel.len().min(255)]);
                put_addr(&mut out, *remote);
                out.extend_from_slice(payload);
            }
            Frame::Opened { flow, status } => {
                out.push(OPENED);
                out.extend_from_slice(&flow.to_be_bytes());
                out.push(*status as u8);
            }
            Frame::Close { flow, reason } => {
                out.push(CLOSE);
                out.extend_from_slice(&flow.to_be_bytes());
                out.push(*reason as u8);
            }
        }
        out
    }

    pub fn decode(buf: &'a [u8]) -> Result<Self, FrameError> {
        let (&kind, rest) = buf.split_first().ok_or(FrameError::Short)?;
        let flow = rest.get(..4).ok_or(FrameError::Short)?;
        let flow = u32::from_be_bytes([flow[0], flow[1], flow[2], flow[3]]);
        let rest = &rest[4..];
        match kind {
            DATA => Ok(Frame::Data {
                flow,
                payload: rest,
            }),
            OPEN => {
                let (&len, rest) = rest.split_first().ok_or(FrameError::Short)?;
                let name = rest.get(..len as usize).ok_or(FrameError::Short)?;
                let tunnel =
                    std::str::from_utf8(name).map_err(|_| FrameError::Field("tunnel name"))?;
                let (remote, used) = addr(&rest[len as usize..])?;
                Ok(Frame::Open {
                    flow,
                    tunnel,
                    remote,
                    payload: &rest[len as usize + used..],
                })
            }
            OPENED => {
                let b = *rest.first().ok_or(FrameError::Short)?;
                let status = StreamStatus::from_byte(b).ok_or(FrameError::Field("status"))?;
                Ok(Frame::Opened { flow, status })
            }
            CLOSE => {
                let b = *rest.first().ok_or(FrameError::Short)?;
                let reason = CloseReason::from_byte(b).ok_or(FrameError::Field("reason"))?;
                Ok(Frame::Close { flow, reason })
            }
            k => Err(FrameError::Kind(k)),
        }
    }
}

/// `u8 family | ip | u16 port`, and how many bytes it took.
fn addr(b: &[u8]) -> Result<(SocketAddr, usize), FrameError> {
    let (&family, rest) = b.split_first().ok_or(FrameError::Short)?;
    let (ip, n): (IpAddr, usize) = match family {
        4 => {
            let o = rest.get(..4).ok_or(FrameError::Short)?;
            (Ipv4Addr::new(o[0], o[1], o[2], o[3]).into(), 4)
        }
        6 => {
            let o = rest.get(..16).ok_or(FrameError::Short)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(o);
            (Ipv6Addr::from(a).into(), 16)
        }
        _ => return Err(FrameError::Field("address family")),
    };
    let p = rest.get(n..n + 2).ok_or(FrameError::Short)?;
    Ok((
        SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])),
        1 + n + 2,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let remote: SocketAddr = "203.0.113.20:4001".parse().unwrap();
        let remote6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        for f in [
            Frame::Data {
                flow: 7,
                payload: b"hello",
            },
            Frame::Data {
                flow: u32::MAX,
                payload: b"",
            },
            Frame::Open {
                flow: 1 << 24 | 3,
                tunnel: "node",
                remote,
                payload: &[0xc0; 1200],
            },
            Frame::Open {
                flow: 2,
                tunnel: "n",
                remote: remote6,
                payload: b"",
            },
            Frame::Opened {
                flow: 9,
                status: StreamStatus::TargetRefused,
            },
            Frame::Close {
                flow: 9,
                reason: CloseReason::Evicted,
            },
        ] {
            let b = f.encode();
            assert_eq!(Frame::decode(&b).unwrap(), f);
        }
        assert_eq!(
            Frame::Data {
                flow: 1,
                payload: b"ab"
            }
            .encode()
            .len(),
            DATA_OVERHEAD + 2
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert_eq!(Frame::decode(b""), Err(FrameError::Short));
        assert_eq!(Frame::decode(&[0, 0, 0]), Err(FrameError::Short));
        assert_eq!(
            Frame::decode(&[0x80, 0, 0, 0, 1]),
            Err(FrameError::Kind(0x80))
        );
        assert_eq!(
            Frame::decode(&[2, 0, 0, 0, 1, 99]),
            Err(FrameError::Field("status"))
        );
        assert_eq!(Frame::decode(&[3, 0, 0, 0, 1]), Err(FrameError::Short));
        // OPEN whose name runs past the end, bad family, truncated address.
        assert_eq!(
            Frame::decode(&[1, 0, 0, 0, 1, 9, b'a']),
            Err(FrameError::Short)
        );
        assert!(Frame::decode(&[1, 0, 0, 0, 1, 1, b'a', 5, 1, 2, 3, 4, 0, 1]).is_err());
        assert!(Frame::decode(&[1, 0, 0, 0, 1, 1, b'a', 4, 1, 2]).is_err());
        assert!(Frame::decode(&[1, 0, 0, 0, 1, 1, 0xff, 4, 1, 2, 3, 4, 0, 1]).is_err());
        // Every prefix of a good OPEN decodes or errs, never panics.
        let b = Frame::Open {
            flow: 5,
            tunnel: "node",
            remote: "[2001:db8::1]:9".parse().unwrap(),
            payload: b"x",
        }
        .encode();
        for n in 0..b.len() {
            let _ = Frame::decode(&b[..n]);
        }
    }
}
