//! `[fleet]`: what a gateway of a fleet (`store.kind = "etcd"`) tells its
//! agents beyond its own addresses.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// A name that resolves to every gateway of the fleet (one A/AAAA record
    /// each), such as `/dns4/gw.example.com`: agents advertise their leased
    /// ports on it before each gateway's own host, so a node's peers reach
    /// whichever gateway answers. A port or `/p2p/` part is ignored.
    pub advertise: Vec<Multiaddr>,
    /// Carry a public connection that lands on a gateway without a session
    /// to its agent to a gateway that has one (`/relaygate/forward/1`).
    pub forward: bool,
}

impl FleetConfig {
    pub fn hosts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for h in self.advertise.iter().filter_map(super::host_part) {
            if !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            advertise: Vec::new(),
            forward: true,
        }
    }
}
