//! The control stream: a 4-byte big-endian length, then a JSON
//! [`ControlMessage`] of at most [`MAX_CONTROL_FRAME`] bytes.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{map_eof, WireError, MAX_CONTROL_FRAME, MAX_TUNNELS_PER_HELLO, WIRE_VERSION};
use crate::names::{LeasePort, TunnelName};

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
    /// Sent by the agent after the welcome, to a gateway whose welcome said
    /// `lease_retry`: asks again for tunnels refused for a passing reason
    /// (the store was unavailable, a port could not be bound).
    Lease {
        tunnels: Vec<TunnelRequest>,
    },
    /// The gateway's answer to `Lease`.
    Leases {
        leases: Vec<LeaseGrant>,
    },
    /// From the gateway, to an agent whose hello said `fleet`: the fleet's
    /// gateways changed (one joined, left or moved); the whole list again.
    Fleet {
        gateways: Vec<FleetGateway>,
    },
    /// First frame of a [`super::FORWARD_PROTOCOL`] stream, from a gateway of
    /// the fleet: a public connection that arrived on `port` at that gateway,
    /// from `source`; its bytes follow raw.
    Forward {
        port: LeasePort,
        source: std::net::SocketAddr,
        destination: std::net::SocketAddr,
    },
    /// From the agent, to a gateway whose welcome said `node_claims`: the
    /// peer ids of the nodes behind its tunnels, as it learnt them. The
    /// gateway checks each through the tunnel before it relays circuits to it.
    Nodes {
        claims: Vec<NodeClaim>,
    },
    /// From the gateway, to an agent whose hello said `lease_lifecycle`:
    /// the tunnel's lease was revoked (its public port no longer accepts;
    /// connections already open go on). The agent stops advertising that
    /// port and asks for a new lease with `Lease`.
    LeaseRevoked {
        tunnel: TunnelName,
        /// Why, for the agent's log.
        reason: String,
    },
    /// The gateway's answer to one claim.
    NodeVerdict {
        tunnel: TunnelName,
        node: String,
        accepted: bool,
        /// Why it was refused; empty when accepted.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
}

/// The node behind a tunnel, by the peer id its handshake proved to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeClaim {
    pub tunnel: TunnelName,
    pub node: String,
}

/// A gateway of the fleet, as the welcome and `Fleet` name it. Strings on
/// the wire: the agent parses them and skips (and counts) what it cannot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetGateway {
    pub peer_id: String,
    /// Where agents dial it, each ending in `/p2p/<peer_id>`.
    pub addresses: Vec<String>,
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
    /// The agent follows the fleet: the gateway names its gateways in the
    /// welcome and sends `Fleet` when they change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fleet: bool,
    /// The agent takes `LeaseRevoked` (an agent from before would end its
    /// session on an unknown message), and `tunnels` with `paused` name
    /// every tunnel it has, so the gateway releases its leases under other
    /// names (renamed tunnels).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease_lifecycle: bool,
    /// Tunnels the agent has but does not run now (refused at its start,
    /// e.g. transparent delivery unavailable): their leases are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paused: Vec<TunnelName>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &self.token.as_ref().map(|_| crate::names::MASK))
            .field("tunnels", &self.tunnels)
            .field("fleet", &self.fleet)
            .field("lease_lifecycle", &self.lease_lifecycle)
            .field("paused", &self.paused)
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
    /// What the tunnel carries; its lease's one port number serves each.
    /// Absent for TCP, so a TCP-only hello is what it was before UDP.
    #[serde(default, skip_serializing_if = "Proto::is_tcp")]
    pub proto: Proto,
}

/// The protocols a tunnel carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
    Both,
}

impl Proto {
    pub fn is_tcp(&self) -> bool {
        *self == Proto::Tcp
    }
    pub fn tcp(self) -> bool {
        self != Proto::Udp
    }
    pub fn udp(self) -> bool {
        self != Proto::Tcp
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Both => "both",
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "both" => Ok(Proto::Both),
            _ => Err(format!("proto must be tcp, udp or both, got {s:?}")),
        }
    }
}

