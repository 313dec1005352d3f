//! Binary headers that start tunnel and service streams, and the agent's
//! one-byte answer to them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libp2p::PeerId;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{map_eof, WireError, WIRE_VERSION};
use crate::names::{ServiceName, TunnelName, MAX_TUNNEL_NAME};

/// Header of one tunnelled connection, written by the gateway.
///
/// ```text
/// u8 version | u8 name_len | name | addr source | addr destination [| u8 peer_len | peer id]
/// addr = u8 family (4 or 6) | 4 or 16 bytes ip | u16 port (big endian)
/// ```
/// The peer id is there when the version byte has [`PEER_FLAG`] set: on a
/// circuit to a node the agent fronts, whose dialer's id the node may be told
/// (PROXY v2 TLV 0xE1). Only an agent that claims nodes gets such circuits;
/// one from before this would refuse the header as a version it lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub tunnel: TunnelName,
    /// Where the public connection came from, as the gateway saw it.
    pub source: SocketAddr,
    /// The gateway address and leased port the remote connected to.
    pub destination: SocketAddr,
    /// The dialer's peer id, on a circuit to a node.
    pub peer: Option<PeerId>,
}

/// Set in a stream header's version byte when a peer id follows the addresses.
pub const PEER_FLAG: u8 = 0x80;
/// The longest peer id a header carries (an identity multihash of an Ed25519
/// key is 38 bytes; a SHA-256 one 34).
const MAX_PEER_ID_LEN: usize = 64;

/// Largest possible encoded header (lets readers bound their buffers).
pub const MAX_HEADER_LEN: usize = 2 + MAX_TUNNEL_NAME + 2 * 19 + 1 + MAX_PEER_ID_LEN;

impl StreamHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_HEADER_LEN);
        put_versioned_name(&mut out, self.tunnel.as_str());
        put_addr(&mut out, self.source);
        put_addr(&mut out, self.destination);
        if let Some(p) = &self.peer {
            let bytes = p.to_bytes();
            if bytes.len() <= MAX_PEER_ID_LEN {
                out[0] |= PEER_FLAG;
                out.push(bytes.len() as u8);
                out.extend_from_slice(&bytes);
            }
        }
        out
    }

    /// Decodes a complete header from `buf`, returning it and the bytes used.
    /// `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        let mut cur = Cursor { buf, pos: 0 };
        let Some((name, flagged)) = cur.versioned_name(
            "tunnel name length out of range",
            "tunnel name is not UTF-8",
        )?
        else {
            return Ok(None);
        };
        let tunnel = name.parse()?;
        let Some(source) = cur.addr()? else {
            return Ok(None);
        };
        let Some(destination) = cur.addr()? else {
            return Ok(None);
        };
        let peer = if flagged {
            let Some(len) = cur.u8() else {
                return Ok(None);
            };
            let len = usize::from(len);
            if len == 0 || len > MAX_PEER_ID_LEN {
                return Err(WireError::Header("peer id length out of range"));
            }
            let Some(bytes) = cur.take(len) else {
                return Ok(None);
            };
            // Canonical bytes only: what decodes encodes back the same.
            match PeerId::from_bytes(bytes) {
                Ok(p) if p.to_bytes() == bytes => Some(p),
                _ => return Err(WireError::Header("not a peer id")),
            }
        } else {
            None
        };
        Ok(Some((
            Self {
                tunnel,
                source,
                destination,
                peer,
            },
            cur.pos,
        )))
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
        // Read byte-exact so no payload byte is consumed with the header.
        let mut buf = Vec::with_capacity(MAX_HEADER_LEN);
        loop {
            if let Some((h, used)) = Self::decode(&buf)? {
                debug_assert_eq!(used, buf.len());
                return Ok(h);
            }
            if buf.len() >= MAX_HEADER_LEN {
                return Err(WireError::Header("header longer than possible"));
            }
            let need = Self::missing(&buf);
            let start = buf.len();
            buf.resize(start + need, 0);
            r.read_exact(&mut buf[start..]).await.map_err(map_eof)?;
        }
    }

    /// Lower bound of bytes still needed to make progress decoding `buf`.
    fn missing(buf: &[u8]) -> usize {
        match buf.len() {
            0 => 2,
            1 => 1,
            n => {
                let name_end = 2 + usize::from(buf[1]);
                if n < name_end + 1 {
                    return name_end + 1 - n;
                }
                // source family byte is known: complete the source and read the next family byte
                let src_end = name_end + addr_len(buf[name_end]);
                if n < src_end + 1 {
                    return src_end + 1 - n;
                }
                let dst_end = src_end + addr_len(buf[src_end]);
                if buf[0] & PEER_FLAG == 0 {
                    return dst_end.saturating_sub(n).max(1);
                }
                // then the peer id's length byte, then the peer id
                if n < dst_end + 1 {
                    return dst_end + 1 - n;
                }
                let peer_end = dst_end + 1 + usize::from(buf[dst_end]);
                peer_end.saturating_sub(n).max(1)
            }
        }
    }
}

