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
            let (behaviour, control, _incoming) = streams::new(vec![], 1);
            let mut swarm = transport::build_swarm(
                libp2p::identity::Keypair::generate_ed25519(),
                &transport::SessionTuning::default(),
                None,
                |_| behaviour,
            )
            .map_err(|e| e.to_string())?;
            swarm.dial(addr).map_err(|e| e.to_string())?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut tx = Some(tx);
                loop {
                    match swarm.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { .. } => {
                            if let Some(t) = tx.take() {
                                let _ = t.send(Ok(()));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { error, .. } => {
                            if let Some(t) = tx.take() {
                                let _ = t.send(Err(error.to_string()));
                            }
                        }
                        _ => {}
                    }
                }
            });
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .map_err(|_| "dial timed out".to_string())?
                .map_err(|_| "driver died".to_string())??;
            Ok::<_, String>(control)
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
