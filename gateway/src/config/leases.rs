//! `leases.*`: which public ports tunnels get, and how many.

use std::net::IpAddr;

use relaygate_common::names::{LeasePort, PortRange};
use serde::{Deserialize, Serialize};

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
