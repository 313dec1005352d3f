//! The agent's Prometheus metrics, all prefixed `relaygate_agent_`: the
//! families both binaries share, plus deliveries by mode.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
};
use relaygate_common::metrics::{Core, ReasonLabels};

/// The transport of a connection: `tcp` or `quic`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Transport {
    Tcp,
    Quic,
    Other,
}

impl Transport {
    pub fn of(addr: &libp2p::Multiaddr) -> Self {
        use libp2p::multiaddr::Protocol;
        if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            Transport::Quic
        } else if addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
            Transport::Tcp
        } else {
            Transport::Other
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: Transport,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PunchResult {
    Success,
    Failure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PunchLabels {
    pub transport: Transport,
    pub result: PunchResult,
}

/// Which end of a service stream this agent is.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Role {
    /// Offers the service.
    Offer,
    /// Connects to it (`connect`).
    Visit,
}

/// Whether a stream ran over the relay or a direct (hole-punched) connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Path {
    Relayed,
    Direct,
}

impl Path {
    pub fn of(relayed: bool) -> Self {
        if relayed {
            Path::Relayed
        } else {
            Path::Direct
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceBytesLabels {
    pub role: Role,
    pub path: Path,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceStreamLabels {
    pub role: Role,
    pub path: Path,
    pub result: String,
}

/// Relay reservation, hole punching and services.
pub struct PeerMetrics {
    /// 1 while the reservation on the gateway's relay is active.
    pub reservation_active: Gauge,
    pub reservations: Family<ReasonLabels, Counter>,
    /// Hole punches started: a relayed connection to a peer with no direct one.
    pub holepunch_attempts: Family<TransportLabels, Counter>,
    pub holepunch_results: Family<PunchLabels, Counter>,
    /// Direct dials that failed while a hole punch was under way.
    pub holepunch_dial_failures: Counter,
    /// Seconds from the relayed connection to the first direct one.
    pub holepunch_seconds: Family<TransportLabels, Histogram>,
    pub service_streams: Family<ServiceStreamLabels, Counter>,
    pub service_bytes: Family<ServiceBytesLabels, Counter>,
    /// AutoNAT: 1 public, 0 private, -1 unknown.
    pub reachable: Gauge,
}

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
    pub peers: PeerMetrics,
    /// UDP tunnels' channel and flows.
    pub udp: UdpMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// `relaygate_agent_udp_*`.
#[derive(Default)]
pub struct UdpMetrics {
    pub channels_active: Gauge,
    pub flows_active: Gauge,
    pub flows_opened: Counter,
    pub flows_closed: Family<ReasonLabels, Counter>,
    /// Datagrams carried: `inbound` to the node, `outbound` from it.
    pub datagrams: Family<DirectionLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
}

impl UdpMetrics {
    pub fn drop(&self, reason: &str) {
        self.dropped.get_or_create(&ReasonLabels::new(reason)).inc();
    }
    pub fn closed(&self, reason: &str) {
        self.flows_closed
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
    }
    pub fn carried(&self, direction: &'static str) {
        self.datagrams
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }
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
        let peers = PeerMetrics {
            reservation_active: Gauge::default(),
            reservations: Family::default(),
            holepunch_attempts: Family::default(),
            holepunch_results: Family::default(),
            holepunch_dial_failures: Counter::default(),
            holepunch_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            service_streams: Family::default(),
            service_bytes: Family::default(),
            reachable: Gauge::default(),
        };
        peers.reachable.set(-1);
        let r = &mut core.registry;
        r.register(
            "relay_reservation_active",
            "1 while the reservation on the gateway's relay is active",
            peers.reservation_active.clone(),
        );
        r.register(
            "relay_reservations",
            "Reservation attempts on the gateway's relay, by result",
            peers.reservations.clone(),
        );
        r.register(
            "holepunch_attempts",
            "Hole punches started (relayed connection, no direct one yet), by transport",
            peers.holepunch_attempts.clone(),
        );
        r.register(
            "holepunch_results",
            "Hole punch outcomes by transport and result",
            peers.holepunch_results.clone(),
        );
        r.register(
            "holepunch_dial_failures",
            "Direct dials that failed during a hole punch",
            peers.holepunch_dial_failures.clone(),
        );
        r.register(
            "holepunch_seconds",
            "Time from the relayed connection to the first direct one",
            peers.holepunch_seconds.clone(),
        );
        r.register(
            "service_streams",
            "Service streams by role, path and result",
            peers.service_streams.clone(),
        );
        r.register(
            "service_bytes",
            "Service bytes (both directions) by role and path: relayed or direct",
            peers.service_bytes.clone(),
        );
        r.register(
            "reachable",
            "AutoNAT verdict from the gateway: 1 public, 0 private, -1 unknown",
            peers.reachable.clone(),
        );
        let udp = UdpMetrics::default();
        r.register(
            "udp_channels_active",
            "Datagram channels to gateways up",
            udp.channels_active.clone(),
        );
        r.register(
            "udp_flows_active",
            "UDP flows open to targets",
            udp.flows_active.clone(),
        );
        r.register(
            "udp_flows_opened",
            "UDP flows opened",
            udp.flows_opened.clone(),
        );
        r.register(
            "udp_flows_closed",
            "UDP flows ended, by reason",
            udp.flows_closed.clone(),
        );
        r.register(
            "udp_datagrams",
            "Datagrams carried, inbound (to the node) and outbound",
            udp.datagrams.clone(),
        );
        r.register(
            "udp_dropped",
            "Datagrams dropped, by reason",
            udp.dropped.clone(),
        );
        Self {
            core,
            deliveries,
            peers,
            udp,
        }
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
