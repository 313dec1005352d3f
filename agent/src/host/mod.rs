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
    dcutr, identify,
    identity::Keypair,
    multiaddr::Protocol,
    ping, relay,
    swarm::{
        behaviour::toggle::Toggle,
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, NetworkBehaviour,
    },
    Multiaddr, PeerId,
};
use relaygate_common::{
    protocol::{LANE_PROTOCOL, SERVICE_PROTOCOL, TUNNEL_PROTOCOL},
    streams::{self, Incoming},
    transport,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    advertise, config::AgentConfig, metrics::Metrics, paths::Paths, state::AgentState,
    strangers::Strangers,
};

mod events;

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
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}
