//! Label sets shared by both binaries' Prometheus metrics, so the same
//! question ("bytes of tunnel X inbound") has the same name on each side.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// Which side of a relaygate process a connection is on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Side {
    /// Accepted on a gateway's leased public port.
    Public,
    /// A libp2p connection between agent and gateway.
    Session,
    /// The agent's connection to its local target.
    Target,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// Toward the node behind the agent.
    Inbound,
    /// From the node back to the remote.
    Outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabels {
    pub side: Side,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

impl ReasonLabels {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// Agent peer id.
    pub agent: String,
    pub tunnel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelBytesLabels {
    pub agent: String,
    pub tunnel: String,
    pub direction: Direction,
}
