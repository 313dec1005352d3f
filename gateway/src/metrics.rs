//! The gateway's Prometheus metrics, all prefixed `relaygate_gateway_`: the
//! families both binaries share, plus the gateway's own.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use relaygate_common::metrics::{Core, ReasonLabels, Side, SideLabels};

pub struct Metrics {
    core: Core,
    /// Tunnels with a bound public port.
    pub tunnels_active: Gauge,
    pub relay: RelayMetrics,
    /// Bans in force (blacklist entries, config, admin and automatic).
    pub bans_active: Gauge,
    /// Bans added, by source (config, admin, automatic).
    pub bans_added: Family<ReasonLabels, Counter>,
    /// 1 while memory is over `limits.max_memory` and new work is refused.
    pub memory_overloaded: Gauge,
    /// Public connections carried between gateways of the fleet, by
    /// direction: `out` (landed here, served by another), `in`.
    pub forwarded: Family<ReasonLabels, Counter>,
    /// Leases freed, by reason: `expired`, `revoked`, `renamed`.
    pub leases_freed: Family<ReasonLabels, Counter>,
    /// Bandwidth caps at work (`caps.rs`).
    pub bandwidth: BandwidthMetrics,
    /// Configuration reloads by outcome: applied, refused, unreadable.
    pub reloads: Family<ReasonLabels, Counter>,
    /// UDP tunnels: channels, flows, datagrams (`udp/metrics.rs`).
    pub udp: crate::udp::metrics::UdpMetrics,
}

/// Which way capped bytes went: `inbound` (client to node) or `outbound`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Default)]
pub struct BandwidthMetrics {
    /// Bytes a cap held back before they went on.
    pub throttled_bytes: Family<DirectionLabels, Counter>,
    /// Time bytes waited for a cap.
    pub held_seconds: Family<DirectionLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
}

/// Who a reservation belongs to, and so whether its circuits carry a Limit.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReservationClass {
    /// Admitted agent or allow-listed peer: no Limit.
    Member,
    /// On `relay.limited_peers`: circuits carry `relay.limit`.
    Limited,
    /// No reservation: a node an agent fronts (`nodes.rs`); no Limit.
    Node,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: ReservationClass,
}

/// Which way relayed bytes went, seen from the circuit's initiator.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RelayDirection {
    /// From the peer that asked for the circuit to the reserved peer.
    SrcToDst,
    DstToSrc,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayDirectionLabels {
    pub direction: RelayDirection,
}

/// The circuit relay v2 hop's metrics.
#[derive(Default)]
pub struct RelayMetrics {
    pub reservations_active: Gauge,
    pub reservations_accepted: Family<ClassLabels, Counter>,
    pub reservations_renewed: Counter,
    /// By the spec's status name (PERMISSION_DENIED, ...).
    pub reservations_denied: Family<ReasonLabels, Counter>,
    pub circuits_active: Gauge,
    pub circuits_opened: Family<ClassLabels, Counter>,
    pub circuits_denied: Family<ReasonLabels, Counter>,
    /// Why circuits ended: closed, idle, limit_duration, limit_data, reset.
    pub circuits_closed: Family<ReasonLabels, Counter>,
    pub bytes: Family<RelayDirectionLabels, Counter>,
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
        let relay = RelayMetrics::default();
        let udp = crate::udp::metrics::UdpMetrics::register(&mut core.registry);
        let r = &mut core.registry;
        r.register(
            "relay_reservations_active",
            "Live relay reservations",
            relay.reservations_active.clone(),
        );
        r.register(
            "relay_reservations_accepted",
            "Relay reservations accepted, by class",
            relay.reservations_accepted.clone(),
        );
        r.register(
            "relay_reservations_renewed",
            "Relay reservations refreshed by their holder",
            relay.reservations_renewed.clone(),
        );
        r.register(
            "relay_reservations_denied",
            "Relay reservations denied, by status",
            relay.reservations_denied.clone(),
        );
        r.register(
            "relay_circuits_active",
            "Open relayed circuits",
            relay.circuits_active.clone(),
        );
        r.register(
            "relay_circuits_opened",
            "Relayed circuits opened, by the destination's class",
            relay.circuits_opened.clone(),
        );
        r.register(
            "relay_circuits_denied",
            "Relayed circuits denied, by status",
            relay.circuits_denied.clone(),
        );
        r.register(
            "relay_circuits_closed",
            "Relayed circuits ended, by reason",
            relay.circuits_closed.clone(),
        );
        r.register(
            "relay_bytes",
            "Bytes relayed through circuits, by direction",
            relay.bytes.clone(),
        );
        let bans_active = Gauge::default();
        let bans_added = Family::<ReasonLabels, Counter>::default();
        core.registry
            .register("bans_active", "Bans in force", bans_active.clone());
        core.registry
            .register("bans_added", "Bans added, by source", bans_added.clone());
        let memory_overloaded = Gauge::default();
        core.registry.register(
            "memory_overloaded",
            "1 while resident memory is over limits.max_memory and new connections, circuits and reservations are refused",
            memory_overloaded.clone(),
        );
        let forwarded = Family::<ReasonLabels, Counter>::default();
        core.registry.register(
            "forwarded_connections",
            "Public connections carried to (out) or from (in) another gateway of the fleet",
            forwarded.clone(),
        );
        let leases_freed = Family::<ReasonLabels, Counter>::default();
        core.registry.register(
            "leases_freed",
            "Leases freed, by reason (expired, revoked, renamed)",
            leases_freed.clone(),
        );
        let bandwidth = BandwidthMetrics::default();
        core.registry.register(
            "bandwidth_throttled_bytes",
            "Bytes a bandwidth cap held back before they went on, by direction",
            bandwidth.throttled_bytes.clone(),
        );
        core.registry.register(
            "bandwidth_held_seconds",
            "Time bytes waited for a bandwidth cap, by direction",
            bandwidth.held_seconds.clone(),
        );
        let reloads = Family::<ReasonLabels, Counter>::default();
        core.registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /v1/reload), by outcome: applied, refused, unreadable",
            reloads.clone(),
        );
        Self {
            core,
            bandwidth,
            reloads,
            tunnels_active,
            relay,
            bans_active,
            bans_added,
            memory_overloaded,
            forwarded,
            leases_freed,
            udp,
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
