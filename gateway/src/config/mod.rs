//! The gateway's configuration model. Every key here is documented in the
//! README; `relaygate-gateway check-config` prints the effective values.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use libp2p::{Multiaddr, PeerId};
use relaygate_common::{
    admin::AdminConfig, identity::IdentityConfig, names::Secret, telemetry::LogConfig,
    transport::SessionTuning,
};
use serde::{Deserialize, Serialize};

pub mod bandwidth;
pub mod fleet;
pub mod guard;
pub mod leases;
pub mod store;
pub mod udp;

/// Default admin API address of the gateway.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9600";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Holds the identity key, the join token and the lease store.
    pub data_dir: PathBuf,
    /// libp2p bind addresses (TCP and QUIC-v1).
    pub listen: Vec<Multiaddr>,
    /// Where others reach this gateway (DNS names allowed). Leased ports are
    /// advertised on the same hosts.
    pub advertise: Vec<Multiaddr>,
    pub identity: IdentityConfig,
    pub admission: AdmissionConfig,
    pub leases: leases::LeaseConfig,
    /// Where leases are kept: embedded (one gateway) or etcd (a fleet).
    pub store: store::StoreConfig,
    /// With `store.kind = "etcd"`: the fleet's shared name, and forwarding.
    pub fleet: fleet::FleetConfig,
    pub proxy_protocol: ProxyPolicy,
    pub relay: RelayConfig,
    pub autonat: AutonatConfig,
    pub limits: LimitsConfig,
    /// Caps on tunnel traffic, per agent and per tunnel.
    pub bandwidth: bandwidth::BandwidthConfig,
    /// UDP tunnels: the datagram channel and flows.
    pub udp: udp::UdpConfig,
    pub guard: guard::GuardConfig,
    pub session: SessionTuning,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// How long open connections may drain after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Agent peer ids admitted without a token.
    pub allow: Vec<PeerId>,
    /// Admit agents that present the join token.
    pub tokens: bool,
    /// The join token inline; wins over `token_file`.
    pub token: Secret,
    /// Join token file; generated (0600) on first start. Default: `<data_dir>/join-token`.
    pub token_file: Option<PathBuf>,
    /// Further join tokens admitted besides the main one, so a token can be
    /// rotated: give agents the new one, reload, drop the old one, reload.
    pub accept_tokens: Vec<Secret>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            tokens: true,
            token: Secret::default(),
            token_file: None,
            accept_tokens: Vec::new(),
        }
    }
}

/// PROXY protocol read by the gateway on its leased ports, from trusted balancers only.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyPolicy {
    /// CIDRs (e.g. the load balancer's) whose PROXY v1/v2 headers are believed.
    pub trusted: Vec<IpNet>,
    /// Trusted peers must send a header; without one the connection is refused.
    pub required: bool,
}

impl ProxyPolicy {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// The circuit relay v2 hop. Members (token-admitted agents with a session, and
/// peers on `admission.allow`) reserve freely and their circuits carry no
/// Limit; `limited_peers` may reserve with `limit`; everyone else is refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    pub enabled: bool,
    /// Lifetime of a reservation; clients renew before it ends.
    #[serde(with = "humantime_serde")]
    pub reservation_ttl: Duration,
    pub max_reservations: usize,
    /// Reservations one peer may hold (one per connection).
    pub max_reservations_per_peer: usize,
    pub max_reservations_per_ip: usize,
    pub max_circuits: usize,
    /// Circuits one peer may have open as their source. Kept well below
    /// `max_circuits_per_destination`, so that strangers cannot take all of a
    /// member's slots.
    pub max_circuits_per_source: usize,
    /// Circuits one reserved peer may have open as their destination.
    pub max_circuits_per_destination: usize,
    /// Circuits opened from one source IP.
    pub max_circuits_per_ip: usize,
    /// Hop requests (RESERVE, CONNECT) being read or answered at once;
    /// beyond it new hop streams are reset and counted.
    pub max_pending_requests: usize,
    /// What one source may hold of them once half are taken.
    pub max_pending_requests_per_source: usize,
    /// A circuit that moves no byte for this long is closed.
    #[serde(with = "humantime_serde")]
    pub circuit_idle_timeout: Duration,
    /// A circuit whose one side has not taken a byte for this long is
    /// closed: its reader stopped, and the other peer's bytes wait unread in
    /// the gateway, counted against that peer's connection window.
    #[serde(with = "humantime_serde")]
    pub circuit_stall_timeout: Duration,
    /// Per circuit and direction, in bytes per second; 0 is uncapped.
    pub circuit_rate: u64,
    /// Non-member peers allowed to reserve; circuits to them carry `limit`.
    pub limited_peers: Vec<PeerId>,
    pub limit: CircuitLimit,
}

