//! The agent's lanes: TLS connections to the gateway beside the session that
//! carry tunnelled connections (see `relaygate_common::lane`). Kept up for as
//! long as the session is, each in its own slot and redialled on its own;
//! while none is up the gateway uses the session.

use std::{sync::Arc, time::Duration};

use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    lane::{
        self, Budget, Lane, LaneConfig, LaneCount, LaneError, LaneFlow, LaneKeys, LaneLink,
        LaneSlot, LaneTls, Role,
    },
    metrics::Held,
    protocol::{Welcome, LANE_SECRET_LEN},
};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken, task::TaskTracker};

use crate::{metrics::Metrics, tunnel::Tunnels};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct LaneDialer {
    tls: LaneTls,
    gateway: PeerId,
    /// Lanes wanted (`session.lanes`); fewer if the gateway takes fewer.
    lanes: LaneCount,
    cfg: LaneConfig,
    /// What all lanes' streams may make this agent buffer (`session.lane_buffer`).
    budget: Arc<Budget>,
    tunnels: Arc<Tunnels>,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
    /// Set when the agent stops: new streams are refused while open ones drain.
    draining: CancellationToken,
}

impl LaneDialer {
    pub fn new(
        key: &Keypair,
        gateway: PeerId,
        lanes: LaneCount,
        (cfg, buffer): (LaneConfig, u64),
        tunnels: Arc<Tunnels>,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LaneError> {
        Ok(Self {
            tls: LaneTls::new(key)?,
            gateway,
            lanes,
            cfg,
            budget: Budget::new(buffer, Some(metrics.lane_window_bytes.clone())),
            tunnels,
            tracker,
            metrics,
            draining: CancellationToken::new(),
        })
    }

    /// The same lanes' settings, budget and drain, toward another gateway
    /// of the fleet: what this agent buffers is bounded once, not per gateway.
    pub fn for_gateway(&self, gateway: PeerId) -> Arc<Self> {
        Arc::new(Self {
            gateway,
            ..self.clone()
        })
    }

    /// From now on streams the gateway opens are reset at once (it sends the
    /// public connection's client a reset, and the next one may find another
    /// gateway or a restarted agent); those already open go on.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Keeps the lanes up while the returned future lives (the session's
    /// life), as the gateway's welcome offers them: its lane port, how many
    /// it takes from one agent (an older gateway names none and takes one)
    /// and the flow control it speaks.
    pub async fn keep(&self, dialled: &Multiaddr, welcome: &Welcome) {
        let Some((host, port)) = lane_address(dialled, welcome.lane_port) else {
            tracing::info!(gateway = %dialled, "the gateway offers no lane; tunnels use the session");
            return std::future::pending().await;
        };
        let taken = welcome.lanes.map_or(LaneCount::ONE, LaneCount::clamped);
        let flow = LaneFlow::from_version(welcome.lane_flow);
        let lanes = self.lanes.min(taken);
        if lanes != self.lanes {
            tracing::info!(wanted = %self.lanes, taken = %lanes, "the gateway takes fewer lanes per agent");
        }
        futures::future::join_all(
            lanes
                .slots()
                .map(|slot| self.keep_slot(slot, flow, &host, port)),
        )
        .await;
    }

    async fn keep_slot(&self, slot: LaneSlot, flow: LaneFlow, host: &str, port: u16) {
        let mut retry = RETRY_MIN;
        loop {
            match self.dial(slot, flow, host, port).await {
                Ok(lane) => {
                    retry = RETRY_MIN;
                    tracing::info!(gateway = %self.gateway, address = %format!("{host}:{port}"), %slot, "lane up");
                    // Counted while up, also when the session's end drops this mid-lane.
                    let up = Held::new(&self.metrics.lanes_active);
                    self.serve(&lane, "lane").await;
                    drop(up);
                    tracing::warn!(gateway = %self.gateway, %slot, "lane closed; redialling (tunnels use the other lanes, or the session)");
                }
                Err(e) => {
                    self.metrics.dial_failed(e.kind());
                    tracing::warn!(
                        gateway = %self.gateway, address = %format!("{host}:{port}"), %slot, error = %e,
                        "cannot open the lane (is the gateway's TCP port reachable?); tunnels use the other lanes, or the session"
                    );
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Serves the streams the gateway opens on `lane` until it closes.
    async fn serve(&self, lane: &Lane, path: &'static str) {
        while let Some(stream) = lane.accept().await {
            if self.draining.is_cancelled() {
                self.metrics.refuse("draining");
                continue;
            }
            self.tracker
                .spawn(self.tunnels.clone().handle_lane(stream, path));
        }
    }

    /// A lane on a session stream the gateway opened (it does when this agent
    /// has no lane of its own up): its secret first, then the lane's records.
    pub async fn serve_session(&self, stream: libp2p::Stream) {
        let mut stream = stream.compat();
        let mut secret = [0u8; LANE_SECRET_LEN];
        let read = tokio::time::timeout(DIAL_TIMEOUT, stream.read_exact(&mut secret)).await;
        if !matches!(read, Ok(Ok(_))) {
            self.metrics.bad_input("session_lane");
            return;
        }
        let link = LaneLink {
            budget: self.budget.clone(),
            rtt: None,
        };
        let cfg = LaneConfig {
            flow: LaneFlow::Tuned,
            ..self.cfg
        };
        let lane = Lane::start(
            stream,
            LaneKeys::from_secret(&secret, Role::Dialer),
            cfg,
            link,
        );
        tracing::info!(gateway = %self.gateway, "session lane up (no lane of our own is up)");
        let up = Held::new(&self.metrics.lanes_active);
        self.serve(&lane, "session_lane").await;
        drop(up);
        tracing::info!(gateway = %self.gateway, "session lane closed");
    }

    async fn dial(
        &self,
        slot: LaneSlot,
        flow: LaneFlow,
        host: &str,
        port: u16,
    ) -> Result<Arc<Lane>, LaneError> {
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| LaneError::HandshakeTimeout)??;
        // The lane owns the socket from here on; the probe runs inside it.
        let rtt = Some(lane::prepare_socket(&tcp)?);
        // No buffer under the lane: it writes its records gathered, in one call.
        let (tcp, keys) = self.tls.connect(tcp, self.gateway, slot, flow).await?;
        let link = LaneLink {
            budget: self.budget.clone(),
            rtt,
        };
        Ok(Lane::start(
            tcp,
            keys,
            LaneConfig { flow, ..self.cfg },
            link,
        ))
    }
}

/// Host and TCP port of the lane: the address the session dialled when it is
/// TCP, else its host with the port the gateway named. None when the gateway
/// named none: it takes no lanes.
fn lane_address(dialled: &Multiaddr, lane_port: Option<u16>) -> Option<(String, u16)> {
    lane_port?;
    let mut host = None;
    let mut port = None;
    for p in dialled.iter() {
        match p {
            Protocol::Ip4(a) => host = Some(a.to_string()),
            Protocol::Ip6(a) => host = Some(a.to_string()),
            Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => host = Some(h.to_string()),
            Protocol::Tcp(p) => port = Some(p),
            Protocol::Udp(_) => port = lane_port,
            Protocol::P2pCircuit => return None,
            _ => {}
        }
    }
    Some((host?, port?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_goes_where_the_session_went() {
        let tcp: Multiaddr =
            "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap();
        assert_eq!(
            lane_address(&tcp, Some(9)),
            Some(("203.0.113.7".into(), 4001))
        );
        assert_eq!(lane_address(&tcp, None), None, "the gateway takes no lanes");
        let quic: Multiaddr = "/dns4/gw.example.com/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(
            lane_address(&quic, Some(4002)),
            Some(("gw.example.com".into(), 4002))
        );
        assert_eq!(lane_address(&quic, None), None);
        let v6: Multiaddr = "/ip6/::1/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(lane_address(&v6, Some(4001)), Some(("::1".into(), 4001)));
    }
}
