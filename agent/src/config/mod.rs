//! The agent's configuration model. Every key is documented in the README;
//! `relaygate-agent check-config` prints the effective values.

use std::{path::PathBuf, str::FromStr, time::Duration};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    admin::AdminConfig,
    identity::IdentityConfig,
    names::{Secret, ServiceName, TunnelName},
    telemetry::LogConfig,
    transport::SessionTuning,
};
use serde::{Deserialize, Serialize};

use crate::transparent::TransparentConfig;

mod tunnel;
pub use tunnel::{DeliveryMode, NodeId, TargetAddr, TunnelConfig};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9601";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Holds the agent's identity key (its leases are bound to this identity).
    pub data_dir: PathBuf,
    pub identity: IdentityConfig,
    pub gateway: GatewayLink,
    /// The tunnels to lease: `[[tunnels]]` tables.
    pub tunnels: Vec<TunnelConfig>,
    /// Reservation on the gateway's relay, hole punching, AutoNAT.
    pub relay: RelayClientConfig,
    /// Local services offered to peers by peer id: `[[services]]` tables.
    pub services: Vec<ServiceConfig>,
    /// Local ports that reach other agents' services: `[[connect]]` tables.
    pub connect: Vec<VisitorConfig>,
    pub reconnect: ReconnectConfig,
    pub session: SessionTuning,
    pub limits: crate::limits::LimitsConfig,
    /// How long to wait for the local target to accept a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the nodes of tunnels with a `node_peer_id` are probed
    /// again during a session: a node back with another identity is
    /// advertised and claimed at its new id.
    #[serde(with = "humantime_serde")]
    pub node_recheck: Duration,
    /// Marks and routing table of transparent delivery.
    pub transparent: TransparentConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// How long open connections may drain after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayLink {
    /// Gateway multiaddrs ending in `/p2p/<gateway peer id>`; QUIC ones are tried first.
    pub addresses: Vec<Multiaddr>,
    /// Join token printed by the gateway (not needed when on its allow-list).
    pub token: Secret,
    /// File holding the join token; wins over `token`.
    pub token_file: Option<PathBuf>,
    /// Timeout of one dial attempt.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Gateways of a fleet to hold a session with at once: the configured
    /// one and others its welcome names. Each serves the leased ports and
    /// the relay; 1 keeps to the configured gateway.
    pub max_sessions: usize,
}

impl Default for GatewayLink {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            token: Secret::default(),
            token_file: None,
            dial_timeout: Duration::from_secs(5),
            max_sessions: 3,
        }
    }
}

relaygate_common::serde_via_str!(ServicePeer);

/// The agent as a relay client of its gateway.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayClientConfig {
    /// Reserve on the gateway's relay, so peers reach this agent by peer id.
    pub enabled: bool,
    /// Local listeners used only as the source port of hole punches and of
    /// the session (port reuse keeps the NAT mapping the gateway observed).
    /// Empty: no hole punching, relay only.
    pub punch_listen: Vec<Multiaddr>,
    /// Ask the gateway (AutoNAT) whether this agent is publicly reachable.
    pub autonat: bool,
    /// File that receives the circuit addresses, one line, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_file: Option<PathBuf>,
}

impl Default for RelayClientConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            punch_listen: ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            autonat: true,
            advertise_file: None,
        }
    }
}

/// What a service hands its target in front of the bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceProxy {
    /// Nothing: the target sees a local connection.
    #[default]
    None,
    /// A PROXY v2 header with the caller's peer id in TLV 0xE1.
    V2,
}

/// A local service offered to peers by peer id.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: ServiceName,
    /// Local target, `host:port`.
    pub target: TargetAddr,
    /// Peer ids allowed to connect (required: services are allow-list only).
    pub allow: Vec<PeerId>,
    #[serde(default)]
    pub proxy_protocol: ServiceProxy,
}

