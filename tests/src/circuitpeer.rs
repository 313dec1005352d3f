//! A bare libp2p peer that speaks circuit relay v2 by hand: it reserves,
//! opens circuits and accepts them as raw streams, so a test controls every
//! byte on a circuit (and can stop reading one, as an attacker would).

use std::time::Duration;

use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    circuit::{
        read_message, write_message, HopMessage, HopType, Peer, Status, StopMessage, StopType,
        HOP_PROTOCOL, STOP_PROTOCOL,
    },
    streams::{Control, Incoming},
};
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::rawpeer::dial_and_drive;

/// A circuit's stream, as tokio I/O.
pub type CircuitStream = Compat<libp2p::Stream>;

pub struct CircuitPeer {
    pub id: PeerId,
    relay: PeerId,
    control: Control,
    stops: mpsc::Receiver<Incoming>,
}

impl CircuitPeer {
    /// Connects to the relay at `addr` (ending in `/p2p/<relay>`), driving
    /// its swarm on the current tokio runtime.
    pub async fn connect(addr: &str, key: Keypair) -> Result<CircuitPeer, String> {
        let addr: Multiaddr = addr.parse().map_err(|e| format!("{e}"))?;
        let Some(Protocol::P2p(relay)) = addr.iter().last() else {
            return Err("no /p2p in the relay address".into());
        };
        let id = key.public().to_peer_id();
        let (control, stops) = dial_and_drive(key, addr, vec![STOP_PROTOCOL], 64).await?;
        Ok(CircuitPeer {
            id,
            relay,
            control,
            stops,
        })
    }

    async fn hop(&self, msg: HopMessage) -> Result<(libp2p::Stream, HopMessage), String> {
        let mut s = self
            .control
            .open_stream(self.relay, HOP_PROTOCOL)
            .await
            .map_err(|e| e.to_string())?;
        write_message(&mut s, &msg)
            .await
            .map_err(|e| e.to_string())?;
        let answer: HopMessage =
            tokio::time::timeout(Duration::from_secs(15), read_message(&mut s))
                .await
                .map_err(|_| "no hop answer in time".to_string())?
                .map_err(|e| e.to_string())?;
        Ok((s, answer))
    }

    /// Reserves a slot on the relay; the stream is kept by the caller, as
    /// the reservation lives on the connection.
    pub async fn reserve(&self) -> Result<(), String> {
        let (_s, answer) = self.hop(request(HopType::Reserve, None)).await?;
        status(answer.status)
    }

    /// Opens a circuit to `dst` through the relay.
    pub async fn circuit_to(&self, dst: PeerId) -> Result<CircuitStream, String> {
        let (s, answer) = self.hop(request(HopType::Connect, Some(dst))).await?;
        status(answer.status)?;
        Ok(s.compat())
    }

    /// The next circuit to this peer: who opened it, and its stream (already
    /// accepted).
    pub async fn next_circuit(&mut self) -> Result<(PeerId, CircuitStream), String> {
        let mut incoming = self.stops.recv().await.ok_or("swarm gone")?;
        let connect: StopMessage = read_message(&mut incoming.stream)
            .await
            .map_err(|e| e.to_string())?;
        let src = connect
            .peer
            .as_ref()
            .and_then(|p| PeerId::from_bytes(&p.id).ok())
            .ok_or("STOP without a source peer")?;
        let ok = StopMessage {
            r#type: StopType::Status as i32,
            peer: None,
            limit: None,
            status: Some(Status::Ok as i32),
        };
        write_message(&mut incoming.stream, &ok)
            .await
            .map_err(|e| e.to_string())?;
        Ok((src, incoming.stream.compat()))
    }
}

fn request(kind: HopType, peer: Option<PeerId>) -> HopMessage {
    HopMessage {
        r#type: kind as i32,
        peer: peer.map(|p| Peer {
            id: p.to_bytes(),
            addrs: Vec::new(),
        }),
        reservation: None,
        limit: None,
        status: None,
    }
}

fn status(s: Option<i32>) -> Result<(), String> {
    match s.and_then(|s| Status::try_from(s).ok()) {
        Some(Status::Ok) => Ok(()),
        Some(other) => Err(format!("relay answered {}", other.name())),
        None => Err("relay answered without a status".into()),
    }
}
