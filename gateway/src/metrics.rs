//! The gateway's Prometheus metrics, all prefixed `relaygate_gateway_`.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use relaygate_common::metrics::{ReasonLabels, Side, SideLabels, TunnelBytesLabels, TunnelLabels};

pub struct Metrics {
    pub registry: Registry,
    /// Open connections by side (public = leased ports, session = libp2p).
    pub connections_active: Family<SideLabels, Gauge>,
    pub connections_opened: Family<SideLabels, Counter>,
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    pub leases: Gauge,
    pub tunnels_active: Gauge,
    pub tunnel_connections: Family<TunnelLabels, Counter>,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    /// Anything the gateway said no to: admission, leases, public connections.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Streams to agents that could not be opened, by reason.
    pub dial_failures: Family<ReasonLabels, Counter>,
    /// Malformed input from the network, by kind.
    pub bad_input: Family<ReasonLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relaygate_gateway");
        let m = Self {
            connections_active: Family::default(),
            connections_opened: Family::default(),
            sessions_active: Gauge::default(),
            sessions_opened: Counter::default(),
            leases: Gauge::default(),
            tunnels_active: Gauge::default(),
            tunnel_connections: Family::default(),
            tunnel_bytes: Family::default(),
            refusals: Family::default(),
            dial_failures: Family::default(),
            bad_input: Family::default(),
            registry: Registry::default(),
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
            "Agent sessions currently admitted",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions_opened",
            "Agent sessions admitted",
            m.sessions_opened.clone(),
        );
        registry.register("leases", "Leases in the store", m.leases.clone());
        registry.register(
            "tunnels_active",
            "Tunnels with a bound public port",
            m.tunnels_active.clone(),
        );
        registry.register(
            "tunnel_connections",
            "Public connections per tunnel",
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
            "Failed stream opens toward agents by reason",
            m.dial_failures.clone(),
        );
        registry.register(
            "bad_input",
            "Malformed network input by kind",
            m.bad_input.clone(),
        );
        Self { registry, ..m }
    }

    pub fn refuse(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
    }

    pub fn bad_input(&self, kind: &str) {
        self.bad_input.get_or_create(&ReasonLabels::new(kind)).inc();
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