/// `--service NAME=HOST:PORT,allow=PEER[,allow=PEER][,proxy=v2]`
impl FromStr for ServiceConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("--service expects NAME=HOST:PORT,allow=PEER_ID[,allow=PEER_ID][,proxy=v2], got {s:?}")
        };
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, target) = head.split_once('=').ok_or_else(usage)?;
        let mut svc = Self {
            name: name
                .parse()
                .map_err(|e: relaygate_common::names::NameError| e.to_string())?,
            target: target.parse()?,
            allow: Vec::new(),
            proxy_protocol: ServiceProxy::None,
        };
        for opt in parts {
            match opt.split_once('=').ok_or_else(usage)? {
                ("allow", v) => svc.allow.push(
                    v.parse()
                        .map_err(|_| format!("bad peer id {v:?} in --service"))?,
                ),
                ("proxy", "v2") => svc.proxy_protocol = ServiceProxy::V2,
                ("proxy", "none") => svc.proxy_protocol = ServiceProxy::None,
                _ => return Err(usage()),
            }
        }
        Ok(svc)
    }
}

/// Where a visitor reaches a service: a peer id (through this agent's
/// gateway relay) or a full circuit multiaddr ending in `/p2p/<peer id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePeer {
    Id(PeerId),
    Address { peer: PeerId, addr: Multiaddr },
}

impl ServicePeer {
    pub fn peer_id(&self) -> PeerId {
        match self {
            ServicePeer::Id(p) | ServicePeer::Address { peer: p, .. } => *p,
        }
    }
}

impl FromStr for ServicePeer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(p) = s.parse::<PeerId>() {
            return Ok(ServicePeer::Id(p));
        }
        let addr: Multiaddr = s.parse().map_err(|_| {
            format!("expected a peer id or a multiaddr ending in /p2p/<peer id>, got {s:?}")
        })?;
        match addr.iter().last() {
            Some(Protocol::P2p(peer)) => Ok(ServicePeer::Address { peer, addr }),
            _ => Err(format!("multiaddr {s} must end in /p2p/<peer id>")),
        }
    }
}

impl std::fmt::Display for ServicePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServicePeer::Id(p) => write!(f, "{p}"),
            ServicePeer::Address { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// A local port whose connections reach `service` on `peer`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisitorConfig {
    pub peer: ServicePeer,
    pub service: ServiceName,
    /// Local address to listen on, e.g. `127.0.0.1:2222`.
    pub listen: std::net::SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First delay after a session drops.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Cap of the exponential backoff.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("relaygate-agent-data"),
            identity: IdentityConfig::default(),
            gateway: GatewayLink::default(),
            tunnels: Vec::new(),
            relay: RelayClientConfig::default(),
            services: Vec::new(),
            connect: Vec::new(),
            reconnect: ReconnectConfig::default(),
            session: SessionTuning::default(),
            limits: crate::limits::LimitsConfig::default(),
            connect_timeout: Duration::from_secs(5),
            node_recheck: Duration::from_secs(30),
            transparent: TransparentConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error(
        "gateway.addresses is empty: pass --gateway with an address the gateway printed at start"
    )]
    NoGateway,
    #[error("gateway address {0} must end with /p2p/<gateway peer id> (the gateway prints full addresses at start)")]
    NoPeerId(Multiaddr),
    #[error("gateway addresses name different peer ids ({0} and {1}); one agent session talks to one gateway")]
    MixedPeers(String, String),
    #[error(
        "nothing to do: pass --tunnel NAME=HOST:PORT, --service NAME=HOST:PORT,allow=PEER, or use `connect`"
    )]
    NoTunnels,
    #[error("tunnel name {0} appears twice")]
    DuplicateTunnel(TunnelName),
    #[error("service name {0} appears twice")]
    DuplicateService(ServiceName),
    #[error(
        "service {0} allows no peer: add allow = [\"<peer id>\"] (services are allow-list only)"
    )]
    ServiceWithoutAllow(ServiceName),
    #[error("services and connect need the relay: set relay.enabled = true")]
    RelayOff,
    #[error("tunnel {0}: deliver=proxy-v1/v2 cannot carry UDP (QUIC reads no PROXY header); use deliver=transparent or plain, or proto=tcp")]
    UdpProxy(TunnelName),
}

