//! `[guard]`: the blacklist, rates, automatic bans and how sources are
//! grouped, as configured. The guard itself lives in `crate::guard`.

use std::{fmt, net::IpAddr, num::NonZeroU32, str::FromStr, time::Duration};

use governor::Quota;
use ipnet::IpNet;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// What a ban applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BanTarget {
    Peer(PeerId),
    Net(IpNet),
}

impl BanTarget {
    pub fn covers_ip(&self, ip: IpAddr) -> bool {
        matches!(self, BanTarget::Net(n) if n.contains(&ip))
    }
}

impl FromStr for BanTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(p) = s.parse::<PeerId>() {
            return Ok(BanTarget::Peer(p));
        }
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(BanTarget::Net(n.trunc()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(BanTarget::Net(IpNet::from(ip)));
        }
        Err(format!(
            "expected a peer id, an IP or a CIDR (198.51.100.0/24), got {s:?}"
        ))
    }
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::Peer(p) => write!(f, "{p}"),
            BanTarget::Net(n) => write!(f, "{n}"),
        }
    }
}

relaygate_common::serde_via_str!(BanTarget);

/// A blacklist entry as written in config or posted to the admin API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanRequest {
    pub target: BanTarget,
    #[serde(default)]
    pub reason: String,
    /// How long the ban lasts; permanent when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
    pub fn quota(self) -> Option<Quota> {
        let per = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second))?;
        Some(Quota::per_second(per).allow_burst(burst))
    }
}

/// `[guard]`: blacklist, rates, automatic bans.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Permanent or expiring bans loaded at start.
    pub blacklist: Vec<BanRequest>,
    /// New libp2p connections per source IP.
    pub connections_per_ip: Rate,
    /// New connections on leased ports per source IP.
    pub tunnel_connections_per_ip: Rate,
    /// Relay reservations (and renewals) per peer.
    pub reservations_per_peer: Rate,
    /// Relay circuits per source peer.
    pub circuits_per_peer: Rate,
    /// Relay circuits per source IP.
    pub circuits_per_ip: Rate,
    /// Protocol violations (malformed input) that earn a temporary ban...
    pub violations_before_ban: u32,
    /// ...when they happen within this window.
    #[serde(with = "humantime_serde")]
    pub violation_window: Duration,
    /// Length of an automatic ban.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    /// Peer ids banned automatically from one source (an IPv4 address or an
    /// IPv6 prefix) within `ban_duration` that ban the source itself: fresh
    /// peer ids cost an attacker nothing, its address does. 0: never.
    pub peer_bans_before_source_ban: u32,
    /// How IPv6 sources are grouped for per-IP rates, caps, shares and
    /// automatic bans: one host is usually given a whole /64.
    pub ipv6_prefix: Ipv6Prefix,
}

/// The length of the IPv6 prefix that counts as one source (32 to 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Ipv6Prefix(u8);

impl Ipv6Prefix {
    pub const DEFAULT: Ipv6Prefix = Ipv6Prefix(64);

    /// The source `ip` belongs to: an IPv4 address (IPv4-mapped IPv6
    /// included) as it is, an IPv6 address cut to the prefix.
    pub fn source(self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6);
                    let mask = u128::MAX.checked_shl(128 - u32::from(self.0)).unwrap_or(0);
                    IpAddr::V6((bits & mask).into())
                }
            },
        }
    }

    /// The network a ban of `ip`'s source covers.
    pub fn source_net(self, ip: IpAddr) -> IpNet {
        let source = self.source(ip);
        let len = if source.is_ipv4() { 32 } else { self.0 };
        IpNet::new(source, len).unwrap_or_else(|_| IpNet::from(source))
    }
}

impl TryFrom<u8> for Ipv6Prefix {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        if (32..=128).contains(&n) {
            Ok(Ipv6Prefix(n))
        } else {
            Err(format!(
                "guard.ipv6_prefix must be 32 to 128 (64: one host's usual allocation), got {n}"
            ))
        }
    }
}

impl From<Ipv6Prefix> for u8 {
    fn from(p: Ipv6Prefix) -> u8 {
        p.0
    }
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            blacklist: Vec::new(),
            connections_per_ip: Rate::new(20, 100),
            tunnel_connections_per_ip: Rate::new(200, 1000),
            reservations_per_peer: Rate::new(1, 10),
            circuits_per_peer: Rate::new(10, 50),
            circuits_per_ip: Rate::new(20, 100),
            violations_before_ban: 20,
            violation_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(600),
            peer_bans_before_source_ban: 3,
            ipv6_prefix: Ipv6Prefix::DEFAULT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_are_cut_to_the_prefix_and_ipv4_stays_whole() {
        let p = Ipv6Prefix::DEFAULT;
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(p.source(a), p.source(b));
        assert_eq!(p.source_net(a).to_string(), "2001:db8:1:2::/64");
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(p.source_net(v4).to_string(), "198.51.100.7/32");
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(p.source(mapped), v4);
        let full = Ipv6Prefix::try_from(128).unwrap();
        assert_ne!(full.source(a), full.source(b));
        assert!(Ipv6Prefix::try_from(16).unwrap_err().contains("32 to 128"));
    }
}
