//! The gateway's Prometheus metrics, all prefixed `relaygate_gateway_`: the
//! families both binaries share, plus the gateway's own.

use prometheus_client::metrics::gauge::Gauge;
use relaygate_common::metrics::{Core, Side, SideLabels};

pub struct Metrics {
    core: Core,
    /// Tunnels with a bound public port.
    pub tunnels_active: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut core = Core::new("relaygate_gateway");
        let tunnels_active = Gauge::default();
        core.registry.register(
            "tunnels_active",
            "Tunnels with a bound public port",
            tunnels_active.clone(),
        );
        Self {
            core,
            tunnels_active,
        }
    }

    pub fn side(side: Side) -> SideLabels {
        SideLabels { side }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for Metrics {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}
