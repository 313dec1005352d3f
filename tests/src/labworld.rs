//! The NAT lab's usual world for tunnel tests: a gateway host on the
//! internet (203.0.113.10), a remote peer beside it (203.0.113.20), and a
//! node host (198.18.1.10) on a LAN behind a masquerading router; helpers
//! that start the gateway and agents there and read their JSON lines.
//! Dropping the world removes every namespace (and so every process) in it.

use std::path::Path;

use crate::{
    netlab::{Host, Lab, Lan, Nat},
    stack::{self, Agent, Gateway, GatewaySpec, Transport},
};

pub struct World {
    pub lab: Lab,
    pub gw_host: Host,
    pub remote: Host,
    pub lan: Lan,
    pub node_host: Host,
}

/// Builds the world; `tag` names the lab in logs. Panics when the lab
/// cannot be built (callers checked `netlab::require_root` first).
pub fn world(tag: &str) -> World {
    let lab = Lab::new(tag).expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let remote = lab.internet_host("remote", 20);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node_host = lab.lan_host(&lan, "node", 10);
    World {
        lab,
        gw_host,
        remote,
        lan,
        node_host,
    }
}

impl World {
    /// A gateway on the gateway host, on all addresses, with dual-stack
    /// leased ports (`leases.bind=::`, so remotes come in over IPv6 too),
    /// its lease range `port_range` when given, and `settings` (`key=value`).
    pub fn gateway(&self, port_range: Option<&str>, settings: &[&str]) -> Gateway {
        let launch = |b: &Path| self.gw_host.cmd(b);
        let mut extra = stack::settings(&["leases.bind=::"]);
        extra.extend(stack::settings(settings));
        let spec = GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: self.gw_host.ip().to_string(),
            port_range: port_range.map(str::to_string),
            extra,
            ..Default::default()
        };
        Gateway::start(&launch, spec)
    }

    /// An agent on the node host, over QUIC, with the gateway's join token.
    pub fn agent(&self, gw: &Gateway, tunnels: &[String]) -> Agent {
        self.agent_with(gw, tunnels, &[])
    }

    /// The same with extra command-line arguments.
    pub fn agent_with(&self, gw: &Gateway, tunnels: &[String], extra: &[String]) -> Agent {
        let launch = |b: &Path| self.node_host.cmd(b);
        Agent::start(&launch, gw, Transport::Quic, tunnels, true, extra)
    }

    /// The gateway's Prometheus text (its admin API listens inside the
    /// gateway host's namespace); empty when it cannot be reached.
    pub fn gateway_metrics(&self, gw: &Gateway) -> String {
        self.gw_host.run_in(|| gw.metrics())
    }
}

/// `sh -c script` on `host`: its stdout (status unchecked).
pub fn sh(host: &Host, script: &str) -> String {
    let out = host.sh(script).expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A string field of a JSON line (lab-node's events), or "".
pub fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Packets and bytes of the named nftables counter `name` in `table`
/// (`inet udplab`, say) on `host`; zeros when it cannot be read.
pub fn nft_counter(host: &Host, table: &str, name: &str) -> (u64, u64) {
    let out = sh(host, &format!("nft -j list counter {table} {name}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let c = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|x| x.get("counter")))
        .cloned()
        .unwrap_or_default();
    (
        c["packets"].as_u64().unwrap_or(0),
        c["bytes"].as_u64().unwrap_or(0),
    )
}

/// A field of /proc/net/snmp in `host`'s namespace (`"Udp"`,
/// `"RcvbufErrors"`), or 0.
pub fn snmp(host: &Host, proto: &str, name: &str) -> u64 {
    let text = sh(host, "cat /proc/net/snmp");
    let prefix = format!("{proto}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
