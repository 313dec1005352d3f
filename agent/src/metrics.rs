//! The agent's Prometheus metrics, all prefixed `relaygate_agent_`: the
//! families both binaries share, plus deliveries by mode.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use relaygate_common::metrics::Core;

/// A delivery attempt to a target: its mode and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub mode: String,
    pub result: String,
}

pub struct Metrics {
    core: Core,
    /// Deliveries to targets by mode (plain, transparent, proxy-v1, proxy-v2) and result.
    pub deliveries: Family<DeliveryLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut core = Core::new("relaygate_agent");
        let deliveries = Family::default();
        core.registry.register(
            "deliveries",
            "Deliveries to targets by mode and result",
            deliveries.clone(),
        );
        Self { core, deliveries }
    }

    pub fn delivered(&self, mode: &str, result: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                mode: mode.into(),
                result: result.into(),
            })
            .inc();
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