/// Where an agent's UDP tunnels' datagram channel connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpOffer {
    /// UDP port of the gateway's datagram channel, on the host the agent
    /// dialled (or the gateway's advertised host).
    pub port: u16,
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
    /// The gateway answers `Lease` on the control stream after the welcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease_retry: bool,
    /// The fleet's gateways, this one included, for an agent that follows
    /// the fleet (empty otherwise, and for a gateway alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet: Vec<FleetGateway>,
    /// Host parts of a name that resolves to every gateway of the fleet
    /// (`fleet.advertise`), advertised before each gateway's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet_hosts: Vec<String>,
    /// The gateway takes `Nodes` claims and relays circuits to the nodes
    /// it checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_claims: bool,
    /// The gateway carries UDP tunnels over a datagram channel on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpOffer>,
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
    /// The tunnel asks for UDP and the gateway carries no UDP tunnels
    /// (`udp.enabled = false`).
    UdpOff,
}

impl LeaseRefusal {
    /// Worth asking again later: the refusal was about the gateway's state
    /// (its store, a port someone else bound), not about the request.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::StoreFailed | Self::BindFailed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortHeld => "port_held",
            Self::PortNotAllowed => "port_not_allowed",
            Self::RangeExhausted => "range_exhausted",
            Self::DuplicateName => "duplicate_name",
            Self::BindFailed => "bind_failed",
            Self::StoreFailed => "store_failed",
            Self::TooManyTunnels => "too_many_tunnels",
            Self::UdpOff => "udp_off",
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

/// Reads control frames so that a read can be cancelled (another branch of
/// a `select!` won) without losing a frame that had partly arrived: what
/// was read stays here for the next call. At most one frame and one read's
/// worth are held.
#[derive(Default)]
pub struct ControlReader {
    buf: Vec<u8>,
}

impl ControlReader {
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<ControlMessage, WireError> {
        loop {
            let need = match self.buf.get(..4) {
                Some(head) => {
                    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                    if len > MAX_CONTROL_FRAME {
                        return Err(WireError::Oversized(len));
                    }
                    if self.buf.len() >= 4 + len {
                        let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                        return decode_control(&body);
                    }
                    4 + len - self.buf.len()
                }
                None => 4 - self.buf.len(),
            };
            self.buf.reserve(need.min(8192));
            // `read_buf` is cancel safe: cancelled, it read nothing.
            if r.read_buf(&mut self.buf).await.map_err(map_eof)? == 0 {
                return Err(WireError::Truncated);
            }
        }
    }
}

/// Decodes one control frame body. Public for the fuzz target.
pub fn decode_control(body: &[u8]) -> Result<ControlMessage, WireError> {
    let msg: ControlMessage =
        serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    let version = match &msg {
        ControlMessage::Hello(h) => {
            if h.tunnels.len() + h.paused.len() > MAX_TUNNELS_PER_HELLO {
                return Err(WireError::Malformed(format!(
                    "{} tunnels in one hello, at most {MAX_TUNNELS_PER_HELLO}",
                    h.tunnels.len() + h.paused.len()
                )));
            }
            h.version
        }
        ControlMessage::Welcome(w) => w.version,
        ControlMessage::Dialback { version, .. } => *version,
        ControlMessage::Lease { tunnels } if tunnels.len() > MAX_TUNNELS_PER_HELLO => {
            return Err(WireError::Malformed(format!(
                "{} tunnels in one lease request, at most {MAX_TUNNELS_PER_HELLO}",
                tunnels.len()
            )));
        }
        ControlMessage::Nodes { claims } if claims.len() > MAX_TUNNELS_PER_HELLO => {
            return Err(WireError::Malformed(format!(
                "{} node claims in one message, at most {MAX_TUNNELS_PER_HELLO}",
                claims.len()
            )));
        }
        ControlMessage::Refused(_)
        | ControlMessage::Nodes { .. }
        | ControlMessage::NodeVerdict { .. }
        | ControlMessage::LeaseRevoked { .. }
        | ControlMessage::DialbackResult { .. }
        | ControlMessage::Lease { .. }
        | ControlMessage::Leases { .. }
        | ControlMessage::Fleet { .. }
        | ControlMessage::Forward { .. } => WIRE_VERSION,
    };
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    Ok(msg)
}
