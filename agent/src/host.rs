//! The agent's libp2p host. It never listens: it only dials the gateway.
//! A single task drives the swarm; sessions ask it to dial through [`HostHandle`].

use std::{collections::HashMap, sync::Arc};

use futures::StreamExt;
use libp2p::{
    core::ConnectedPoint,
    identify,
    identity::Keypair,
    ping,
    swarm::{
        dial_opts::DialOpts, dial_opts::PeerCondition, ConnectionId, NetworkBehaviour, SwarmEvent,
    },
    Multiaddr, PeerId,
};
use relaygate_common::{
    metrics::Side,
    protocol::TUNNEL_PROTOCOL,
    streams::{self, Incoming},
    transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::{config::AgentConfig, metrics::Metrics};

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    streams: streams::Behaviour,
}

type DialReply = oneshot::Sender<Result<Multiaddr, String>>;

enum Command {
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: DialReply,
    },
    Disconnect(PeerId),
}

#[derive(Clone)]
pub struct HostHandle {
    pub peer_id: PeerId,
    pub control: streams::Control,
    commands: mpsc::Sender<Command>,
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
}

pub fn start(
    key: Keypair,
    cfg: &AgentConfig,
    metrics: Arc<Metrics>,
) -> Result<(HostHandle, mpsc::Receiver<Incoming>), transport::BuildError> {
    let ping_cfg = transport::ping_config(&cfg.session);
    // Deep enough for a burst of every stream a session may carry.
    let (streams, control, incoming) = streams::new(vec![TUNNEL_PROTOCOL], cfg.session.max_streams);
    let swarm = transport::build_swarm(key, &cfg.session, None, |key| Behaviour {
        identify: identify::Behaviour::new(
            identify::Config::new("/relaygate/1.0.0".into(), key.public())
                .with_agent_version(format!("relaygate-agent/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::new(ping_cfg),
        streams,
    })?;
    let (tx, rx) = mpsc::channel(16);
    let handle = HostHandle {
        peer_id: *swarm.local_peer_id(),
        control,
        commands: tx,
    };
    tokio::spawn(drive(swarm, rx, metrics));
    Ok((handle, incoming))
}

async fn drive(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
) {
    let session = relaygate_common::metrics::SideLabels {
        side: Side::Session,
    };
    let mut pending: HashMap<ConnectionId, DialReply> = HashMap::new();
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Dial { peer, addr, reply }) => {
                    let opts = DialOpts::peer_id(peer).addresses(vec![addr]).condition(PeerCondition::Always).build();
                    let id = opts.connection_id();
                    match swarm.dial(opts) {
                        Ok(()) => { pending.insert(id, reply); }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    }
                }
                Some(Command::Disconnect(peer)) => { let _ = swarm.disconnect_peer_id(peer); }
                None => return,
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { connection_id, endpoint, peer_id, .. } => {
                    metrics.connections_opened.get_or_create(&session).inc();
                    metrics.connections_active.get_or_create(&session).inc();
                    let addr = match endpoint {
                        ConnectedPoint::Dialer { address, .. } => address,
                        ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                    };
                    tracing::debug!(peer = %peer_id, %addr, "connection up");
                    if let Some(reply) = pending.remove(&connection_id) { let _ = reply.send(Ok(addr)); }
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                    metrics.connections_active.get_or_create(&session).dec();
                    tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(reply) = pending.remove(&connection_id) { let _ = reply.send(Err(error.to_string())); }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(e) }))
                    if !matches!(e, ping::Failure::Unsupported) =>
                {
                    tracing::info!(%peer, error = %e, "ping failed; closing connection");
                    swarm.close_connection(connection);
                }
                _ => {}
            }
        }
    }
}
