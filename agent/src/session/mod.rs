//! A session with one gateway: dial (QUIC first, TCP fallback), say hello,
//! take the leases, publish the advertised addresses, pass on what the
//! gateway says of its fleet, and reconnect with capped exponential backoff
//! and jitter whenever the session drops. [`crate::fleet`] keeps one per
//! gateway the agent holds.

use std::{sync::Arc, time::Duration};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use rand::Rng;
use relaygate_common::{
    names::Secret,
    protocol::{
        read_control, write_control, ControlMessage, Hello, LeaseGrant, RefusalCode, TunnelRequest,
        WireError, CONTROL_PROTOCOL, WIRE_VERSION,
    },
};
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken};

use crate::{
    config::{AgentConfig, TunnelConfig},
    host::HostHandle,
    lane::LaneDialer,
    metrics::Metrics,
    state::{AgentState, TunnelStatus},
};

/// A session that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel refused for a passing reason is asked for again after this
/// long, then twice as long each time, up to `LEASE_RETRY_MAX`.
const LEASE_RETRY_FIRST: Duration = Duration::from_secs(2);
const LEASE_RETRY_MAX: Duration = Duration::from_secs(30);
use crate::claims::Nodes;

mod grants;
pub use grants::publish;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach the gateway at any address: {0}")]
    Unreachable(String),
    #[error("gateway refused this agent ({code}): {message}")]
    Refused { code: &'static str, message: String },
    #[error("session protocol: {0}")]
    Wire(#[from] WireError),
    #[error("cannot open the control stream: {0}")]
    Stream(String),
    #[error("gateway did not answer hello in time")]
    Timeout,
}

/// What a session learnt of the fleet: the gateways `from` names.
pub struct FleetNews {
    pub from: PeerId,
    pub gateways: Vec<relaygate_common::protocol::FleetGateway>,
}

pub struct Session {
    pub host: HostHandle,
    pub gateway: PeerId,
    pub addresses: Vec<Multiaddr>,
    pub token: Option<Secret>,
    pub tunnels: Vec<TunnelConfig>,
    pub state: Arc<AgentState>,
    pub metrics: Arc<Metrics>,
    pub cfg: AgentConfig,
    /// Keeps the lane up while a session is (`session.data_path = "lane"`).
    pub lane: Option<Arc<LaneDialer>>,
    /// Keeps the datagram channel up while a session is (UDP tunnels).
    pub udp: Option<Arc<crate::udp::UdpAgent>>,
    /// Where the fleet's gateways, as this one names them, go.
    pub news: Option<tokio::sync::mpsc::UnboundedSender<FleetNews>>,
}

impl Session {
    /// A session with `gateway`, dialled at `addresses` (each ending in its
    /// `/p2p/`).
    pub fn new(
        cfg: &AgentConfig,
        gateway: PeerId,
        mut addresses: Vec<Multiaddr>,
        host: HostHandle,
        token: Option<Secret>,
        state: Arc<AgentState>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // QUIC first: it survives NAT rebinding and has no head-of-line blocking.
        addresses.sort_by_key(|a| !a.iter().any(|p| matches!(p, Protocol::QuicV1)));
        Self {
            host,
            gateway,
            addresses,
            token,
            tunnels: cfg.tunnels.clone(),
            state,
            metrics,
            cfg: cfg.clone(),
            lane: None,
            udp: None,
            news: None,
        }
    }

    /// Keeps a session up until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = self.cfg.reconnect.initial;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.once() => r,
                _ = stop.cancelled() => return,
            };
            self.state.session_down(&self.gateway);
            publish(&self.state, &self.tunnels, &self.metrics);
            // No stale connection outlives its session: the next one starts clean
            // (and the relay reservation follows the new connection).
            self.host.disconnect(self.gateway).await;
            match result {
                Ok(reason) => {
                    tracing::warn!(gateway = %self.gateway, %reason, "session ended; reconnecting")
                }
                Err(e @ SessionError::Refused { .. }) => tracing::error!(
                    gateway = %self.gateway, error = %e,
                    "fix: ask the gateway operator for its join token (relaygate-gateway token) and pass it with --token, or have them add this agent's peer id ({}) to admission.allow",
                    self.host.peer_id
                ),
                Err(e) => {
                    tracing::warn!(gateway = %self.gateway, error = %e, "session failed; retrying")
                }
            }
            if started.elapsed() >= STABLE {
                backoff = self.cfg.reconnect.initial;
            }
            // Full jitter in [backoff/2, backoff] spreads reconnecting agents apart.
            let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            tracing::info!(delay = ?jittered, "reconnecting after delay");
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(self.cfg.reconnect.max);
        }
    }

    /// One session, from dial to its end. `Ok` carries why it ended.
    async fn once(&self) -> Result<String, SessionError> {
        let dialled = self.dial().await?;
        let stream = tokio::time::timeout(
            WELCOME_TIMEOUT,
            self.host
                .control
                .open_stream(self.gateway, CONTROL_PROTOCOL),
        )
        .await
        .map_err(|_| SessionError::Timeout)?
        .map_err(|e| SessionError::Stream(e.to_string()))?;
        let mut ctl = stream.compat();
        let hello = Hello {
            version: WIRE_VERSION,
            token: self.token.as_ref().map(|t| t.expose().to_owned()),
            tunnels: self
                .tunnels
                .iter()
                .map(|t| TunnelRequest {
                    name: t.name.clone(),
                    port: t.port,
                    proto: t.proto,
                })
                .collect(),
            fleet: true,
            lease_lifecycle: true,
            paused: self.paused(),
        };
        write_control(&mut ctl, &ControlMessage::Hello(hello)).await?;
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, read_control(&mut ctl)).await {
            Err(_) => return Err(SessionError::Timeout),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(ControlMessage::Welcome(w))) => w,
            Ok(Ok(ControlMessage::Refused(r))) => {
                self.metrics.refuse(r.code.as_str());
                if r.code == RefusalCode::NotAdmitted {
                    self.host.disconnect(self.gateway).await;
                }
                return Err(SessionError::Refused {
                    code: r.code.as_str(),
                    message: r.message,
                });
            }
            Ok(Ok(other)) => {
                self.metrics.bad_input("unexpected_message");
                return Err(
                    WireError::Malformed(format!("expected welcome, got {other:?}")).into(),
                );
            }
        };
        self.state.session_up(self.gateway, &dialled);
        self.metrics.sessions_opened.inc();
        let _up = relaygate_common::metrics::Held::new(&self.metrics.sessions_active);
        self.tell(welcome.fleet.clone());
        let mut nodes = self.probe_nodes(&Nodes::new()).await;
        self.apply_grants(&welcome, &welcome.leases, &dialled, &nodes, false);
        self.claim_nodes(&mut ctl, &welcome, &welcome.leases, &nodes)
            .await?;
        // What every gateway answer leased so far, for claims made again.
        let mut leased: Vec<LeaseGrant> = welcome.leases.clone();
        // Tunnels whose node this gateway took; the others are claimed again
        // at each recheck (a check that failed for a passing reason, a node
        // an operator let go).
        let mut accepted: std::collections::HashSet<relaygate_common::names::TunnelName> =
            Default::default();
        let probing = self.tunnels.iter().any(|t| t.node_peer_id.is_some());
        let period = self.cfg.node_recheck.max(Duration::from_secs(1));
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // Cancel safe: a timer firing never costs a frame half read.
        let mut reader = relaygate_common::protocol::ControlReader::default();
        if self.cfg.relay.enabled {
            // Every session reserves afresh: a reservation dies with its connection.
            let relay = dialled.clone().with_p2p(self.gateway).unwrap_or_else(|a| a);
            self.host.reserve(relay).await;
        }

        // The control stream's end is the session's end, and so is a failed
        // keep-alive (whose close may hang). Tunnels refused for a passing
        // reason are asked for again, with backoff, where the gateway allows.
        let lost = self.host.gateway_lost(self.gateway);
        let lane = async {
            match &self.lane {
                Some(l) => l.keep(&dialled, &welcome).await,
                None => std::future::pending().await,
            }
        };
        let udp = async {
            match &self.udp {
                Some(u) => u.keep(self.gateway, &dialled, &welcome).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost, lane, udp);
        let mut retry = if welcome.lease_retry {
            self.to_retry(&welcome.leases)
        } else {
            Vec::new()
        };
        let mut backoff = LEASE_RETRY_FIRST;
        let mut next = (!retry.is_empty()).then(|| tokio::time::Instant::now() + backoff);
        loop {
            let due = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                r = reader.next(&mut ctl) => r,
                () = due => {
                    tracing::info!(tunnels = retry.len(), "asking the gateway again for refused tunnels");
                    write_control(&mut ctl, &ControlMessage::Lease { tunnels: retry.clone() }).await?;
                    next = None;
                    continue;
                }
                _ = recheck.tick(), if probing => {
                    let now = self.probe_nodes(&nodes).await;
                    let moved: Vec<LeaseGrant> = leased
                        .iter()
                        .filter(|g| now.get(&g.name) != nodes.get(&g.name))
                        .cloned()
                        .collect();
                    if !moved.is_empty() {
                        nodes = now;
                        self.apply_grants(&welcome, &moved, &dialled, &nodes, true);
                        for g in &moved {
                            accepted.remove(&g.name);
                        }
                    }
                    let unclaimed: Vec<LeaseGrant> = leased
                        .iter()
                        .filter(|g| !accepted.contains(&g.name))
                        .cloned()
                        .collect();
                    self.claim_nodes(&mut ctl, &welcome, &unclaimed, &nodes).await?;
                    continue;
                }
                _ = &mut lost => return Ok("gateway stopped answering keep-alives".into()),
                () = &mut lane => return Ok("lane keeper stopped".into()),
                () = &mut udp => return Ok("datagram channel keeper stopped".into()),
            };
            match read {
                Ok(ControlMessage::Fleet { gateways }) => self.tell(gateways),
                Ok(ControlMessage::Leases { leases }) => {
                    self.apply_grants(&welcome, &leases, &dialled, &nodes, true);
                    self.claim_nodes(&mut ctl, &welcome, &leases, &nodes)
                        .await?;
                    for g in &leases {
                        leased.retain(|l| l.name != g.name);
                        leased.push(g.clone());
                    }
                    // An answer covers the tunnels it names: the others
                    // still wait for theirs (a revoked one asked apart).
                    retry.retain(|r| !leases.iter().any(|g| g.name == r.name));
                    retry.extend(self.to_retry(&leases));
                    backoff = (backoff * 2).min(LEASE_RETRY_MAX);
                    next = (!retry.is_empty()).then(|| tokio::time::Instant::now() + backoff);
                }
                Ok(ControlMessage::NodeVerdict {
                    tunnel,
                    node,
                    accepted: yes,
                    reason,
                }) => {
                    // A verdict on a node the tunnel no longer has is stale.
                    let current =
                        matches!(nodes.get(&tunnel), Some(Ok(n)) if n.to_string() == node);
                    if current {
                        if yes {
                            accepted.insert(tunnel.clone());
                        } else {
                            accepted.remove(&tunnel);
                        }
                        self.node_verdict(&welcome, &dialled, &tunnel, &node, yes, &reason);
                    }
                }
                Ok(ControlMessage::LeaseRevoked { tunnel, reason }) => {
                    let Some(t) = self.tunnels.iter().find(|t| t.name == tunnel) else {
                        tracing::warn!(gateway = %self.gateway, %tunnel, %reason, "the gateway revoked the lease of a tunnel this agent does not have");
                        continue;
                    };
                    tracing::warn!(
                        gateway = %self.gateway, %tunnel, %reason,
                        "the gateway revoked the tunnel's lease; its port is no longer advertised, asking for a new one"
                    );
                    self.state.set_grant(
                        self.gateway,
                        &tunnel,
                        TunnelStatus {
                            name: tunnel.to_string(),
                            target: t.target.to_string(),
                            error: Some(format!("lease revoked: {reason}; asked for a new one")),
                            ..Default::default()
                        },
                    );
                    publish(&self.state, &self.tunnels, &self.metrics);
                    leased.retain(|l| l.name != tunnel);
                    accepted.remove(&tunnel);
                    let again = TunnelRequest {
                        name: t.name.clone(),
                        port: t.port,
                        proto: t.proto,
                    };
                    write_control(
                        &mut ctl,
                        &ControlMessage::Lease {
                            tunnels: vec![again],
                        },
                    )
                    .await?;
                }
                Ok(m) => {
                    self.metrics.bad_input("unexpected_message");
                    return Ok(format!("unexpected message {m:?}"));
                }
                Err(WireError::Truncated) => return Ok("gateway closed the session".into()),
                Err(e) => return Ok(e.to_string()),
            }
        }
    }

    async fn dial(&self) -> Result<Multiaddr, SessionError> {
        // Dial from the hole-punch listeners' port, so the mapping the gateway
        // observes is the one a hole punch will use.
        self.host.wait_listening(Duration::from_secs(2)).await;
        let mut errors = Vec::new();
        for addr in &self.addresses {
            match tokio::time::timeout(
                self.cfg.gateway.dial_timeout,
                self.host.dial(self.gateway, addr.clone()),
            )
            .await
            {
                Ok(Ok(a)) => {
                    tracing::info!(gateway = %self.gateway, address = %a, "connected to gateway");
                    return Ok(a);
                }
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: timed out")),
            }
            self.metrics.dial_failed("gateway");
        }
        Err(SessionError::Unreachable(errors.join("; ")))
    }

    /// Passes on the fleet's gateways as this gateway names them.
    fn tell(&self, gateways: Vec<relaygate_common::protocol::FleetGateway>) {
        if let Some(news) = &self.news {
            let _ = news.send(FleetNews {
                from: self.gateway,
                gateways,
            });
        }
    }

    /// Tunnels configured but not started (refused at start): named in the
    /// hello so the gateway keeps their leases.
    fn paused(&self) -> Vec<relaygate_common::names::TunnelName> {
        self.state
            .tunnels()
            .into_iter()
            .filter_map(|t| t.name.parse().ok())
            .filter(|n| !self.tunnels.iter().any(|t| &t.name == n))
            .collect()
    }
}
