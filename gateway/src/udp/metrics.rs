//! The UDP tunnels' metrics (`relaygate_gateway_udp_*`): channels, flows by
//! state, datagrams and bytes each way, and every datagram dropped, by why.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use relaygate_common::metrics::ReasonLabels;

use crate::metrics::{Direction, DirectionLabels};

#[derive(Default)]
pub struct UdpMetrics {
    pub channels_active: Gauge,
    /// Flows whose remote proved its address, and those that have not (yet).
    pub flows_validated: Gauge,
    pub flows_unvalidated: Gauge,
    pub flows_opened: Counter,
    pub flows_closed: Family<ReasonLabels, Counter>,
    pub datagrams: Family<DirectionLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    /// Bytes to and from remotes that had not proved their address: the
    /// outbound never exceeds the inbound (no amplification).
    pub unvalidated_bytes: Family<DirectionLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
}

impl UdpMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "udp_channels_active",
            "Agents' datagram channels up",
            m.channels_active.clone(),
        );
        r.register(
            "udp_flows_validated",
            "UDP flows whose remote proved it receives at its address",
            m.flows_validated.clone(),
        );
        r.register(
            "udp_flows_unvalidated",
            "UDP flows whose remote has not proved its address (held to 1x the bytes it sent)",
            m.flows_unvalidated.clone(),
        );
        r.register(
            "udp_flows_opened",
            "UDP flows opened",
            m.flows_opened.clone(),
        );
        r.register(
            "udp_flows_closed",
            "UDP flows ended, by reason",
            m.flows_closed.clone(),
        );
        r.register(
            "udp_datagrams",
            "Datagrams carried, inbound (remote to node) and outbound",
            m.datagrams.clone(),
        );
        r.register(
            "udp_bytes",
            "UDP payload bytes carried, by direction",
            m.bytes.clone(),
        );
        r.register(
            "udp_unvalidated_bytes",
            "UDP payload bytes to and from remotes that had not proved their address",
            m.unvalidated_bytes.clone(),
        );
        r.register(
            "udp_dropped",
            "Datagrams dropped, by reason",
            m.dropped.clone(),
        );
        m
    }

    pub fn drop(&self, reason: &str) {
        self.dropped.get_or_create(&ReasonLabels::new(reason)).inc();
    }

    pub fn closed(&self, reason: &str) {
        self.flows_closed
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
    }

    pub fn carried(&self, dir: Direction, n: usize, validated: bool) {
        let l = DirectionLabels { direction: dir };
        self.datagrams.get_or_create(&l).inc();
        self.bytes.get_or_create(&l).inc_by(n as u64);
        if !validated {
            self.unvalidated_bytes.get_or_create(&l).inc_by(n as u64);
        }
    }
}
