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

use crate::proxy_transport::{ProxyAcceptor, ProxyTcp};
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
}

impl Default for SessionTuning {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_streams: 16_384,
        }
    }
}

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
        .with_swarm_config(idle_timeout)
        .build())
}

fn quic_tuning(
    tuning: &SessionTuning,
) -> impl FnOnce(libp2p::quic::Config) -> libp2p::quic::Config {
    let keepalive = tuning.keepalive;
    let timeout_ms = u32::try_from(tuning.timeout.as_millis()).unwrap_or(u32::MAX);
    let streams = u32::try_from(tuning.max_streams).unwrap_or(u32::MAX);
    move |mut c: libp2p::quic::Config| {
        c.keep_alive_interval = keepalive;
        c.max_idle_timeout = timeout_ms;
        c.max_concurrent_stream_limit = streams;
        c
    }
}

/// Sessions stay up through their control stream; the idle timeout only reaps strays.
fn idle_timeout(c: libp2p::swarm::Config) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(Duration::from_secs(30))
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
    let idle = idle_timeout;
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
