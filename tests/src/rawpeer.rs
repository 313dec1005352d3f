//! A bare libp2p peer that speaks relaygate's stream protocols byte by byte,
//! so tests can send the gateway malformed input a real agent never would.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{multiaddr::Protocol, swarm::SwarmEvent, Multiaddr, PeerId, StreamProtocol};
use relaygate_common::{
    protocol::{read_control, ControlMessage},
    streams, transport,
};
use tokio::io::AsyncWriteExt;
use tokio_util::compat::FuturesAsyncReadCompatExt;

pub struct RawPeer {
    rt: tokio::runtime::Runtime,
    control: streams::Control,
    gateway: PeerId,
}

impl RawPeer {
    /// Connects to a gateway address ending in `/p2p/<id>`.
    pub fn connect(addr: &str) -> Result<RawPeer, String> {
        let addr: Multiaddr = addr.parse().map_err(|e| format!("{e}"))?;
        let Some(Protocol::P2p(gateway)) = addr.iter().last() else {
            return Err("no /p2p".into());
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let control = rt.block_on(async {
            let key = libp2p::identity::Keypair::generate_ed25519();
            dial_and_drive(key, addr, vec![], 1).await.map(|(c, _)| c)
        })?;
        Ok(RawPeer {
            rt,
            control,
            gateway,
        })
    }

    /// Opens a stream of `protocol`, writes `bytes`, half-closes, and reads
    /// one control frame back (None if the gateway closed without one).
    pub fn send(
        &self,
        protocol: &'static str,
        bytes: &[u8],
    ) -> Result<Option<ControlMessage>, String> {
        self.rt.block_on(async {
            let s = self
                .control
                .open_stream(self.gateway, StreamProtocol::new(protocol))
                .await
                .map_err(|e| e.to_string())?;
            let mut s = s.compat();
            s.write_all(bytes).await.map_err(|e| e.to_string())?;
            let _ = s.shutdown().await;
            match tokio::time::timeout(Duration::from_secs(15), read_control(&mut s)).await {
                Ok(Ok(m)) => Ok(Some(m)),
                Ok(Err(_)) => Ok(None),
                Err(_) => Err("no answer in time".into()),
            }
        })
    }
}

impl RawPeer {
    /// Opens `n` streams of `protocol`, writes `bytes` on each and keeps them
    /// open (not read, not closed) until the returned holder drops. Returns
    /// how many opened.
    pub fn hold(&self, protocol: &'static str, bytes: &[u8], n: usize) -> Held {
        let streams = self.rt.block_on(async {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let open = self
                    .control
                    .open_stream(self.gateway, StreamProtocol::new(protocol));
                let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), open).await else {
                    continue;
                };
                let mut s = s.compat();
                if s.write_all(bytes).await.is_ok() {
                    held.push(s);
                }
            }
            held
        });
        Held(streams)
    }
}

/// Builds a swarm of the streams behaviour (accepting `accept`), dials
/// `addr`, and drives it on the current runtime once connected: the
/// connection's control and its inbound streams.
pub async fn dial_and_drive(
    key: libp2p::identity::Keypair,
    addr: Multiaddr,
    accept: Vec<StreamProtocol>,
    queue: usize,
) -> Result<
    (
        streams::Control,
        tokio::sync::mpsc::Receiver<streams::Incoming>,
    ),
    String,
> {
    let (behaviour, control, incoming) = streams::new(accept, queue);
    let mut swarm = transport::build_swarm(key, &transport::SessionTuning::default(), None, |_| {
        behaviour
    })
    .map_err(|e| e.to_string())?;
    swarm.dial(addr).map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            let outcome = match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => Ok(()),
                SwarmEvent::OutgoingConnectionError { error, .. } => Err(error.to_string()),
                _ => continue,
            };
            if let Some(t) = tx.take() {
                let _ = t.send(outcome);
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| "dial timed out".to_string())?
        .map_err(|_| "swarm task died".to_string())??;
    Ok((control, incoming))
}

/// Streams kept open by [`RawPeer::hold`].
pub struct Held(pub Vec<tokio_util::compat::Compat<libp2p::Stream>>);

