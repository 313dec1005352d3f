//! What every public port shares: the agents' lanes and sessions, the
//! guard and per-source shares, the live-connection table and bandwidth
//! caps, and the settings a configuration reload may change.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    caps::Caps,
    config::ProxyPolicy,
    conns::{LiveConns, NewConn, Tracked},
    guard::Guard,
    lanes::Lanes,
    listener::Origin,
    metrics::Metrics,
    registry::TunnelStats,
    session_lane::SessionLanes,
    shares::Shares,
    stall::StallLedger,
};

/// Shared by every public port.
pub struct DataPlane {
    pub control: relaygate_common::streams::Control,
    /// Agents' lanes, preferred over session streams.
    pub lanes: Arc<Lanes>,
    /// Lanes on a session stream, for agents with no lane up; none when
    /// `session.data_path = "session"`.
    pub session_lanes: Option<Arc<SessionLanes>>,
    pub metrics: Arc<Metrics>,
    /// Tracks every public connection, so shutdown can drain them.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: stop accepting on every port.
    pub stop_accepting: CancellationToken,
    /// PROXY policy, connection cap per port and idle timeout: what a
    /// configuration reload may change.
    pub settings: ArcSwap<PlaneSettings>,
    /// Bans and per-IP rates, checked against the real source.
    pub guard: Arc<Guard>,
    /// What one source may hold of the leased ports' connections.
    pub sources: Shares,
    /// Session streams whose public client stopped reading hold the agent's
    /// QUIC connection window: only a share of them may at once.
    pub stalls: Arc<StallLedger>,
    /// `refusals_total{reason="stalled_reader"}`, found once.
    pub stalled_readers: Counter,
    /// The connections open now, for the console.
    pub live: Arc<LiveConns>,
    /// Bandwidth caps the copy loops wait on.
    pub caps: Arc<Caps>,
}

/// The data plane's reloadable settings.
pub struct PlaneSettings {
    /// Which peers may send PROXY headers.
    pub proxy: ProxyPolicy,
    /// Open connections allowed on one leased port.
    pub max_per_tunnel: usize,
    /// A public connection moving no byte for this long is closed (zero: never).
    pub idle_timeout: Duration,
}

impl DataPlane {
    pub fn idle_timeout(&self) -> Duration {
        self.settings.load().idle_timeout
    }

    /// Enters a public connection of `agent`'s tunnel in the live table,
    /// with the pacers of its caps.
    pub(crate) fn track(&self, agent: PeerId, stats: &TunnelStats, origin: &Origin) -> Tracked {
        self.live.open(
            &self.caps,
            NewConn {
                agent,
                tunnel: stats.name.clone(),
                port: stats.port.get(),
                source: origin.source,
                peer: origin.peer,
            },
        )
    }
}