/// The Limit sent with circuits to `limited_peers`, and enforced.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitLimit {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Bytes per direction.
    pub data: u64,
}

impl Default for CircuitLimit {
    fn default() -> Self {
        // rust-libp2p's and go-libp2p's defaults for limited relays.
        Self {
            duration: Duration::from_secs(120),
            data: 128 * 1024,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reservation_ttl: Duration::from_secs(3600),
            max_reservations: 4096,
            max_reservations_per_peer: 4,
            max_reservations_per_ip: 64,
            max_circuits: 4096,
            max_circuits_per_source: 16,
            max_circuits_per_destination: 128,
            max_circuits_per_ip: 64,
            max_pending_requests: 256,
            max_pending_requests_per_source: 16,
            circuit_idle_timeout: Duration::from_secs(120),
            circuit_stall_timeout: Duration::from_secs(30),
            circuit_rate: 0,
            limited_peers: Vec::new(),
            limit: CircuitLimit::default(),
        }
    }
}

/// Connection caps. Sessions are connections too: `max_connections` bounds
/// agents, relay users and everyone else together.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Established inbound libp2p connections.
    pub max_connections: u32,
    /// Inbound libp2p connections still in their handshake.
    pub max_pending_connections: u32,
    /// What one source (an IPv4 address or IPv6 prefix) may hold of them
    /// once half are taken; also caps the connections the libp2p TCP port
    /// holds while it looks at their first bytes.
    pub max_pending_connections_per_source: usize,
    pub max_connections_per_ip: usize,
    pub max_connections_per_peer: u32,
    /// Open connections on one leased port.
    pub max_connections_per_tunnel: usize,
    /// Open connections on all leased ports from one source (an IPv4
    /// address or an IPv6 /64; the client behind a trusted balancer's PROXY
    /// header), so one source cannot take every slot of a tunnel.
    pub max_connections_per_source: usize,
    /// A public connection that moves no byte for this long is closed; `0s` never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Resident bytes above which new connections, circuits and reservations
    /// are refused until usage falls under 90% of it; `0`: three quarters of
    /// the memory this process may use (cgroup limit, else the machine's).
    pub max_memory: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_pending_connections: 256,
            max_pending_connections_per_source: 16,
            max_connections_per_ip: 64,
            max_connections_per_peer: 8,
            max_connections_per_tunnel: 4096,
            max_connections_per_source: 1024,
            idle_timeout: Duration::from_secs(60),
            max_memory: 0,
        }
    }
}

impl LimitsConfig {
    /// File descriptors the caps can use at once (libp2p connections, one
    /// full tunnel, listeners and files), for the start-up check.
    pub fn descriptors_needed(&self) -> u64 {
        u64::from(self.max_connections)
            + u64::from(self.max_pending_connections)
            + self.max_connections_per_tunnel as u64
            + 256
    }
}

/// AutoNAT (v1) server: peers ask the gateway to dial them back and learn
/// whether they are publicly reachable.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutonatConfig {
    pub enabled: bool,
    /// Dial back only public IPs (turn off for private or lab networks).
    pub only_global_ips: bool,
}

