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
pub struct PathLabels {
    pub path: &'static str,
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

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// `refusals_total` and `bad_input_total`, reason by reason.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ByReason {
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub bad_input: std::collections::BTreeMap<String, u64>,
}

/// The families both binaries export, under their own prefix
/// (`relaygate_gateway_`, `relaygate_agent_`), so a dashboard asks both the same way.
pub struct Core {
    pub registry: Registry,
    /// Open connections by side.
    pub connections_active: Family<SideLabels, Gauge>,
    pub connections_opened: Family<SideLabels, Counter>,
    /// Agent sessions (gateway: admitted now; agent: 1 while up).
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    /// Lanes up (gateway: all agents' lanes; agent: its lanes to the gateway).
    pub lanes_active: Gauge,
    /// Receive window bytes committed by lane streams (what their peers may
    /// make this process buffer), all agents together.
    pub lane_window_bytes: Gauge,
    /// Tunnelled connections by the path they took: `lane` or `session`.
    pub tunnel_paths: Family<PathLabels, Counter>,
    /// Leases held (gateway: in the store; agent: tunnels holding one).
    pub leases: Gauge,
    pub tunnel_connections: Family<TunnelLabels, Counter>,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    /// Everything refused, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Failed dials and stream opens, by reason.
    pub dial_failures: Family<ReasonLabels, Counter>,
    /// Malformed network input, by kind.
    pub bad_input: Family<ReasonLabels, Counter>,
    /// `refusals` and `bad_input` alone, for the console's tables.
    reasons: Registry,
}

impl Core {
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let c = Self {
            registry: Registry::default(),
            connections_active: Family::default(),
            connections_opened: Family::default(),
            sessions_active: Gauge::default(),
            sessions_opened: Counter::default(),
            lanes_active: Gauge::default(),
            lane_window_bytes: Gauge::default(),
            tunnel_paths: Family::default(),
            leases: Gauge::default(),
            tunnel_connections: Family::default(),
            tunnel_bytes: Family::default(),
            refusals: Family::default(),
            dial_failures: Family::default(),
            bad_input: Family::default(),
            reasons: Registry::default(),
        };
        registry.register(
            "connections_active",
            "Open connections by side",
            c.connections_active.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections opened by side",
            c.connections_opened.clone(),
        );
        registry.register(
            "sessions_active",
            "Agent sessions up",
            c.sessions_active.clone(),
        );
        registry.register(
            "sessions_opened",
            "Agent sessions established",
            c.sessions_opened.clone(),
        );
        registry.register("lanes_active", "Lanes up", c.lanes_active.clone());
        registry.register(
            "lane_window_bytes",
            "Receive window bytes committed by lane streams",
            c.lane_window_bytes.clone(),
        );
        registry.register(
            "tunnel_paths",
            "Tunnelled connections by path (lane or session)",
            c.tunnel_paths.clone(),
        );
        registry.register("leases", "Leases held", c.leases.clone());
        registry.register(
            "tunnel_connections",
            "Tunnelled connections per tunnel",
            c.tunnel_connections.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes per tunnel and direction",
            c.tunnel_bytes.clone(),
        );
        registry.register("refusals", "Refusals by reason", c.refusals.clone());
        registry.register(
            "dial_failures",
            "Failed dials and stream opens by reason",
            c.dial_failures.clone(),
        );
        registry.register(
            "bad_input",
            "Malformed network input by kind",
            c.bad_input.clone(),
        );
        let mut reasons = Registry::default();
        reasons.register("refusals", "", c.refusals.clone());
        reasons.register("bad_input", "", c.bad_input.clone());
        Self {
            registry,
            reasons,
            ..c
        }
    }

    /// Refusals and bad input by reason, as the console shows them.
    pub fn by_reason(&self) -> ByReason {
        let mut text = String::new();
        let mut out = ByReason::default();
        if prometheus_client::encoding::text::encode(&mut text, &self.reasons).is_err() {
            return out;
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // `refusals_total{reason="banned"} 3`
            let Some((name, rest)) = line.split_once("{reason=\"") else {
                continue;
            };
            let Some((reason, value)) = rest.split_once("\"} ") else {
                continue;
            };
            // Families made ahead of use (a counter found once) show 0: not a refusal.
            let Ok(n @ 1..) = value.trim().parse::<u64>() else {
                continue;
            };
            let map = match name {
                "refusals_total" => &mut out.refusals,
                "bad_input_total" => &mut out.bad_input,
                _ => continue,
            };
            map.insert(reason.to_string(), n);
        }
        out
    }

    pub fn tunnel_path(&self, path: crate::transport::DataPath) {
        self.tunnel_path_named(path.as_str());
    }

    /// `lane`, `session`, or `session_lane` (a lane on one session stream).
    pub fn tunnel_path_named(&self, path: &'static str) {
        self.tunnel_paths.get_or_create(&PathLabels { path }).inc();
    }

    pub fn refuse(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
    }

    pub fn bad_input(&self, kind: &str) {
        self.bad_input.get_or_create(&ReasonLabels::new(kind)).inc();
    }

    pub fn dial_failed(&self, reason: &str) {
        self.dial_failures
            .get_or_create(&ReasonLabels::new(reason))
            .inc();
    }

    /// The three counters of one tunnel: connections, bytes inbound, bytes outbound.
    pub fn tunnel(&self, agent: &str, tunnel: &str) -> (Counter, Counter, Counter) {
        let bytes = |direction| {
            self.tunnel_bytes
                .get_or_create(&TunnelBytesLabels {
                    agent: agent.into(),
                    tunnel: tunnel.into(),
                    direction,
                })
                .clone()
        };
        let opened = self
            .tunnel_connections
            .get_or_create(&TunnelLabels {
                agent: agent.into(),
                tunnel: tunnel.into(),
            })
            .clone();
        (
            opened,
            bytes(Direction::Inbound),
            bytes(Direction::Outbound),
        )
    }
}

/// Counts one in a gauge while it lives: the count falls however its owner
/// ends, also when a task holding it is dropped mid-await.
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod reason_tests {
    #[test]
    fn refusals_and_bad_input_are_listed_by_reason() {
        let c = super::Core::new("x");
        c.refuse("banned");
        c.refuse("banned");
        let _ = c.refusals.get_or_create(&super::ReasonLabels::new("never"));
        c.bad_input("hello_timeout");
        let r = c.by_reason();
        assert_eq!(r.refusals.get("banned"), Some(&2));
        assert_eq!(r.bad_input.get("hello_timeout"), Some(&1));
        assert_eq!(r.refusals.len(), 1);
    }
}
