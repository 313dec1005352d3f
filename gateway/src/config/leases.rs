//! `leases.*`: which public ports tunnels get, how many, and for how long
//! an agent may stay away before its leases are freed.

use std::{net::IpAddr, time::Duration};

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
    /// Leases of an agent that has had no session for this long are freed;
    /// `0s`: never.
    #[serde(with = "humantime_serde")]
    pub expire_after: Duration,
}

/// A week: a node off for longer has dropped out of its peers' address
/// books anyway, while one down over a long weekend or a holiday keeps its
/// port; and an agent without a persistent identity (a pod with no volume),
/// which leaks one lease per restart, holds at most a week of them.
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

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
            expire_after: DEFAULT_EXPIRE_AFTER,
        }
    }
}
