//! The libp2p swarm both ends build: TCP (Noise + yamux) and QUIC-v1, DNS
//! resolution for `/dns*` addresses, and the session tuning that makes a dead
//! peer visible within seconds.

use std::time::Duration;

use libp2p::{
    core::{upgrade::Version, Transport},
    identity::Keypair,
    noise,
    swarm::NetworkBehaviour,
    tcp, yamux, Swarm, SwarmBuilder,
};

use crate::{
    lane::LaneCount,
    proxy_transport::{ProxyAcceptor, ProxyTcp},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("cannot build the libp2p transport: {0}")]
pub struct BuildError(String);

/// How the encrypted session between agent and gateway is kept alive.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionTuning {
    /// Interval of keep-alive probes (QUIC keep-alive, libp2p ping).
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// A session silent for this long is dead.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Concurrent streams per session (one per tunnelled connection); TCP
    /// sessions are capped at 4096 by yamux, QUIC sessions take the full number.
    pub max_streams: usize,
    /// Streams a peer may open towards this process at once over QUIC.
    /// quinn keeps state for every stream slot it allows (about 100 bytes
    /// from the start, about 1 KiB once a slot has carried a stream), so a
    /// gateway, whose peers open only control, relay and keep-alive streams,
    /// allows few; an agent accepts one stream per tunnelled connection.
    pub max_inbound_streams: usize,
    /// Inbound streams per connection still negotiating their protocol;
    /// beyond it new ones are dropped.
    pub max_negotiating_streams: usize,
    /// Bytes a peer may send on one QUIC stream before it is read: what one
    /// stream can make this process buffer (yamux: a fixed 256 KiB).
    pub stream_window: u32,
    /// The same for a whole QUIC connection, all its streams together.
    pub connection_window: u32,
    /// Where tunnelled connections travel: over the lane (a TLS connection
    /// beside the session, see [`crate::lane`]) or as streams of the session.
    pub data_path: DataPath,
    /// Lanes per agent. An agent keeps this many (or fewer, if its gateway
    /// takes fewer); a gateway takes at most this many from one agent. More
    /// than one lets the sealing and opening of many busy connections run on
    /// more than one core.
    pub lanes: LaneCount,
    /// The largest receive window one lane stream grows to: what one
    /// connection can have in flight, so it bounds a stream's speed at a
    /// round-trip time (64 MiB: about 2 Gbit/s at 150 ms, 5 at 50 ms, once
    /// the path's queues are counted).
    pub lane_max_window: u32,
    /// Receive window bytes all lane streams of one agent may commit
    /// together: what its peers can make this process buffer for it. Past
    /// it windows stop growing and new streams start small (16 KiB).
    pub lane_buffer: u64,
}

/// Where tunnelled connections travel between gateway and agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// A TLS 1.3 connection per agent beside the session, authenticated with
    /// the same identities; the session carries them while no lane is up.
    #[default]
    Lane,
    /// Streams of the libp2p session (QUIC, or Noise + yamux over TCP).
    Session,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Lane => "lane",
            DataPath::Session => "session",
        }
    }
}

impl SessionTuning {
    /// The lane's tuning and the budget of one agent's lanes.
    pub fn lane(&self) -> (crate::lane::LaneConfig, u64) {
        let cfg = crate::lane::LaneConfig {
            max_window: self.lane_max_window.max(crate::lane::MIN_WINDOW),
            ..crate::lane::LaneConfig::default()
        };
        (cfg, self.lane_buffer)
    }

    /// A gateway's defaults: agents and relay users open few streams to it.
    pub fn gateway() -> Self {
        Self {
            max_inbound_streams: 256,
            lanes: GATEWAY_LANES,
            ..Self::default()
        }
    }
}

impl Default for SessionTuning {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_streams: 16_384,
            max_inbound_streams: 4096,
            max_negotiating_streams: 64,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            data_path: DataPath::Lane,
            lanes: AGENT_LANES,
            lane_max_window: crate::lane::MAX_WINDOW,
            lane_buffer: 128 << 20,
        }
    }
}

/// An agent's lanes by default: four, so a busy agent's traffic is sealed
/// and opened on more than one core of its gateway and its own host, and a
/// lost packet on a long path slows the quarter of its connections that
/// share that lane's TCP connection, not all of them (measured at 50 ms RTT
/// and 1% loss: 8 streams 2.7 Gbit/s on 2 lanes, 4.8 on 4, 4.9 on 8,
/// 5.0-5.4 over 8 direct TCP connections).
const AGENT_LANES: LaneCount = match LaneCount::new(4) {
    Some(c) => c,
    None => panic!("4 lanes are allowed"),
};
/// What a gateway takes from one agent by default: all an agent may ask for.
const GATEWAY_LANES: LaneCount = match LaneCount::new(8) {
    Some(c) => c,
    None => panic!("8 lanes are allowed"),
};

