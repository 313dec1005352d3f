//! Agents' datagram channels: a QUIC endpoint of its own (`udp.listen`),
//! since libp2p's QUIC endpoint turns datagrams off. A channel is taken
//! only from an agent with a session, checked against bans and rates before
//! any crypto; its datagrams go to the port their flow id names.

use std::{net::SocketAddr, sync::Arc};

use libp2p::identity::Keypair;
use relaygate_common::dgram::{endpoint, Frame};

use super::{AgentUdp, FromAgent, UdpPlane};
use crate::guard::Action;

/// Binds the channel's endpoint.
pub fn bind(key: &Keypair, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let cfg = endpoint::server_config(key)?;
    endpoint::endpoint(addr, Some(cfg)).map_err(|e| {
        anyhow::anyhow!("cannot bind the UDP tunnels' channel on {addr}: {e} (set udp.listen, or udp.enabled = false)")
    })
}

/// Takes channels until the endpoint closes.
pub async fn accept(plane: Arc<UdpPlane>, ep: quinn::Endpoint) {
    while let Some(incoming) = ep.accept().await {
        let ip = incoming.remote_address().ip();
        if plane.guard.check_ip(ip, Action::Connection).is_err() {
            incoming.ignore();
            continue;
        }
        let plane = plane.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%ip, error = %e, "datagram channel handshake failed");
                    return;
                }
            };
            let Ok(peer) = endpoint::peer_id(&conn) else {
                conn.close(1u32.into(), b"no identity");
                return;
            };
            let Some(agent) = plane.agent(&peer) else {
                plane.metrics.refuse("udp_channel_without_session");
                conn.close(2u32.into(), b"no session: open a session first");
                return;
            };
            tracing::info!(%peer, remote = %conn.remote_address(), "datagram channel up");
            agent.set_channel(conn.clone());
            plane.metrics.udp.channels_active.inc();
            tokio::select! {
                _ = serve(&plane, &agent, &conn) => {}
                _ = agent.session.cancelled() => conn.close(0u32.into(), b"session over"),
            }
            agent.channel_gone(&conn);
            plane.metrics.udp.channels_active.dec();
            tracing::info!(%peer, "datagram channel down");
        });
    }
}

/// Routes the agent's datagrams to their ports until the channel closes.
async fn serve(plane: &UdpPlane, agent: &AgentUdp, conn: &quinn::Connection) {
    while let Ok(d) = conn.read_datagram().await {
        let msg = match Frame::decode(&d) {
            Ok(Frame::Data { flow, payload }) => {
                // The payload is the datagram's tail: sliced, not copied.
                let at = d.len() - payload.len();
                FromAgent::Data {
                    flow,
                    payload: d.slice(at..),
                }
            }
            Ok(Frame::Opened { flow, status }) => FromAgent::Opened { flow, status },
            Ok(Frame::Close { flow, reason }) => FromAgent::Close { flow, reason },
            Ok(Frame::Open { .. }) => {
                plane.metrics.bad_input("dgram_frame");
                continue;
            }
            Err(e) => {
                tracing::debug!(peer = %agent.peer, error = %e, "bad datagram frame from the agent");
                plane.metrics.bad_input("dgram_frame");
                continue;
            }
        };
        route(plane, agent, msg);
    }
}

fn route(plane: &UdpPlane, agent: &AgentUdp, msg: FromAgent) {
    let flow = match &msg {
        FromAgent::Data { flow, .. }
        | FromAgent::Opened { flow, .. }
        | FromAgent::Close { flow, .. } => *flow,
    };
    match agent.port(super::flows::slot_of(flow)) {
        Some(tx) => {
            if tx.try_send(msg).is_err() {
                plane.metrics.udp.drop("port_queue_full");
            }
        }
        None => plane.metrics.udp.drop("unknown_flow"),
    }
}
