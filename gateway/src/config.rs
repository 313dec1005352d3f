//! The gateway's configuration model. Every key here is documented in the
//! README; `relaygate-gateway check-config` prints the effective values.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use libp2p::{Multiaddr, PeerId};
use relaygate_common::{
    admin::AdminConfig,
    identity::IdentityConfig,
    names::{LeasePort, PortRange, Secret},
    telemetry::LogConfig,
    transport::SessionTuning,
};
use serde::{Deserialize, Serialize};

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
    pub leases: LeaseConfig,
    pub proxy_protocol: ProxyPolicy,
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
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            tokens: true,
            token: Secret::default(),
            token_file: None,
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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// Address the leased public ports bind to.
    pub bind: IpAddr,
    /// Ports handed out when a tunnel names none.
    pub port_range: PortRange,
    /// Further ports a tunnel may ask for by number (e.g. `9905`, `4001-4010`).
    pub allowed_ports: Vec<PortRange>,
    /// Most tunnels one agent may hold.
    pub max_tunnels_per_agent: usize,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::from([0, 0, 0, 0]),
            port_range: PortRange {
                low: LeasePort::new(20000).unwrap_or(LeasePort::MIN),
                high: LeasePort::new(20999).unwrap_or(LeasePort::MIN),
            },
            allowed_ports: Vec::new(),
            max_tunnels_per_agent: 16,
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
            leases: LeaseConfig::default(),
            proxy_protocol: ProxyPolicy::default(),
            session: SessionTuning::default(),
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
        Ok(())
    }

    /// Host parts of the advertised addresses, deduplicated, in order.
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
