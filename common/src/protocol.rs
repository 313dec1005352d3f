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

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::names::{LeasePort, NameError, ServiceName, TunnelName, MAX_TUNNEL_NAME};

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

// ---------------------------------------------------------------- control

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMessage {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refusal),
    /// On the dial-back protocol: please connect to this leased port.
    Dialback {
        version: u16,
        port: LeasePort,
    },
    /// The dial-back's outcome.
    DialbackResult {
        reachable: bool,
        detail: String,
    },
}

/// First message of a session: who I am (the libp2p peer id says that), how I
/// was admitted, and which tunnels I want. Its `Debug` hides the token: a
/// logged message must not carry it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u16,
    /// Join token, when the agent is not on the gateway's allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub tunnels: Vec<TunnelRequest>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &self.token.as_ref().map(|_| crate::names::MASK))
            .field("tunnels", &self.tunnels)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelRequest {
    pub name: TunnelName,
    /// Public port wanted; the gateway picks one from its range when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<LeasePort>,
}

/// The gateway's answer to a hello. Fields the agent does not know are
/// ignored: the gateway adds them for newer agents, and it is authenticated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    /// Host parts of the gateway's advertised addresses (`/dns4/gw.example.com`,
    /// `/ip4/203.0.113.7`). Empty when the gateway advertises nothing: the agent
    /// then uses the host it dialled.
    pub public_hosts: Vec<String>,
    pub leases: Vec<LeaseGrant>,
    /// TCP port of the gateway's lane (its libp2p TCP port), when it takes
    /// lanes. An agent whose session runs over TCP dials the address it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane_port: Option<u16>,
    /// Most lanes the gateway takes from one agent; absent, one. A plain
    /// number, clamped by the agent (`LaneCount::clamped`), so a later
    /// gateway's larger limit does not spoil the whole welcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<u8>,
    /// The lane flow control the gateway speaks (`LaneFlow::TUNED_VERSION`);
    /// absent, windows fixed at 1 MiB. The agent names what it speaks in its
    /// lanes' TLS server names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane_flow: Option<u8>,
}

// No deny_unknown_fields here: serde does not support it together with flatten.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub name: TunnelName,
    #[serde(flatten)]
    pub outcome: LeaseOutcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LeaseOutcome {
    Granted { port: LeasePort },
    Refused { code: LeaseRefusal, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseRefusal {
    /// The wanted port is leased to another agent or tunnel.
    PortHeld,
    /// The wanted port is not in the gateway's allowed set.
    PortNotAllowed,
    /// No free port is left in the range.
    RangeExhausted,
    /// The same tunnel name appears twice in one Hello.
    DuplicateName,
    /// The gateway could not bind the port (another process holds it).
    BindFailed,
    /// The lease store failed; the gateway's log has details.
    StoreFailed,
    /// The agent asked for more tunnels than the gateway allows one agent.
    TooManyTunnels,
}

impl LeaseRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortHeld => "port_held",
            Self::PortNotAllowed => "port_not_allowed",
            Self::RangeExhausted => "range_exhausted",
            Self::DuplicateName => "duplicate_name",
            Self::BindFailed => "bind_failed",
            Self::StoreFailed => "store_failed",
            Self::TooManyTunnels => "too_many_tunnels",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// Neither on the allow-list nor holding a valid join token.
    NotAdmitted,
    UnsupportedVersion,
    BadRequest,
    /// The gateway is draining before it exits; try again shortly.
    ShuttingDown,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::NotAdmitted => "not_admitted",
            RefusalCode::UnsupportedVersion => "unsupported_version",
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::ShuttingDown => "shutting_down",
        }
    }
}

pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMessage,
) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(WireError::Oversized(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_control<R: AsyncRead + Unpin>(r: &mut R) -> Result<ControlMessage, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(map_eof)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::Oversized(len));
    }
    // Grown as the bytes arrive, not allocated at the announced length: a
    // peer that announces 64 KiB and sends 4 bytes holds 4 bytes of ours.
    let mut body = Vec::new();
    let got = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(map_eof)?;
    if got < len {
        return Err(WireError::Truncated);
    }
    decode_control(&body)
}

/// Decodes one control frame body. Public for the fuzz target.
pub fn decode_control(body: &[u8]) -> Result<ControlMessage, WireError> {
    let msg: ControlMessage =
        serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    let version = match &msg {
        ControlMessage::Hello(h) => {
            if h.tunnels.len() > MAX_TUNNELS_PER_HELLO {
                return Err(WireError::Malformed(format!(
                    "{} tunnels in one hello, at most {MAX_TUNNELS_PER_HELLO}",
                    h.tunnels.len()
                )));
            }
            h.version
        }
        ControlMessage::Welcome(w) => w.version,
        ControlMessage::Dialback { version, .. } => *version,
        ControlMessage::Refused(_) | ControlMessage::DialbackResult { .. } => WIRE_VERSION,
    };
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    Ok(msg)
}

