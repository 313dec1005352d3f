//! The agent's Prometheus metrics, all prefixed `relaygate_agent_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use relaygate_common::metrics::{ReasonLabels, SideLabels, TunnelBytesLabels, TunnelLabels};

/// A delivery attempt to a target: its mode and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub mode: String,
    pub result: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub connections_active: Family<SideLabels, Gauge>,
    pub connections_opened: Family<SideLabels, Counter>,
    /// 1 while the session to the gateway is up.
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    /// Tunnels holding a lease.
    pub leases: Gauge,
    pub tunnel_connections: Family<TunnelLabels, Counter>,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    /// Failed dials: to the gateway and to targets, by reason.
    pub dial_failures: Family<ReasonLabels, Counter>,
    pub bad_input: Family<ReasonLabels, Counter>,
    /// Deliveries to targets by mode (plain, transparent, proxy-v1, proxy-v2) and result.
    pub deliveries: Family<DeliveryLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relaygate_agent");
        let m = Self {
            registry: Registry::default(),
            connections_active: Family::default(),
            connections_opened: Family::default(),
            sessions_active: Gauge::default(),
            sessions_opened: Counter::default(),
            leases: Gauge::default(),
            tunnel_connections: Family::default(),
            tunnel_bytes: Family::default(),
            refusals: Family::default(),
            dial_failures: Family::default(),
            bad_input: Family::default(),
            deliveries: Family::default(),
        };
        registry.register(
            "connections_active",
            "Open connections by side",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections opened by side",
            m.connections_opened.clone(),
        );
        registry.register(
            "sessions_active",
            "1 while the session to the gateway is up",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions_opened",
            "Sessions established with the gateway",
            m.sessions_opened.clone(),
        );
        registry.register("leases", "Tunnels holding a lease", m.leases.clone());
        registry.register(
            "tunnel_connections",
            "Tunnelled connections per tunnel",
            m.tunnel_connections.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes per tunnel and direction",
            m.tunnel_bytes.clone(),
        );
        registry.register("refusals", "Refusals by reason", m.refusals.clone());
        registry.register(
            "dial_failures",
            "Failed dials to the gateway or targets by reason",
            m.dial_failures.clone(),
        );
        registry.register(
            "bad_input",
            "Malformed network input by kind",
            m.bad_input.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries to targets by mode and result",
            m.deliveries.clone(),
        );
        Self { registry, ..m }
    }

    pub fn delivered(&self, mode: &str, result: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                mode: mode.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn count(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family.get_or_create(&ReasonLabels::new(reason)).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