impl Default for AutonatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            only_global_ips: true,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("relaygate-gateway-data"),
            listen: ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            advertise: Vec::new(),
            identity: IdentityConfig::default(),
            admission: AdmissionConfig::default(),
            leases: leases::LeaseConfig::default(),
            store: store::StoreConfig::default(),
            fleet: fleet::FleetConfig::default(),
            proxy_protocol: ProxyPolicy::default(),
            relay: RelayConfig::default(),
            autonat: AutonatConfig::default(),
            limits: LimitsConfig::default(),
            bandwidth: bandwidth::BandwidthConfig::default(),
            udp: udp::UdpConfig::default(),
            guard: guard::GuardConfig::default(),
            session: SessionTuning::gateway(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl GatewayConfig {
    /// Keys whose `RELAYGATE_*` environment value is a comma-separated list.
    pub const LIST_KEYS: &'static [&'static str] = &[
        "listen",
        "advertise",
        "admission.allow",
        "proxy_protocol.trusted",
        "leases.allowed_ports",
        "admin.open_paths",
        "relay.limited_peers",
        "store.etcd.endpoints",
        "admission.accept_tokens",
    ];

    pub fn token_file(&self) -> PathBuf {
        self.admission
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("join-token"))
    }
    pub fn lease_db(&self) -> PathBuf {
        self.data_dir.join("leases.redb")
    }
    pub fn admin_listen(&self) -> std::net::SocketAddr {
        self.admin.listen.unwrap_or_else(|| {
            DEFAULT_ADMIN
                .parse()
                .unwrap_or(([127, 0, 0, 1], 9600).into())
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error("listen is empty: give at least one multiaddr such as /ip4/0.0.0.0/tcp/4001")]
    NoListen,
    #[error("advertise address {0} must start with /ip4, /ip6, /dns, /dns4 or /dns6")]
    AdvertiseHost(Multiaddr),
    #[error("leases.max_tunnels_per_agent must be at least 1")]
    NoTunnels,
    #[error("{0}")]
    Bandwidth(String),
    #[error("{0}")]
    Udp(String),
}

impl GatewayConfig {
    /// Checks what serde cannot: relations between keys.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        if self.listen.is_empty() {
            return Err(ConfigProblem::NoListen);
        }
        for a in &self.advertise {
            if host_part(a).is_none() {
                return Err(ConfigProblem::AdvertiseHost(a.clone()));
            }
        }
        if self.leases.max_tunnels_per_agent == 0 {
            return Err(ConfigProblem::NoTunnels);
        }
        self.bandwidth.check().map_err(ConfigProblem::Bandwidth)?;
        self.udp.check().map_err(ConfigProblem::Udp)?;
        Ok(())
    }

    /// The TCP port agents dial for their lane: the advertised one (what is
    /// reachable from outside), else the one listened on. None when lanes are
    /// off or the gateway listens on no fixed TCP port.
    pub fn lane_port(&self) -> Option<u16> {
        use libp2p::multiaddr::Protocol;
        if self.session.data_path != relaygate_common::transport::DataPath::Lane {
            return None;
        }
        let tcp_port = |a: &Multiaddr| {
            let mut ps = a.iter();
            let port = ps.find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })?;
            // Not a TCP address if anything but the peer id follows (ws, ...).
            ps.all(|p| matches!(p, Protocol::P2p(_)))
                .then_some(port)
                .filter(|p| *p != 0)
        };
        self.advertise
            .iter()
            .find_map(tcp_port)
            .or_else(|| self.listen.iter().find_map(tcp_port))
    }

    /// Host parts of the advertised addresses, deduplicated, in order.
    /// Whether this gateway carries public connections to, and takes them
    /// from, the other gateways of its fleet.
    pub fn forwards(&self) -> bool {
        self.store.kind == store::StoreKind::Etcd && self.fleet.forward
    }

    pub fn public_hosts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for h in self.advertise.iter().filter_map(host_part) {
            if !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }
}

/// `/dns4/gw.example.com/tcp/4001` -> `/dns4/gw.example.com`.
pub fn host_part(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next()? {
        p @ (Protocol::Ip4(_)
        | Protocol::Ip6(_)
        | Protocol::Dns(_)
        | Protocol::Dns4(_)
        | Protocol::Dns6(_)) => Some(Multiaddr::empty().with(p).to_string()),
        _ => None,
    }
}