fn addr_len(family: u8) -> usize {
    match family {
        6 => 1 + 16 + 2,
        _ => 1 + 4 + 2, // unknown families are rejected by decode on the next pass
    }
}

/// `u8 version | u8 len | name`: how both stream kinds start. Names are
/// validated at parse time to at most `MAX_TUNNEL_NAME` bytes.
fn put_versioned_name(out: &mut Vec<u8>, name: &str) {
    out.push(WIRE_VERSION as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

pub(crate) fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    /// Reads `u8 version | u8 len | name`, and whether the version byte has
    /// [`PEER_FLAG`] set; `Ok(None)` when more bytes are needed.
    fn versioned_name(
        &mut self,
        bad_len: &'static str,
        bad_utf8: &'static str,
    ) -> Result<Option<(&'a str, bool)>, WireError> {
        let Some(version) = self.u8() else {
            return Ok(None);
        };
        let flagged = version & PEER_FLAG != 0;
        if u16::from(version & !PEER_FLAG) != WIRE_VERSION {
            return Err(WireError::Version(version.into()));
        }
        let Some(len) = self.u8() else {
            return Ok(None);
        };
        let len = usize::from(len);
        if len == 0 || len > MAX_TUNNEL_NAME {
            return Err(WireError::Header(bad_len));
        }
        let Some(name) = self.take(len) else {
            return Ok(None);
        };
        std::str::from_utf8(name)
            .map(|n| Some((n, flagged)))
            .map_err(|_| WireError::Header(bad_utf8))
    }
    fn addr(&mut self) -> Result<Option<SocketAddr>, WireError> {
        let Some(family) = self.u8() else {
            return Ok(None);
        };
        let ip = match family {
            4 => match self.take(4) {
                Some(b) => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
                None => return Ok(None),
            },
            6 => match self.take(16) {
                Some(b) => {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(b);
                    IpAddr::V6(Ipv6Addr::from(o))
                }
                None => return Ok(None),
            },
            _ => return Err(WireError::Header("unknown address family")),
        };
        let Some(p) = self.take(2) else {
            return Ok(None);
        };
        Ok(Some(SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]]))))
    }
}

// ---------------------------------------------------------------- service stream

/// First bytes of a service stream: `u8 version | u8 name_len | name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRequest {
    pub service: ServiceName,
}

impl ServiceRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + MAX_TUNNEL_NAME);
        put_versioned_name(&mut out, self.service.as_str());
        out
    }

    /// Decodes a complete request from `buf`; `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        let mut cur = Cursor { buf, pos: 0 };
        let Some((name, flagged)) = cur.versioned_name(
            "service name length out of range",
            "service name is not UTF-8",
        )?
        else {
            return Ok(None);
        };
        if flagged {
            return Err(WireError::Version(WIRE_VERSION | u16::from(PEER_FLAG)));
        }
        let service = name.parse()?;
        Ok(Some((Self { service }, cur.pos)))
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, WireError> {
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await.map_err(map_eof)?;
        let mut buf = head.to_vec();
        if let Some((req, _)) = Self::decode(&buf)? {
            return Ok(req);
        }
        // decode checked the length byte, so this allocation is bounded.
        let start = buf.len();
        buf.resize(start + usize::from(head[1]), 0);
        r.read_exact(&mut buf[start..]).await.map_err(map_eof)?;
        match Self::decode(&buf)? {
            Some((req, _)) => Ok(req),
            None => Err(WireError::Truncated),
        }
    }
}

/// The agent's one-byte answer to a stream header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamStatus {
    /// Connected to the target; bytes follow.
    Connected = 0,
    /// The target refused or reset the connection.
    TargetRefused = 1,
    /// The target did not answer within the connect timeout.
    TargetUnreachable = 2,
    /// The agent has no tunnel of that name.
    UnknownTunnel = 3,
    /// The header could not be decoded.
    BadHeader = 4,
    /// The caller is not on the service's allow-list.
    NotAllowed = 5,
    /// The agent holds as many connections as its limits allow.
    Busy = 6,
}

impl StreamStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Connected,
            1 => Self::TargetRefused,
            2 => Self::TargetUnreachable,
            3 => Self::UnknownTunnel,
            4 => Self::BadHeader,
            5 => Self::NotAllowed,
            6 => Self::Busy,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::TargetRefused => "target_refused",
            Self::TargetUnreachable => "target_unreachable",
            Self::UnknownTunnel => "unknown_tunnel",
            Self::BadHeader => "bad_header",
            Self::NotAllowed => "not_allowed",
            Self::Busy => "busy",
        }
    }
}