impl AgentConfig {
    pub const LIST_KEYS: &'static [&'static str] = &[
        "gateway.addresses",
        "admin.open_paths",
        "relay.punch_listen",
    ];

    pub fn admin_listen(&self) -> std::net::SocketAddr {
        self.admin.listen.unwrap_or_else(|| {
            DEFAULT_ADMIN
                .parse()
                .unwrap_or(([127, 0, 0, 1], 9601).into())
        })
    }

    /// The gateway's peer id, taken from its addresses.
    pub fn gateway_peer(&self) -> Result<PeerId, ConfigProblem> {
        let mut peer: Option<PeerId> = None;
        for a in &self.gateway.addresses {
            let Some(Protocol::P2p(p)) = a.iter().last() else {
                return Err(ConfigProblem::NoPeerId(a.clone()));
            };
            match peer {
                Some(q) if q != p => {
                    return Err(ConfigProblem::MixedPeers(q.to_string(), p.to_string()))
                }
                _ => peer = Some(p),
            }
        }
        peer.ok_or(ConfigProblem::NoGateway)
    }

    pub fn validate(&self) -> Result<(), ConfigProblem> {
        self.gateway_peer()?;
        if self.tunnels.is_empty() && self.services.is_empty() && self.connect.is_empty() {
            return Err(ConfigProblem::NoTunnels);
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tunnels {
            if !seen.insert(&t.name) {
                return Err(ConfigProblem::DuplicateTunnel(t.name.clone()));
            }
            // QUIC stacks read no PROXY header: the real source reaches a
            // UDP node by transparent delivery only.
            if t.proto.udp() && matches!(t.deliver, DeliveryMode::ProxyV1 | DeliveryMode::ProxyV2) {
                return Err(ConfigProblem::UdpProxy(t.name.clone()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.services {
            if !seen.insert(&s.name) {
                return Err(ConfigProblem::DuplicateService(s.name.clone()));
            }
            if s.allow.is_empty() {
                return Err(ConfigProblem::ServiceWithoutAllow(s.name.clone()));
            }
        }
        let uses_relay = !self.services.is_empty() || !self.connect.is_empty();
        if uses_relay && !self.relay.enabled {
            return Err(ConfigProblem::RelayOff);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_flag() {
        let t: TunnelConfig = "node=127.0.0.1:9905@9905".parse().unwrap();
        assert_eq!(t.name.as_str(), "node");
        assert_eq!(t.target.to_string(), "127.0.0.1:9905");
        assert_eq!(t.port.map(|p| p.get()), Some(9905));
        let t: TunnelConfig = "web=[::1]:80".parse().unwrap();
        assert_eq!(t.target.host, "::1");
        assert!(t.port.is_none());
        assert!("nohost".parse::<TunnelConfig>().is_err());
        let t: TunnelConfig = "q=10.0.0.5:9905@9905,proto=both,deliver=transparent"
            .parse()
            .unwrap();
        assert_eq!(t.proto, relaygate_common::protocol::Proto::Both);
        assert_eq!(t.port.map(|p| p.get()), Some(9905));
        assert!("q=10.0.0.5:9905,proto=sctp"
            .parse::<TunnelConfig>()
            .is_err());
        assert!("x=localhost".parse::<TunnelConfig>().is_err());
        assert!("bad name=localhost:1".parse::<TunnelConfig>().is_err());
        let t: TunnelConfig = "n=10.0.0.5:9905@9905,deliver=transparent,advertise_file=/shared/a"
            .parse()
            .unwrap();
        assert_eq!(t.deliver, DeliveryMode::Transparent);
        assert_eq!(t.advertise_file, Some(PathBuf::from("/shared/a")));
        assert!("n=10.0.0.5:9905,deliver=magic"
            .parse::<TunnelConfig>()
            .is_err());
        assert!("n=10.0.0.5:9905,colour=red"
            .parse::<TunnelConfig>()
            .is_err());
    }
}
