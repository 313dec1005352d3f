//! The gateway's libp2p host: identity, TCP + QUIC listeners, identify (which
//! tells peers their observed address), ping, the AutoNAT server and the
//! stream protocols (control, dial-back, relay hop). A single task drives the swarm; the rest of the
//! gateway talks to it through [`HostHandle`] and reads [`HostState`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use libp2p::{
    autonat, connection_limits,
    core::ConnectedPoint,
    identify,
    identity::Keypair,
    ping,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent},
    Multiaddr, PeerId,
};
use relaygate_common::{
    circuit::HOP_PROTOCOL,
    metrics::Side,
    protocol::{CONTROL_PROTOCOL, DIALBACK_PROTOCOL},
    proxy_transport::{Diverted, ProxyAcceptor},
    streams::{self, Incoming},
    transport::{self, DataPath},
};
use tokio::sync::mpsc;

use crate::{config::GatewayConfig, gate::Gate, guard::Guard, metrics::Metrics};

pub const IDENTIFY_PROTOCOL: &str = "/relaygate/1.0.0";

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    // First: refusals happen before any other behaviour sees the connection.
    gate: Gate,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    autonat: Toggle<autonat::Behaviour>,
    streams: streams::Behaviour,
}

/// What the rest of the gateway can read about the host.
#[derive(Default)]
pub struct HostState {
    listeners: Mutex<HashMap<libp2p::core::transport::ListenerId, Vec<Multiaddr>>>,
    peers: Mutex<HashMap<PeerId, Multiaddr>>,
    expected_listeners: usize,
}

impl HostState {
    /// Concrete addresses the host listens on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.listeners).values().flatten().cloned().collect()
    }
    /// Every configured listener has at least one address.
    pub fn listeners_up(&self) -> bool {
        let l = lock(&self.listeners);
        l.len() == self.expected_listeners && l.values().all(|a| !a.is_empty())
    }
    /// The address an agent's connection came from.
    pub fn remote_addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        lock(&self.peers).get(peer).cloned()
    }
    /// Every connected peer with the address of its latest connection.
    pub fn peers(&self) -> Vec<(PeerId, Multiaddr)> {
        lock(&self.peers)
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect()
    }
    /// The IP of `peer`'s latest connection.
    pub fn remote_ip(&self, peer: &PeerId) -> Option<std::net::IpAddr> {
        crate::gate::ip_of(&self.remote_addr(peer)?)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub enum Command {
    /// Drop every connection to a peer (refused agents).
    Disconnect(PeerId),
    /// Connect to another gateway of the fleet, unless connected already.
    Dial { peer: PeerId, addrs: Vec<Multiaddr> },
}

#[derive(Clone)]
pub struct HostHandle {
    pub peer_id: PeerId,
    pub control: streams::Control,
    pub state: Arc<HostState>,
    commands: mpsc::Sender<Command>,
}

impl HostHandle {
    /// Counts a protocol violation by `peer`; closes the connections of
    /// whatever the bans it earned cover.
    pub async fn violation(&self, guard: &Guard, peer: PeerId, kind: &str) {
        let earned = guard.peer_violation(peer, kind);
        self.close_banned(&earned).await;
    }

    /// Closes every connection of a peer that `targets` cover, by peer id or
    /// by the address it connected from.
    pub async fn close_banned(&self, targets: &[crate::guard::BanTarget]) {
        use crate::guard::BanTarget;
        if targets.is_empty() {
            return;
        }
        for (peer, addr) in self.state.peers() {
            let ip = crate::gate::ip_of(&addr);
            let hit = targets.iter().any(|t| match t {
                BanTarget::Peer(p) => *p == peer,
                net => ip.is_some_and(|ip| net.covers_ip(ip)),
            });
            if hit {
                self.send(Command::Disconnect(peer)).await;
            }
        }
    }

    pub async fn send(&self, cmd: Command) {
        let _ = self.commands.send(cmd).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Build(#[from] transport::BuildError),
    #[error(
        "cannot listen on {addr}: {message} (is the port in use, or the address not on this host?)"
    )]
    Listen { addr: Multiaddr, message: String },
}

/// Builds the swarm, starts listening and spawns the driver task.
/// Queue of control streams waiting for their session task.
const CONTROL_QUEUE: usize = 1024;
/// Lane connections waiting for their handshake task.
const LANE_QUEUE: usize = 256;

pub fn start(
    key: Keypair,
    cfg: &GatewayConfig,
    metrics: Arc<Metrics>,
    guard: Arc<Guard>,
) -> Result<Started, HostError> {
    let ping_cfg = transport::ping_config(&cfg.session);
    let mut protocols = vec![CONTROL_PROTOCOL, DIALBACK_PROTOCOL];
    if cfg.forwards() {
        protocols.push(relaygate_common::protocol::FORWARD_PROTOCOL);
    }
    if cfg.relay.enabled {
        protocols.push(HOP_PROTOCOL);
    }
    let (streams, control, incoming) = streams::new(protocols, CONTROL_QUEUE);
    let policy = cfg.proxy_protocol.clone();
    let trusted: Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync> =
        Arc::new(move |ip| policy.trusts(ip));
    let autonat_cfg = autonat::Config {
        only_global_ips: cfg.autonat.only_global_ips,
        // A server only: never probe our own addresses through others.
        use_connected: false,
        ..Default::default()
    };
    // Agents' lanes arrive on the libp2p TCP port; the transport hands them over.
    let (lanes_tx, lanes) = match cfg.session.data_path {
        DataPath::Lane => {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            (Some(tx), Some(rx))
        }
        DataPath::Session => (None, None),
    };
    let mut swarm = transport::build_swarm(
        key,
        &cfg.session,
        Some(proxy_acceptor(cfg, &metrics, &guard, lanes_tx)),
        |key| Behaviour {
            gate: Gate::new(
                guard,
                trusted,
                cfg.limits.max_connections_per_ip,
                (
                    cfg.limits.max_pending_connections as usize,
                    cfg.limits.max_pending_connections_per_source,
                ),
            ),
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established_incoming(Some(cfg.limits.max_connections))
                    .with_max_pending_incoming(Some(cfg.limits.max_pending_connections))
                    .with_max_established_per_peer(Some(cfg.limits.max_connections_per_peer)),
            ),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("relaygate-gateway/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: ping::Behaviour::new(ping_cfg),
            autonat: Toggle::from(
                cfg.autonat
                    .enabled
                    .then(|| autonat::Behaviour::new(key.public().to_peer_id(), autonat_cfg)),
            ),
            streams,
        },
    )?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| HostError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
    }
    for addr in &cfg.advertise {
        swarm.add_external_address(addr.clone());
    }
    let state = Arc::new(HostState {
        expected_listeners: cfg.listen.len(),
        ..Default::default()
    });
    let (tx, rx) = mpsc::channel(64);
    let handle = HostHandle {
        peer_id: *swarm.local_peer_id(),
        control,
        state: state.clone(),
        commands: tx,
    };
    tokio::spawn(drive(swarm, rx, state, metrics));
    Ok(Started {
        handle,
        incoming,
        lanes,
    })
}

