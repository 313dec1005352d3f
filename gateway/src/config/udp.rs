//! `udp.*`: UDP tunnels. The datagram channel agents connect to, and the
//! bounds on flows (one per remote address and port of a leased UDP port).

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// Carry UDP tunnels (`proto=udp|both`); off, they are refused.
    pub enabled: bool,
    /// The datagram channel's UDP address; agents connect here (open it in
    /// the firewall beside TCP/UDP 4001).
    pub listen: SocketAddr,
    /// The channel port agents are told, when a balancer or NAT maps it to
    /// another; default the `listen` port.
    pub advertise_port: Option<u16>,
    /// A flow whose remote has proved its address ends after this long
    /// without a datagram either way.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A flow whose remote has not (yet) proved its address ends sooner.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Flows on the whole gateway.
    pub max_flows: usize,
    /// Flows on one leased port.
    pub max_flows_per_tunnel: usize,
    /// Flows of one source (an IPv4 address, or an IPv6 network of
    /// `guard.ipv6_prefix`) on one port.
    pub max_flows_per_source: usize,
    /// Flows on one port whose remote has not proved its address: what a
    /// flood of spoofed sources can hold. The oldest is evicted for a new one.
    pub max_unvalidated_per_tunnel: usize,
    /// New flows one port takes per second, and in a burst.
    pub new_flows_per_second: u32,
    pub new_flows_burst: u32,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], relaygate_common::dgram::DEFAULT_PORT)),
            advertise_port: None,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_flows: 65_536,
            max_flows_per_tunnel: 4096,
            max_flows_per_source: 64,
            max_unvalidated_per_tunnel: 512,
            new_flows_per_second: 1000,
            new_flows_burst: 2000,
        }
    }
}

impl UdpConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.max_flows == 0 || self.max_flows_per_tunnel == 0 || self.max_flows_per_source == 0 {
            return Err(
                "udp.max_flows, max_flows_per_tunnel and max_flows_per_source must be at least 1"
                    .into(),
            );
        }
        if self.max_unvalidated_per_tunnel == 0 {
            return Err("udp.max_unvalidated_per_tunnel must be at least 1".into());
        }
        if self.new_flows_per_second == 0 || self.new_flows_burst == 0 {
            return Err("udp.new_flows_per_second and new_flows_burst must be at least 1".into());
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.handshake_timeout < Duration::from_secs(1)
        {
            return Err("udp.idle_timeout and udp.handshake_timeout must be at least 1s".into());
        }
        Ok(())
    }

    /// The port agents dial for the channel.
    pub fn channel_port(&self) -> u16 {
        self.advertise_port.unwrap_or(self.listen.port())
    }
}
