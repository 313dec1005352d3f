//! The agent's libp2p host. It dials the gateway, reserves on the gateway's
//! relay, and runs DCUtR so that peers reaching it through the relay move to a
//! direct connection. Its only listeners are the hole-punch sockets (the
//! session dials from the same port, so the NAT mapping the gateway observes is
//! the one a punch uses). A single task drives the swarm; the rest of the
//! agent talks to it through [`HostHandle`].

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use libp2p::{
    autonat,
    core::transport::ListenerId,
    core::ConnectedPoint,
    dcutr, identify,
    identity::Keypair,
    multiaddr::Protocol,
    ping, relay,
    swarm::{
        behaviour::toggle::Toggle,
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, NetworkBehaviour, SwarmEvent,
    },
    Multiaddr, PeerId,
};
use relaygate_common::{
    metrics::{ReasonLabels, Side},
    protocol::{LANE_PROTOCOL, SERVICE_PROTOCOL, TUNNEL_PROTOCOL},
    streams::{self, Incoming},
    transport,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    advertise,
    config::AgentConfig,
    metrics::{Metrics, PunchLabels, PunchResult, TransportLabels},
    paths::{Paths, PunchEvent},
    state::AgentState,
    strangers::Strangers,
};

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// First: a refused stranger never reaches the others.
    strangers: Strangers,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    autonat: Toggle<autonat::Behaviour>,
    streams: streams::Behaviour,
}

type DialReply = oneshot::Sender<Result<Multiaddr, String>>;
type ConnectReply = oneshot::Sender<Result<(), String>>;

enum Command {
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: DialReply,
    },
    Disconnect(PeerId),
    /// Reserve on the relay reached at this address (ending in `/p2p/<relay>`).
    Reserve(Multiaddr),
    /// Be connected to `peer`, dialing these addresses if not yet.
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: ConnectReply,
    },
}

#[derive(Clone)]
pub struct HostHandle {
    pub peer_id: PeerId,
    pub control: streams::Control,
    pub paths: Arc<Paths>,
    commands: mpsc::Sender<Command>,
    listening: watch::Receiver<bool>,
    /// Names a gateway whenever a connection to it is declared dead (ping failure).
    gateway_lost: tokio::sync::broadcast::Sender<PeerId>,
}

impl HostHandle {
    /// Dials `peer` at `addr` with a new connection; resolves when it is up.
    pub async fn dial(&self, peer: PeerId, addr: Multiaddr) -> Result<Multiaddr, String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial { peer, addr, reply })
            .await
            .map_err(|_| "host stopped".to_string())?;
        rx.await.map_err(|_| "host stopped".to_string())?
    }

    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer)).await;
    }

    /// Reserves on the relay at `relay` (replacing an earlier reservation).
    pub async fn reserve(&self, relay: Multiaddr) {
        let _ = self.commands.send(Command::Reserve(relay)).await;
    }

    /// Ensures a connection to `peer`, dialing `addrs` (circuit addresses) if needed.
    pub async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Connect { peer, addrs, reply })
            .await
            .map_err(|_| "host stopped".to_string())?;
        rx.await.map_err(|_| "host stopped".to_string())?
    }

    /// Resolves when a connection to `gateway` is declared dead after this
    /// call: a graceful close can hang on a stalled TCP connection, so the
    /// session must not wait for it.
    pub fn gateway_lost(
        &self,
        gateway: PeerId,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.gateway_lost.subscribe();
        async move {
            loop {
                match rx.recv().await {
                    Ok(p) if p == gateway => return,
                    Ok(_) => {}
                    // Notices were lost, this gateway's perhaps: the session
                    // ends and dials again rather than miss it.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return std::future::pending().await
                    }
                }
            }
        }
    }

    /// Waits (briefly) until the hole-punch listeners are up, so the session's
    /// dial reuses their port.
    pub async fn wait_listening(&self, max: Duration) {
        let mut rx = self.listening.clone();
        let _ = tokio::time::timeout(max, rx.wait_for(|up| *up)).await;
    }
}

