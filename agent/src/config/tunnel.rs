//! One tunnel's configuration: its target, how connections reach it
//! (`deliver`), what it carries (`proto`), the node's peer id, and the
//! `--tunnel` flag's syntax.

use std::{path::PathBuf, str::FromStr};

use libp2p::PeerId;
use relaygate_common::{
    names::{LeasePort, TunnelName},
    protocol::Proto,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    pub name: TunnelName,
    /// Local target, `host:port`.
    pub target: TargetAddr,
    /// Public port wanted on the gateway; one from its range when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<LeasePort>,
    /// The node's libp2p peer id, appended as `/p2p/...` to advertised
    /// addresses: a given id (checked against the node at each session) or
    /// `auto` (learnt from the node at each session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_peer_id: Option<NodeId>,
    /// File that receives this tunnel's advertised addresses, one line, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_file: Option<PathBuf>,
    /// How connections reach the target.
    #[serde(default)]
    pub deliver: DeliveryMode,
    /// What the tunnel carries: `tcp` (default), `udp` or `both`, on the
    /// same leased port number.
    #[serde(default)]
    pub proto: Proto,
}

/// How the agent's connection to the target is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    #[default]
    Plain,
    Transparent,
    ProxyV1,
    ProxyV2,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Plain => "plain",
            DeliveryMode::Transparent => "transparent",
            DeliveryMode::ProxyV1 => "proxy-v1",
            DeliveryMode::ProxyV2 => "proxy-v2",
        }
    }
}

/// Which peer id the node behind a tunnel has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeId {
    /// Learnt from the node (a security handshake with it) at each session.
    Auto,
    /// Given; the agent checks at each session that the node holds it.
    Given(PeerId),
}

impl NodeId {
    pub fn given(self) -> Option<PeerId> {
        match self {
            NodeId::Given(p) => Some(p),
            NodeId::Auto => None,
        }
    }
}

impl FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(NodeId::Auto);
        }
        s.parse()
            .map(NodeId::Given)
            .map_err(|_| format!("node_peer_id must be a peer id or \"auto\", got {s:?}"))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeId::Auto => f.write_str("auto"),
            NodeId::Given(p) => write!(f, "{p}"),
        }
    }
}

relaygate_common::serde_via_str!(NodeId);

/// `--tunnel NAME=HOST:PORT[@PUBLIC_PORT][,deliver=MODE][,proto=tcp|udp|both][,node_peer_id=ID|auto][,advertise_file=PATH]`
impl FromStr for TunnelConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("--tunnel expects NAME=HOST:PORT[@PUBLIC_PORT][,deliver=MODE][,proto=tcp|udp|both][,node_peer_id=ID|auto][,advertise_file=PATH], got {s:?}")
        };
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (name, rest) = head.split_once('=').ok_or_else(usage)?;
        let (target, port) = match rest.rsplit_once('@') {
            Some((t, p)) => (t, Some(p.parse::<LeasePort>().map_err(|e| e.to_string())?)),
            None => (rest, None),
        };
        let mut t = Self {
            name: name
                .parse()
                .map_err(|e: relaygate_common::names::NameError| e.to_string())?,
            target: target.parse()?,
            port,
            node_peer_id: None,
            advertise_file: None,
            deliver: DeliveryMode::default(),
            proto: Proto::default(),
        };
        for opt in parts {
            let (k, v) = opt.split_once('=').ok_or_else(usage)?;
            match k {
                "deliver" => {
                    t.deliver = serde_json::from_value(serde_json::Value::String(v.into()))
                        .map_err(|_| {
                            format!(
                            "deliver must be plain, transparent, proxy-v1 or proxy-v2, got {v:?}"
                        )
                        })?
                }
                "node_peer_id" => t.node_peer_id = Some(v.parse()?),
                "proto" => t.proto = v.parse()?,
                "advertise_file" => t.advertise_file = Some(PathBuf::from(v)),
                _ => return Err(usage()),
            }
        }
        Ok(t)
    }
}

/// A `host:port` the agent connects to; the host may be a DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetAddr {
    pub host: String,
    pub port: u16,
}

impl FromStr for TargetAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("target must be host:port (e.g. 127.0.0.1:9905 or [::1]:9905), got {s:?}");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

relaygate_common::serde_via_str!(TargetAddr);
