//! The doctor's own dials: reaching a gateway address, and asking a
//! gateway to dial a leased port back.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    swarm::{dial_opts::DialOpts, dial_opts::PeerCondition, SwarmEvent},
    Multiaddr, PeerId,
};
use relaygate_common::{
    names::LeasePort,
    protocol::{read_control, write_control, ControlMessage, DIALBACK_PROTOCOL, WIRE_VERSION},
    streams,
};
use tokio_util::compat::FuturesAsyncReadCompatExt;

pub(super) async fn dial(
    swarm: &mut libp2p::Swarm<streams::Behaviour>,
    peer: PeerId,
    addr: Multiaddr,
    timeout: Duration,
) -> Result<(), String> {
    let opts = DialOpts::peer_id(peer)
        .addresses(vec![addr])
        .condition(PeerCondition::Always)
        .build();
    let id = opts.connection_id();
    swarm.dial(opts).map_err(|e| e.to_string())?;
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { connection_id, .. } if connection_id == id => {
                    return Ok(())
                }
                SwarmEvent::OutgoingConnectionError {
                    connection_id,
                    error,
                    ..
                } if connection_id == id => return Err(error.to_string()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| "timed out".to_string())?
}

pub(super) async fn dialback(
    control: &streams::Control,
    gateway: PeerId,
    port: LeasePort,
) -> Result<(bool, String), String> {
    let s = control
        .open_stream(gateway, DIALBACK_PROTOCOL)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = s.compat();
    write_control(
        &mut s,
        &ControlMessage::Dialback {
            version: WIRE_VERSION,
            port,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), read_control(&mut s)).await {
        Ok(Ok(ControlMessage::DialbackResult { reachable, detail })) => Ok((reachable, detail)),
        Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}
