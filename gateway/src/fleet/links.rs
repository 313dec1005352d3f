//! Lanes between the gateways of a fleet. A forwarded connection rides a
//! lane to the gateway that holds its agent, as an agent's tunnelled
//! connections do: TLS over TCP with both ends proven by their libp2p
//! identities, each stream with its own flow control, spliced straight from
//! the client's socket. The forwarding gateway dials the other's lane port
//! and opens a stream per connection; the other takes the lane only from a
//! member of the fleet (`lanes.rs`) and serves the streams it opens
//! (`forward.rs`). Where no lane can be had, a libp2p stream carries it.

use std::{collections::HashMap, sync::Arc, time::Duration};

use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::lane::{
    self, Budget, Lane, LaneConfig, LaneError, LaneFlow, LaneLink, LaneSlot, LaneStream, LaneTls,
    Role,
};
use tokio::net::TcpStream;

/// Connect and handshake together; under the forwarder's 5 s to reach a
/// gateway, so a failed dial is remembered and the connection still falls
/// back to a libp2p stream in time.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed dial, forwarded connections to that gateway take libp2p
/// streams this long before its lane is dialled again: a lane port that does
/// not answer (TCP closed between the gateways) costs one dial, not one per
/// connection.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A lane to another gateway: where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneAddr {
    pub host: String,
    pub port: u16,
}

impl LaneAddr {
    /// The host of the first address that names one, with `lane_port`.
    pub fn of(addrs: &[Multiaddr], lane_port: Option<u16>) -> Option<LaneAddr> {
        let port = lane_port?;
        addrs.iter().find_map(|a| {
            let host = match a.iter().next()? {
                Protocol::Ip4(ip) => ip.to_string(),
                Protocol::Ip6(ip) => ip.to_string(),
                Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => h.to_string(),
                _ => return None,
            };
            Some(LaneAddr { host, port })
        })
    }
}

/// One gateway's lane, and the lock its dial is made under.
type Cell = Arc<tokio::sync::Mutex<Link>>;

#[derive(Default)]
struct Link {
    lane: Option<Arc<Lane>>,
    /// No dial before this, after one failed.
    quiet_until: Option<tokio::time::Instant>,
}

/// The lanes this gateway dialled to the others, one per gateway.
pub struct Links {
    tls: LaneTls,
    cfg: LaneConfig,
    /// Receive window bytes the links may commit together.
    budget: Arc<Budget>,
    live: std::sync::Mutex<HashMap<PeerId, Cell>>,
}

impl Links {
    pub fn new(key: &Keypair, (cfg, buffer): (LaneConfig, u64)) -> Result<Self, LaneError> {
        Ok(Self {
            tls: LaneTls::new(key)?,
            cfg: LaneConfig {
                flow: LaneFlow::Tuned,
                // This side opens a stream per forwarded connection.
                opener: Role::Dialer,
                ..cfg
            },
            budget: Budget::new(buffer, None),
            live: Default::default(),
        })
    }

    /// A new stream to `peer` on its lane, dialled first if none is up.
    pub async fn open(&self, peer: PeerId, at: &LaneAddr) -> Result<LaneStream, LaneError> {
        let cell = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .clone();
        let lane = {
            // Connections that arrive during a dial wait for its lane.
            let mut link = cell.lock().await;
            match link.lane.as_ref().filter(|l| !l.is_closed()) {
                Some(l) => l.clone(),
                None => {
                    let now = tokio::time::Instant::now();
                    if link.quiet_until.is_some_and(|t| now < t) {
                        return Err(LaneError::Closed);
                    }
                    let dialled = tokio::time::timeout(DIAL_TIMEOUT, self.dial(peer, at)).await;
                    let l = match dialled.unwrap_or(Err(LaneError::HandshakeTimeout)) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::debug!(gateway = %peer, host = %at.host, port = at.port, error = %e, "no lane to a gateway of the fleet; libp2p streams for a while");
                            link.quiet_until = Some(now + RETRY_AFTER);
                            return Err(e);
                        }
                    };
                    tracing::debug!(gateway = %peer, host = %at.host, port = at.port, "lane to a gateway of the fleet up");
                    link.lane = Some(l.clone());
                    link.quiet_until = None;
                    l
                }
            }
        };
        lane.open().await
    }

    /// Whether a lane to `peer` is up (and not being dialled).
    pub fn is_up(&self, peer: &PeerId) -> bool {
        let cell = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned();
        cell.is_some_and(|c| {
            c.try_lock()
                .is_ok_and(|l| l.lane.as_ref().is_some_and(|l| !l.is_closed()))
        })
    }

    async fn dial(&self, peer: PeerId, at: &LaneAddr) -> Result<Arc<Lane>, LaneError> {
        let tcp = TcpStream::connect((at.host.as_str(), at.port)).await?;
        let rtt = Some(lane::prepare_socket(&tcp)?);
        let (tcp, keys) = self
            .tls
            .connect(tcp, peer, LaneSlot::FIRST, self.cfg.flow)
            .await?;
        let link = LaneLink {
            budget: self.budget.clone(),
            rtt,
        };
        Ok(Lane::start(tcp, keys, self.cfg, link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_goes_to_the_first_host_named() {
        let a: Vec<Multiaddr> = vec![
            "/p2p-circuit".parse().unwrap(),
            "/ip4/203.0.113.7/udp/4001/quic-v1".parse().unwrap(),
            "/dns4/gw.example.com/tcp/4001".parse().unwrap(),
        ];
        assert_eq!(
            LaneAddr::of(&a, Some(4001)),
            Some(LaneAddr {
                host: "203.0.113.7".into(),
                port: 4001
            })
        );
        assert_eq!(LaneAddr::of(&a, None), None);
        assert_eq!(LaneAddr::of(&a[..1], Some(4001)), None);
    }
}