/// What [`start`] gives the rest of the gateway.
pub struct Started {
    pub handle: HostHandle,
    /// Streams of the gateway's own protocols (control, dial-back, hop).
    pub incoming: mpsc::Receiver<Incoming>,
    /// Lane connections, when `session.data_path` is `lane`.
    pub lanes: Option<mpsc::Receiver<Diverted>>,
}

/// PROXY policy of the libp2p TCP listener: the same trusted balancers as the leased ports.
fn proxy_acceptor(
    cfg: &GatewayConfig,
    metrics: &Arc<Metrics>,
    guard: &Arc<Guard>,
    lanes: Option<mpsc::Sender<Diverted>>,
) -> ProxyAcceptor {
    let policy = cfg.proxy_protocol.clone();
    let m = metrics.clone();
    // Connections the port holds while it looks at their first bytes (up to
    // 5 s), before libp2p's own pending places: banned sources are dropped at
    // once, and each source gets its share once half the places are taken.
    let places = crate::shares::Places::new(
        cfg.limits.max_pending_connections as usize,
        cfg.limits.max_pending_connections_per_source,
        guard.grouping(),
    );
    let guard = guard.clone();
    let balancers = policy.clone();
    ProxyAcceptor {
        required: policy.required,
        trusted: Arc::new(move |ip| policy.trusts(ip)),
        refused: Arc::new(move |reason| m.refuse(reason)),
        admit: Arc::new(move |ip| {
            if guard.is_banned_ip(ip) {
                return Err("banned");
            }
            // A trusted balancer's many clients would share one source's places.
            let place = if balancers.trusts(ip) {
                places.try_acquire_unshared()
            } else {
                places.try_acquire(ip)
            };
            match place {
                Ok(place) => Ok(Box::new(place) as Box<dyn Send>),
                Err(crate::shares::Busy::Total) => Err("pending_busy"),
                Err(crate::shares::Busy::Source) => Err("pending_per_source"),
            }
        }),
        lanes,
    }
}

async fn drive(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    state: Arc<HostState>,
    metrics: Arc<Metrics>,
) {
    let session = Metrics::side(Side::Session);
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Disconnect(peer)) => { let _ = swarm.disconnect_peer_id(peer); }
                Some(Command::Dial { peer, addrs }) => {
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "cannot dial a gateway of the fleet");
                    }
                }
                None => return,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    tracing::info!(%address, "libp2p listening");
                    lock(&state.listeners).entry(listener_id).or_default().push(address);
                }
                SwarmEvent::ExpiredListenAddr { listener_id, address } => {
                    if let Some(v) = lock(&state.listeners).get_mut(&listener_id) { v.retain(|a| a != &address); }
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Err(e) = reason { tracing::error!(error = %e, "libp2p listener closed"); }
                    lock(&state.listeners).remove(&listener_id);
                }
                SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "libp2p listener error"),
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    metrics.connections_opened.get_or_create(&session).inc();
                    metrics.connections_active.get_or_create(&session).inc();
                    let remote = match endpoint {
                        ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                        ConnectedPoint::Dialer { address, .. } => address,
                    };
                    tracing::debug!(peer = %peer_id, %remote, "session connection up");
                    lock(&state.peers).insert(peer_id, remote);
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. } => {
                    metrics.connections_active.get_or_create(&session).dec();
                    tracing::debug!(peer = %peer_id, cause = ?cause, "session connection closed");
                    if num_established == 0 { lock(&state.peers).remove(&peer_id); }
                }
                SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                    metrics.refuse("handshake_failed");
                    tracing::debug!(remote = %send_back_addr, %error, "incoming libp2p connection failed");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(e) }))
                    if !matches!(e, ping::Failure::Unsupported) =>
                {
                    // A silent peer is a dead session: close it so its leases stop accepting.
                    tracing::info!(%peer, error = %e, "ping failed; closing session connection");
                    swarm.close_connection(connection);
                }
                _ => {}
            }
        }
    }
}