impl RawPeer {
    /// Opens a stream of `protocol`, writes `bytes`, half-closes, and returns
    /// every byte the gateway sends back before it closes the stream.
    pub fn exchange(&self, protocol: &'static str, bytes: &[u8]) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        self.rt.block_on(async {
            let s = self
                .control
                .open_stream(self.gateway, StreamProtocol::new(protocol))
                .await
                .map_err(|e| e.to_string())?;
            let mut s = s.compat();
            s.write_all(bytes).await.map_err(|e| e.to_string())?;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            match tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await {
                Ok(_) => Ok(out),
                Err(_) => Err("no answer in time".into()),
            }
        })
    }
}

/// A libp2p peer posing as a gateway: it admits one agent with a fixed lease,
/// then opens tunnel streams carrying whatever bytes a test wants.
pub struct FakeGateway {
    rt: tokio::runtime::Runtime,
    control: streams::Control,
    pub peer_id: PeerId,
    pub addr: Multiaddr,
    agent: tokio::sync::watch::Receiver<Option<PeerId>>,
}

impl FakeGateway {
    /// Listens on loopback TCP and answers every hello with `tunnel` leased on `port`.
    pub fn start(tunnel: &str, port: u16) -> Result<FakeGateway, String> {
        use relaygate_common::protocol::{
            write_control, ControlMessage, LeaseGrant, LeaseOutcome, Welcome, CONTROL_PROTOCOL,
            WIRE_VERSION,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let name: relaygate_common::names::TunnelName =
            tunnel.parse().map_err(|e| format!("{e}"))?;
        let lease = relaygate_common::names::LeasePort::new(port).ok_or("port 0")?;
        let (tx, agent) = tokio::sync::watch::channel(None);
        let (control, peer_id, addr) = rt.block_on(async move {
            let (behaviour, control, mut incoming) = streams::new(vec![CONTROL_PROTOCOL], 16);
            let key = libp2p::identity::Keypair::generate_ed25519();
            let peer_id = key.public().to_peer_id();
            let mut swarm =
                transport::build_swarm(key, &transport::SessionTuning::default(), None, |_| {
                    behaviour
                })
                .map_err(|e| e.to_string())?;
            swarm
                .listen_on("/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?)
                .map_err(|e| e.to_string())?;
            let addr = loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    break address.with(Protocol::P2p(peer_id));
                }
            };
            tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            tokio::spawn(async move {
                while let Some(inc) = incoming.recv().await {
                    let mut s = inc.stream.compat();
                    if read_control(&mut s).await.is_err() {
                        continue;
                    }
                    let welcome = Welcome {
                        lease_retry: false,
                        version: WIRE_VERSION,
                        public_hosts: vec![],
                        leases: vec![LeaseGrant {
                            name: name.clone(),
                            outcome: LeaseOutcome::Granted { port: lease },
                        }],
                        lane_port: None,
                        lanes: None,
                        lane_flow: None,
                        fleet: vec![],
                        fleet_hosts: vec![],
                        node_claims: false,
                        udp: None,
                    };
                    let _ = write_control(&mut s, &ControlMessage::Welcome(welcome)).await;
                    let _ = tx.send(Some(inc.peer));
                    // keep the control stream (the session) open
                    tokio::spawn(async move {
                        let _ = read_control(&mut s).await;
                    });
                }
            });
            Ok::<_, String>((control, peer_id, addr))
        })?;
        Ok(FakeGateway {
            rt,
            control,
            peer_id,
            addr,
            agent,
        })
    }

    /// Opens a tunnel stream to the admitted agent, writes `bytes`, and returns the
    /// agent's first answer byte (None if it closed without one).
    pub fn tunnel_stream(&self, bytes: &[u8]) -> Result<Option<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut agent = self.agent.clone();
        self.rt.block_on(async {
            let peer =
                tokio::time::timeout(Duration::from_secs(20), agent.wait_for(|a| a.is_some()))
                    .await
                    .map_err(|_| "no agent session".to_string())?
                    .map_err(|e| e.to_string())?
                    .ok_or("no agent")?;
            let s = self
                .control
                .open_stream(peer, relaygate_common::protocol::TUNNEL_PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            let mut s = s.compat();
            s.write_all(bytes).await.map_err(|e| e.to_string())?;
            let _ = s.shutdown().await;
            match tokio::time::timeout(Duration::from_secs(15), s.read_u8()).await {
                Ok(Ok(b)) => Ok(Some(b)),
                Ok(Err(_)) => Ok(None),
                Err(_) => Err("no answer".into()),
            }
        })
    }
}