/// yamux requires 256 KiB of receive window per stream within its fixed 1 GiB
/// connection window, so TCP sessions carry at most this many streams.
pub const YAMUX_MAX_STREAMS: usize = 4096;

/// The agent's swarm: TCP and QUIC as in [`build_swarm`] (no PROXY), plus the
/// circuit relay v2 client transport, so it can reserve on the gateway and dial
/// `/p2p-circuit` addresses.
pub fn build_relay_client_swarm<B: NetworkBehaviour>(
    key: Keypair,
    tuning: &SessionTuning,
    make: impl FnOnce(&Keypair, libp2p::relay::client::Behaviour) -> B,
) -> Result<Swarm<B>, BuildError> {
    let yamux_streams = tuning.max_streams.min(YAMUX_MAX_STREAMS);
    let yamux_cfg = move || {
        let mut c = yamux::Config::default();
        c.set_max_num_streams(yamux_streams);
        c
    };
    let quic = quic_tuning(tuning);
    let err = |e: &dyn std::fmt::Display| BuildError(e.to_string());
    Ok(SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux_cfg,
        )
        .map_err(|e| err(&e))?
        .with_quic_config(quic)
        .with_dns()
        .map_err(|e| err(&e))?
        .with_relay_client(noise::Config::new, yamux_cfg)
        .map_err(|e| err(&e))?
        .with_behaviour(make)
        .map_err(|e| err(&e))?
        .with_swarm_config(swarm_config(tuning))
        .build())
}

fn quic_tuning(
    tuning: &SessionTuning,
) -> impl FnOnce(libp2p::quic::Config) -> libp2p::quic::Config {
    let keepalive = tuning.keepalive;
    let timeout_ms = u32::try_from(tuning.timeout.as_millis()).unwrap_or(u32::MAX);
    let streams = u32::try_from(tuning.max_inbound_streams).unwrap_or(u32::MAX);
    let (stream_window, connection_window) = (tuning.stream_window, tuning.connection_window);
    move |mut c: libp2p::quic::Config| {
        c.keep_alive_interval = keepalive;
        c.max_idle_timeout = timeout_ms;
        c.max_concurrent_stream_limit = streams;
        c.max_stream_data = stream_window;
        c.max_connection_data = connection_window.max(stream_window);
        c
    }
}

/// Sessions stay up through their control stream; the idle timeout only
/// reaps strays. Streams still negotiating are capped per connection.
fn swarm_config(
    tuning: &SessionTuning,
) -> impl FnOnce(libp2p::swarm::Config) -> libp2p::swarm::Config {
    let negotiating = tuning.max_negotiating_streams.max(1);
    move |c| {
        c.with_idle_connection_timeout(Duration::from_secs(30))
            .with_max_negotiating_inbound_streams(negotiating)
    }
}

pub fn build_swarm<B: NetworkBehaviour>(
    key: Keypair,
    tuning: &SessionTuning,
    proxy: Option<ProxyAcceptor>,
    make: impl FnOnce(&Keypair) -> B,
) -> Result<Swarm<B>, BuildError> {
    let max_streams = tuning.max_streams;
    let yamux_streams = max_streams.min(YAMUX_MAX_STREAMS);
    let yamux_cfg = move || {
        let mut c = yamux::Config::default();
        c.set_max_num_streams(yamux_streams);
        c
    };
    let quic = quic_tuning(tuning);
    let err = |e: &dyn std::fmt::Display| BuildError(e.to_string());
    let idle = swarm_config(tuning);
    let tcp_cfg = tcp::Config::default().nodelay(true);
    let builder = SwarmBuilder::with_existing_identity(key).with_tokio();
    let swarm = match proxy {
        None => builder
            .with_tcp(tcp_cfg, noise::Config::new, yamux_cfg)
            .map_err(|e| err(&e))?
            .with_quic_config(quic)
            .with_dns()
            .map_err(|e| err(&e))?
            .with_behaviour(make)
            .map_err(|e| err(&e))?
            .with_swarm_config(idle)
            .build(),
        Some(acceptor) => builder
            .with_quic_config(quic)
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                Ok(ProxyTcp::new(tcp_cfg, acceptor)
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux_cfg()))
            })
            .map_err(|e| err(&e))?
            .with_dns()
            .map_err(|e| err(&e))?
            .with_behaviour(make)
            .map_err(|e| err(&e))?
            .with_swarm_config(idle)
            .build(),
    };
    Ok(swarm)
}

/// Ping settings matching `tuning`: a failed ping closes the connection, which is
/// how a TCP session notices a dead peer as fast as QUIC's idle timeout.
pub fn ping_config(tuning: &SessionTuning) -> libp2p::ping::Config {
    libp2p::ping::Config::new()
        .with_interval(tuning.keepalive)
        .with_timeout(tuning.timeout)
}
