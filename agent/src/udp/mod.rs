//! UDP tunnels on the agent: the datagram channel to each gateway whose
//! welcome offers one (kept up while its session is, redialled with
//! backoff), and the flows it carries (`flows.rs`), each with its own
//! socket toward the node (`socket.rs`).

mod flows;
pub mod socket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{dgram::endpoint, protocol::Welcome};

use crate::{config::TunnelConfig, metrics::Metrics};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Flows this agent holds at once, over all gateways' channels of one session.
const MAX_FLOWS: usize = 4096;
/// A flow the gateway forgot to close ends after this long idle: over the
/// gateway's default idle timeout (60 s), under conntrack's 120 s for UDP
/// streams (after which the node's replies would lose the mark).
const FLOW_IDLE: Duration = Duration::from_secs(75);

/// What every channel of this agent shares.
pub struct UdpAgent {
    key: Keypair,
    tunnels: Vec<TunnelConfig>,
    mark: u32,
    metrics: Arc<Metrics>,
}

impl UdpAgent {
    /// None when no tunnel carries UDP.
    pub fn new(
        key: &Keypair,
        tunnels: &[TunnelConfig],
        mark: u32,
        metrics: Arc<Metrics>,
    ) -> Option<Arc<Self>> {
        let tunnels: Vec<TunnelConfig> =
            tunnels.iter().filter(|t| t.proto.udp()).cloned().collect();
        (!tunnels.is_empty()).then(|| {
            Arc::new(Self {
                key: key.clone(),
                tunnels,
                mark,
                metrics,
            })
        })
    }

    /// Keeps the channel to `gateway` up while the returned future lives
    /// (the session's life), where its welcome offers one.
    pub async fn keep(&self, gateway: PeerId, dialled: &Multiaddr, welcome: &Welcome) {
        let Some(offer) = welcome.udp else {
            tracing::warn!(%gateway, "the gateway carries no UDP tunnels; UDP tunnels are not reachable through it (upgrade it, or set udp.enabled)");
            return std::future::pending().await;
        };
        let mut retry = RETRY_MIN;
        loop {
            match self.dial(gateway, dialled, offer.port).await {
                Ok(conn) => {
                    retry = RETRY_MIN;
                    tracing::info!(%gateway, address = %conn.remote_address(), "datagram channel up");
                    self.metrics.udp.channels_active.inc();
                    flows::serve(self, &conn).await;
                    self.metrics.udp.channels_active.dec();
                    tracing::warn!(%gateway, reason = %conn.close_reason().map(|r| r.to_string()).unwrap_or_default(), "datagram channel closed; redialling");
                }
                Err(e) => tracing::warn!(
                    %gateway, port = offer.port, error = %e,
                    "cannot open the datagram channel (is the gateway's UDP port {} reachable?); UDP tunnels wait", offer.port
                ),
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    async fn dial(
        &self,
        gateway: PeerId,
        dialled: &Multiaddr,
        port: u16,
    ) -> anyhow::Result<quinn::Connection> {
        let addr = channel_address(dialled, port)
            .await
            .ok_or_else(|| anyhow::anyhow!("no host in the session's address {dialled}"))?;
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // An endpoint per channel: its socket lives and dies with it.
        let mut ep = endpoint::endpoint(any, None)?;
        ep.set_default_client_config(endpoint::client_config(&self.key, gateway)?);
        let conn = tokio::time::timeout(DIAL_TIMEOUT, ep.connect(addr, endpoint::SERVER_NAME)?)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {DIAL_TIMEOUT:?}"))??;
        Ok(conn)
    }
}

/// The gateway's channel address: the session's host, the offered port.
async fn channel_address(dialled: &Multiaddr, port: u16) -> Option<SocketAddr> {
    match dialled.iter().next()? {
        Protocol::Ip4(ip) => Some(SocketAddr::new(ip.into(), port)),
        Protocol::Ip6(ip) => Some(SocketAddr::new(ip.into(), port)),
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => {
            tokio::net::lookup_host((h.as_ref(), port))
                .await
                .ok()?
                .next()
        }
        _ => None,
    }
}