// ---------------------------------------------------------------- tunnel stream

/// Header of one tunnelled connection, written by the gateway.
///
/// ```text
/// u8 version | u8 name_len | name | addr source | addr destination
/// addr = u8 family (4 or 6) | 4 or 16 bytes ip | u16 port (big endian)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub tunnel: TunnelName,
    /// Where the public connection came from, as the gateway saw it.
    pub source: SocketAddr,
    /// The gateway address and leased port the remote connected to.
    pub destination: SocketAddr,
}

/// Largest possible encoded header (lets readers bound their buffers).
pub const MAX_HEADER_LEN: usize = 2 + MAX_TUNNEL_NAME + 2 * 19;

impl StreamHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_HEADER_LEN);
        put_versioned_name(&mut out, self.tunnel.as_str());
        put_addr(&mut out, self.source);
        put_addr(&mut out, self.destination);
        out
    }

    /// Decodes a complete header from `buf`, returning it and the bytes used.
    /// `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, WireError> {
        let mut cur = Cursor { buf, pos: 0 };
        let Some(name) = cur.versioned_name(
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
        Ok(Some((
            Self {
                tunnel,
                source,
                destination,
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
                dst_end.saturating_sub(n).max(1)
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

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
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
    /// Reads `u8 version | u8 len | name`; `Ok(None)` when more bytes are needed.
    fn versioned_name(
        &mut self,
        bad_len: &'static str,
        bad_utf8: &'static str,
    ) -> Result<Option<&'a str>, WireError> {
        let Some(version) = self.u8() else {
            return Ok(None);
        };
        if u16::from(version) != WIRE_VERSION {
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
            .map(Some)
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
        let Some(name) = cur.versioned_name(
            "service name length out of range",
            "service name is not UTF-8",
        )?
        else {
            return Ok(None);
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lane::{LaneCount, MAX_LANES};

    #[tokio::test]
    async fn a_control_frame_is_read_as_it_arrives_and_a_short_one_is_truncated() {
        let msg = ControlMessage::DialbackResult {
            reachable: true,
            detail: "ok".into(),
        };
        let body = serde_json::to_vec(&msg).unwrap();
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let writer = tokio::spawn(async move {
            for byte in frame {
                b.write_all(&[byte]).await.unwrap();
            }
            // A frame that announces 64 KiB and ends after 10 bytes.
            b.write_all(&(64u32 * 1024).to_be_bytes()).await.unwrap();
            b.write_all(&[b'{'; 10]).await.unwrap();
        });
        assert_eq!(read_control(&mut a).await.unwrap(), msg);
        writer.await.unwrap();
        assert!(matches!(
            read_control(&mut a).await,
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn a_logged_hello_hides_its_token() {
        let hello = ControlMessage::Hello(Hello {
            version: WIRE_VERSION,
            token: Some("rgt_supersecret".into()),
            tunnels: vec![],
        });
        let shown = format!("{hello:?}");
        assert!(
            !shown.contains("supersecret") && shown.contains("***"),
            "{shown}"
        );
    }

    fn header(src: &str, dst: &str) -> StreamHeader {
        StreamHeader {
            tunnel: "node".parse().unwrap(),
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn header_round_trips_v4_and_v6() {
        for h in [
            header("203.0.113.5:40000", "198.51.100.1:20001"),
            header("[2001:db8::5]:40000", "[2001:db8::1]:20001"),
            header("203.0.113.5:1", "[2001:db8::1]:65535"),
        ] {
            let mut bytes = h.encode();
            bytes.extend_from_slice(b"payload");
            let mut r = &bytes[..];
            assert_eq!(StreamHeader::read(&mut r).await.unwrap(), h);
            assert_eq!(r, b"payload", "header reader must not consume payload");
            // every strict prefix asks for more
            for cut in 0..h.encode().len() {
                assert!(
                    StreamHeader::decode(&bytes[..cut]).unwrap().is_none(),
                    "cut {cut}"
                );
            }
        }
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let good = header("203.0.113.5:40000", "198.51.100.1:20001").encode();
        let mut v = good.clone();
        v[0] = 9;
        assert!(matches!(
            StreamHeader::decode(&v),
            Err(WireError::Version(9))
        ));
        let mut v = good.clone();
        v[1] = 0;
        assert!(StreamHeader::decode(&v).is_err());
        let mut v = good.clone();
        v[2] = b' ';
        assert!(matches!(StreamHeader::decode(&v), Err(WireError::Name(_))));
        let mut v = good.clone();
        v[6] = 5; // family
        assert!(StreamHeader::decode(&v).is_err());
        let mut r = &good[..good.len() - 1];
        assert!(matches!(
            StreamHeader::read(&mut r).await,
            Err(WireError::Truncated)
        ));
    }

    #[tokio::test]
    async fn control_frames_round_trip_and_reject_garbage() {
        let hello = ControlMessage::Hello(Hello {
            version: WIRE_VERSION,
            token: Some("t".into()),
            tunnels: vec![TunnelRequest {
                name: "node".parse().unwrap(),
                port: LeasePort::new(9905),
            }],
        });
        let mut buf = Vec::new();
        write_control(&mut buf, &hello).await.unwrap();
        assert_eq!(read_control(&mut &buf[..]).await.unwrap(), hello);

        let mut r = &buf[..buf.len() - 1];
        assert!(matches!(
            read_control(&mut r).await,
            Err(WireError::Truncated)
        ));

        let welcome = ControlMessage::Welcome(Welcome {
            version: WIRE_VERSION,
            public_hosts: vec!["/dns4/gw.example.com".into()],
            leases: vec![
                LeaseGrant {
                    name: "a".parse().unwrap(),
                    outcome: LeaseOutcome::Granted {
                        port: LeasePort::new(20000).unwrap(),
                    },
                },
                LeaseGrant {
                    name: "b".parse().unwrap(),
                    outcome: LeaseOutcome::Refused {
                        code: LeaseRefusal::PortHeld,
                        message: "held".into(),
                    },
                },
            ],
            lane_port: Some(4001),
            lanes: Some(4),
            lane_flow: Some(2),
        });
        let mut buf = Vec::new();
        write_control(&mut buf, &welcome).await.unwrap();
        assert_eq!(read_control(&mut &buf[..]).await.unwrap(), welcome);

        let huge = (MAX_CONTROL_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_control(&mut &huge[..]).await,
            Err(WireError::Oversized(_))
        ));

        assert!(matches!(
            decode_control(b"{\"type\":\"hello\"}"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_control(b"\xff\x00garbage"),
            Err(WireError::Malformed(_))
        ));
        // A welcome from an older gateway (no lane fields) and from a newer
        // one (fields this build does not know, a larger lane limit) decode.
        let older = br#"{"type":"welcome","version":1,"public_hosts":[],"leases":[]}"#;
        match decode_control(older) {
            Ok(ControlMessage::Welcome(w)) => assert_eq!((w.lane_port, w.lanes), (None, None)),
            other => panic!("older welcome: {other:?}"),
        }
        let newer = br#"{"type":"welcome","version":1,"public_hosts":[],"leases":[],"lane_port":4001,"lanes":12,"later":{"x":1}}"#;
        match decode_control(newer) {
            Ok(ControlMessage::Welcome(w)) => {
                assert_eq!(w.lanes.map(LaneCount::clamped), LaneCount::new(MAX_LANES))
            }
            other => panic!("newer welcome: {other:?}"),
        }
        let v2 = br#"{"type":"hello","version":2,"tunnels":[]}"#;
        assert!(matches!(decode_control(v2), Err(WireError::Version(2))));
        let bad_name = br#"{"type":"hello","version":1,"tunnels":[{"name":"a b"}]}"#;
        assert!(matches!(
            decode_control(bad_name),
            Err(WireError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn service_request_round_trips_and_rejects_bad_names() {
        let req = ServiceRequest {
            service: "ssh".parse().unwrap(),
        };
        let mut bytes = req.encode();
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        assert_eq!(ServiceRequest::read(&mut r).await.unwrap(), req);
        assert_eq!(r, b"payload", "no payload byte is consumed with the header");
        assert!(matches!(
            ServiceRequest::decode(&[1, 3, b'a', b' ', b'b']),
            Err(WireError::Name(_))
        ));
        assert!(matches!(
            ServiceRequest::decode(&[1, 0]),
            Err(WireError::Header(_))
        ));
        assert!(matches!(
            ServiceRequest::decode(&[9, 1, b'a']),
            Err(WireError::Version(9))
        ));
        assert!(matches!(
            ServiceRequest::read(&mut &[1u8, 5, b'a'][..]).await,
            Err(WireError::Truncated)
        ));
    }
}