pub fn start(
    key: Keypair,
    cfg: &AgentConfig,
    metrics: Arc<Metrics>,
    state: Arc<AgentState>,
    gateways: Arc<crate::gateways::Gateways>,
) -> Result<(HostHandle, mpsc::Receiver<Incoming>), transport::BuildError> {
    let ping_cfg = transport::ping_config(&cfg.session);
    // Deep enough for a burst of every stream a session may carry.
    let mut protocols = vec![TUNNEL_PROTOCOL, SERVICE_PROTOCOL];
    // A gateway opens a lane on the session when this agent has none of its
    // own; with `session.data_path = "session"` it finds it unsupported and
    // uses session streams.
    if cfg.session.data_path == transport::DataPath::Lane {
        protocols.push(LANE_PROTOCOL);
    }
    let (streams, control, incoming) = streams::new(protocols, cfg.session.max_streams);
    let gateway = cfg.gateway_peer().ok();
    let use_autonat = cfg.relay.enabled && cfg.relay.autonat;
    let allowed: Vec<PeerId> = cfg
        .services
        .iter()
        .flat_map(|s| s.allow.iter().copied())
        .collect();
    let trusted = gateways.clone();
    let gate_metrics = metrics.clone();
    let mut swarm = transport::build_relay_client_swarm(key, &cfg.session, |key, relay| {
        let me = key.public().to_peer_id();
        let autonat = use_autonat.then(|| {
            let mut a = autonat::Behaviour::new(
                me,
                autonat::Config {
                    // Only the gateway is asked; it is the one server we trust.
                    use_connected: false,
                    boot_delay: Duration::from_secs(2),
                    retry_interval: Duration::from_secs(30),
                    refresh_interval: Duration::from_secs(300),
                    only_global_ips: false,
                    ..Default::default()
                },
            );
            if let Some(gw) = gateway {
                for a_ in &cfg.gateway.addresses {
                    a.add_server(gw, Some(a_.clone()));
                }
            }
            a
        });
        Behaviour {
            strangers: Strangers::new(allowed, trusted, gate_metrics),
            identify: identify::Behaviour::new(
                identify::Config::new("/relaygate/1.0.0".into(), key.public())
                    .with_agent_version(format!("relaygate-agent/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: ping::Behaviour::new(ping_cfg),
            relay,
            dcutr: dcutr::Behaviour::new(me),
            autonat: Toggle::from(autonat),
            streams,
        }
    })?;
    let mut expected = 0;
    if cfg.relay.enabled {
        for addr in &cfg.relay.punch_listen {
            match swarm.listen_on(addr.clone()) {
                Ok(_) => expected += 1,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot open hole-punch listener; punching over it is off")
                }
            }
        }
    }
    let (listening_tx, listening) = watch::channel(expected == 0);
    let (gateway_lost, _) = tokio::sync::broadcast::channel(16);
    let (tx, rx) = mpsc::channel(64);
    let paths = Arc::new(Paths::default());
    let handle = HostHandle {
        peer_id: *swarm.local_peer_id(),
        control,
        paths: paths.clone(),
        commands: tx,
        listening,
        gateway_lost: gateway_lost.clone(),
    };
    let driver = Driver {
        metrics,
        state,
        paths,
        listening: listening_tx,
        gateway_lost,
        expected_listeners: expected,
        listeners_up: HashMap::new(),
        relays: HashMap::new(),
        pending_dials: HashMap::new(),
        pending_connects: HashMap::new(),
        advertise_file: cfg.relay.advertise_file.clone(),
        gateways,
    };
    tokio::spawn(driver.run(swarm, rx));
    Ok((handle, incoming))
}

/// A refused or lost reservation is tried again after this long.
const RESERVE_RETRY: Duration = Duration::from_secs(5);

struct Driver {
    metrics: Arc<Metrics>,
    state: Arc<AgentState>,
    paths: Arc<Paths>,
    listening: watch::Sender<bool>,
    gateway_lost: tokio::sync::broadcast::Sender<PeerId>,
    expected_listeners: usize,
    listeners_up: HashMap<ListenerId, usize>,
    /// A reservation on each gateway's relay the agent holds a session with.
    relays: HashMap<PeerId, Relay>,
    pending_dials: HashMap<ConnectionId, DialReply>,
    pending_connects: HashMap<PeerId, Vec<ConnectReply>>,
    advertise_file: Option<std::path::PathBuf>,
    gateways: Arc<crate::gateways::Gateways>,
}

/// One gateway's relay: where it is, the listener holding the reservation,
/// and when to try again after a refusal or loss.
struct Relay {
    addr: Multiaddr,
    listener: Option<ListenerId>,
    retry: Option<tokio::time::Instant>,
    /// The relay accepted the reservation.
    reserved: bool,
}

impl Driver {
    async fn run(
        mut self,
        mut swarm: libp2p::Swarm<Behaviour>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        loop {
            let retry = self
                .relays
                .iter()
                .filter_map(|(p, r)| r.retry.map(|t| (t, *p)))
                .min();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(&mut swarm, cmd),
                    None => return,
                },
                _ = sleep_until(retry.map(|(t, _)| t)) => {
                    if let Some((_, peer)) = retry {
                        if let Some(r) = self.relays.get_mut(&peer) {
                            r.retry = None;
                            self.listen_relay(&mut swarm, peer);
                        }
                    }
                }
                event = swarm.select_next_some() => self.event(&mut swarm, event),
            }
        }
    }

    fn command(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, cmd: Command) {
        match cmd {
            Command::Dial { peer, addr, reply } => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::Always)
                    .build();
                let id = opts.connection_id();
                match swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::Disconnect(peer) => {
                let _ = swarm.disconnect_peer_id(peer);
            }
            Command::Reserve(addr) => {
                let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                    tracing::warn!(address = %addr, "relay address without /p2p/; not reserving");
                    return;
                };
                self.relays
                    .entry(peer)
                    .and_modify(|r| {
                        r.addr = addr.clone();
                        r.retry = None;
                    })
                    .or_insert(Relay {
                        addr: addr.clone(),
                        listener: None,
                        retry: None,
                        reserved: false,
                    });
                self.listen_relay(swarm, peer);
            }
            Command::Connect { peer, addrs, reply } => {
                if swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let waiting = self.pending_connects.entry(peer).or_default();
                waiting.push(reply);
                if waiting.len() > 1 {
                    return; // a dial is already under way
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = swarm.dial(opts) {
                    for r in self.pending_connects.remove(&peer).unwrap_or_default() {
                        let _ = r.send(Err(e.to_string()));
                    }
                }
            }
        }
    }

    /// Reserves on `peer`'s relay, at the address its slot holds.
    fn listen_relay(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, peer: PeerId) {
        let Some(slot) = self.relays.get_mut(&peer) else {
            return;
        };
        let relay = slot.addr.clone();
        if let Some(old) = slot.listener.take() {
            swarm.remove_listener(old);
        }
        self.state.clear_circuit_addrs_of(&peer);
        let circuit = relay.with(Protocol::P2pCircuit);
        match swarm.listen_on(circuit.clone()) {
            Ok(id) => slot.listener = Some(id),
            Err(e) => {
                tracing::warn!(address = %circuit, error = %e, "cannot reserve on the relay");
                slot.retry = Some(tokio::time::Instant::now() + RESERVE_RETRY);
            }
        }
    }

    /// Reservations the relays accepted and that still hold.
    fn reservations(&self) -> i64 {
        self.relays.values().filter(|r| r.reserved).count() as i64
    }

    /// The gateway whose relay `listener` holds a reservation on.
    fn relay_of(&self, listener: ListenerId) -> Option<PeerId> {
        self.relays
            .iter()
            .find(|(_, r)| r.listener == Some(listener))
            .map(|(p, _)| *p)
    }

    fn publish_circuits(&self) {
        let addrs = self.state.circuit_addrs();
        if let Some(path) = &self.advertise_file {
            let parsed: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if let Err(e) = advertise::write_file(path, &parsed) {
                tracing::error!(path = %path.display(), error = %e, "cannot write relay.advertise_file");
            }
        }
    }

    fn event(&mut self, swarm: &mut libp2p::Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        let session = relaygate_common::metrics::SideLabels {
            side: Side::Session,
        };
        let peers = &self.metrics.peers;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if self.relay_of(listener_id).is_some() {
                    tracing::info!(%address, "relay reservation active; reachable by peer id at this address");
                    self.state.add_circuit_addr(address.to_string());
                    self.publish_circuits();
                } else {
                    tracing::debug!(%address, "hole-punch listener up");
                    *self.listeners_up.entry(listener_id).or_default() += 1;
                    if self.listeners_up.len() >= self.expected_listeners {
                        let _ = self.listening.send(true);
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } if self.relay_of(listener_id).is_some() => {
                self.state.remove_circuit_addr(&address.to_string());
                self.publish_circuits();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(gw) = self.relay_of(listener_id) {
                    if let Some(r) = self.relays.get_mut(&gw) {
                        r.listener = None;
                        r.reserved = false;
                    }
                    self.state.clear_circuit_addrs_of(&gw);
                    self.publish_circuits();
                    peers.reservation_active.set(self.reservations());
                    match &reason {
                        Err(e) => tracing::warn!(error = %e, "relay reservation failed or lost"),
                        Ok(()) => tracing::info!("relay reservation ended with its connection"),
                    }
                    // While the session is up, a lost reservation is taken again;
                    // a new session reserves anyway.
                    if swarm.is_connected(&gw) && self.gateways.contains(&gw) {
                        if let Some(r) = self.relays.get_mut(&gw) {
                            r.retry = Some(tokio::time::Instant::now() + RESERVE_RETRY);
                        }
                    } else {
                        self.relays.remove(&gw);
                    }
                } else if let Err(e) = reason {
                    tracing::warn!(error = %e, "hole-punch listener closed");
                }
            }
            SwarmEvent::ListenerError { error, .. } => tracing::debug!(%error, "listener error"),
            SwarmEvent::ConnectionEstablished {
                connection_id,
                endpoint,
                peer_id,
                ..
            } => {
                self.metrics
                    .connections_opened
                    .get_or_create(&session)
                    .inc();
                self.metrics
                    .connections_active
                    .get_or_create(&session)
                    .inc();
                let relayed = endpoint.is_relayed();
                let (addr, remote) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), address.clone()),
                    ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => (local_addr.clone(), send_back_addr.clone()),
                };
                tracing::debug!(peer = %peer_id, %remote, relayed, "connection up");
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(remote.clone()));
                }
                for r in self.pending_connects.remove(&peer_id).unwrap_or_default() {
                    let _ = r.send(Ok(()));
                }
                if self.gateways.contains(&peer_id) {
                    self.paths
                        .connection_up(peer_id, connection_id, remote, false, &addr);
                    return;
                }
                match self
                    .paths
                    .connection_up(peer_id, connection_id, remote, relayed, &addr)
                {
                    Some(PunchEvent::Started(transport)) => {
                        peers
                            .holepunch_attempts
                            .get_or_create(&TransportLabels { transport })
                            .inc();
                    }
                    Some(PunchEvent::Succeeded { transport, after }) => {
                        tracing::info!(peer = %peer_id, ?transport, ms = after.as_millis() as u64, "hole punch succeeded; new streams use the direct connection");
                        peers
                            .holepunch_results
                            .get_or_create(&PunchLabels {
                                transport,
                                result: PunchResult::Success,
                            })
                            .inc();
                        peers
                            .holepunch_seconds
                            .get_or_create(&TransportLabels { transport })
                            .observe(after.as_secs_f64());
                    }
                    None => {}
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                self.metrics
                    .connections_active
                    .get_or_create(&session)
                    .dec();
                self.paths.connection_down(connection_id);
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                if let Some(peer) = peer_id {
                    if self.paths.dial_failed(&peer) {
                        peers.holepunch_dial_failures.inc();
                    }
                    if !swarm.is_connected(&peer) {
                        for r in self.pending_connects.remove(&peer).unwrap_or_default() {
                            let _ = r.send(Err(error.to_string()));
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) if !matches!(e, ping::Failure::Unsupported) => {
                tracing::info!(%peer, error = %e, "ping failed; closing connection");
                swarm.close_connection(connection);
                if self.gateways.contains(&peer) {
                    let _ = self.gateway_lost.send(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => match e {
                relay::client::Event::ReservationReqAccepted {
                    renewal,
                    relay_peer_id,
                    ..
                } => {
                    if let Some(r) = self.relays.get_mut(&relay_peer_id) {
                        r.reserved = true;
                    }
                    peers.reservation_active.set(self.reservations());
                    let result = if renewal { "renewed" } else { "accepted" };
                    peers
                        .reservations
                        .get_or_create(&ReasonLabels::new(result))
                        .inc();
                }
                other => tracing::debug!(event = ?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => tracing::debug!(peer = %remote_peer_id, "DCUtR direct connection up"),
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; the relay stays in use");
                    if let Some(transport) = self.paths.punch_failed(&remote_peer_id, e.to_string())
                    {
                        peers
                            .holepunch_results
                            .get_or_create(&PunchLabels {
                                transport,
                                result: PunchResult::Failure,
                            })
                            .inc();
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let (v, text) = match &new {
                    autonat::NatStatus::Public(a) => (1, format!("public at {a}")),
                    autonat::NatStatus::Private => (0, "private (behind NAT)".to_string()),
                    autonat::NatStatus::Unknown => (-1, "unknown".to_string()),
                };
                peers.reachable.set(v);
                self.state.set_reachability(text.clone());
                tracing::info!(reachability = %text, "AutoNAT verdict from the gateway");
            }
            _ => {}
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}
