//! `bandwidth.*`: caps the gateway enforces on tunnel traffic, per agent
//! (all its tunnels together) and per tunnel, each direction, with a burst.

use libp2p::PeerId;
use relaygate_common::names::TunnelName;
use serde::{Deserialize, Serialize};

/// Smallest burst: a lane frame's worth, so a capped stream still moves
/// whole frames.
pub const MIN_BURST: u64 = 64 * 1024;

/// The smallest cap: one 64 KiB burst then waits 8 s at most, well within
/// `limits.idle_timeout`.
pub const MIN_RATE: u64 = 8 * 1024;

/// A cap in bytes per second each way; 0 is uncapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bandwidth {
    /// Client -> node, bytes per second.
    pub inbound: u64,
    /// Node -> client, bytes per second.
    pub outbound: u64,
    /// Bytes that may pass at once above the rate; 0: a tenth of a
    /// second's worth, at least 64 KiB.
    pub burst: u64,
}

impl Bandwidth {
    pub fn is_uncapped(&self) -> bool {
        self.inbound == 0 && self.outbound == 0
    }

    /// The burst of a direction capped at `rate`: never below a frame, so
    /// a chunk waits once, not a thousand times.
    pub fn burst_for(&self, rate: u64) -> u64 {
        if self.burst > 0 {
            self.burst.max(MIN_BURST)
        } else {
            (rate / 10).max(MIN_BURST)
        }
    }

    /// Refuses a rate so low that one burst would wait longer than a
    /// connection may idle.
    pub fn check(&self) -> Result<(), String> {
        for (dir, rate) in [("inbound", self.inbound), ("outbound", self.outbound)] {
            if rate != 0 && rate < MIN_RATE {
                return Err(format!(
                    "{dir} = {rate} bytes/s is below the smallest cap, {MIN_RATE} bytes/s (0 is uncapped)"
                ));
            }
        }
        Ok(())
    }
}

/// One agent's cap.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBandwidth {
    pub peer: PeerId,
    #[serde(default)]
    pub inbound: u64,
    #[serde(default)]
    pub outbound: u64,
    #[serde(default)]
    pub burst: u64,
}

/// The cap of every tunnel with this name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelBandwidth {
    pub name: TunnelName,
    #[serde(default)]
    pub inbound: u64,
    #[serde(default)]
    pub outbound: u64,
    #[serde(default)]
    pub burst: u64,
}

macro_rules! cap_of {
    ($t:ty) => {
        impl $t {
            pub fn cap(&self) -> Bandwidth {
                Bandwidth {
                    inbound: self.inbound,
                    outbound: self.outbound,
                    burst: self.burst,
                }
            }
        }
    };
}
cap_of!(AgentBandwidth);
cap_of!(TunnelBandwidth);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BandwidthConfig {
    /// Every agent's cap, all its tunnels together.
    pub agent: Bandwidth,
    /// Every tunnel's cap.
    pub tunnel: Bandwidth,
    /// Named agents' caps, in place of `agent` (`[[bandwidth.agents]]`).
    pub agents: Vec<AgentBandwidth>,
    /// Caps of tunnels by name, in place of `tunnel` (`[[bandwidth.tunnels]]`).
    pub tunnels: Vec<TunnelBandwidth>,
}

impl BandwidthConfig {
    pub fn for_agent(&self, peer: &PeerId) -> Bandwidth {
        self.agents
            .iter()
            .find(|a| &a.peer == peer)
            .map(|a| a.cap())
            .unwrap_or(self.agent)
    }

    pub fn for_tunnel(&self, name: &TunnelName) -> Bandwidth {
        self.tunnels
            .iter()
            .find(|t| &t.name == name)
            .map(|t| t.cap())
            .unwrap_or(self.tunnel)
    }

    /// Every cap of the section, checked (see [`Bandwidth::check`]).
    pub fn check(&self) -> Result<(), String> {
        let named = |what: &str, e: String| format!("bandwidth.{what}: {e}");
        self.agent.check().map_err(|e| named("agent", e))?;
        self.tunnel.check().map_err(|e| named("tunnel", e))?;
        for a in &self.agents {
            a.cap()
                .check()
                .map_err(|e| named(&format!("agents ({})", a.peer), e))?;
        }
        for t in &self.tunnels {
            t.cap()
                .check()
                .map_err(|e| named(&format!("tunnels ({})", t.name), e))?;
        }
        Ok(())
    }

    /// Whether any cap is set at all.
    pub fn any(&self) -> bool {
        !(self.agent.is_uncapped()
            && self.tunnel.is_uncapped()
            && self.agents.iter().all(|a| a.cap().is_uncapped())
            && self.tunnels.iter().all(|t| t.cap().is_uncapped()))
    }
}
