//! One datagram channel's flows: OPEN makes a socket toward the tunnel's
//! node and a task that carries the node's replies back; DATA goes to the
//! flow's socket; CLOSE ends it. A flow never waits for another: each has
//! its own socket, its own queue, and sends its replies without waiting.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use relaygate_common::{
    dgram::{CloseReason, Frame},
    protocol::StreamStatus,
};
use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};

use super::{socket, UdpAgent, FLOW_IDLE, MAX_FLOWS};
use crate::{config::TunnelConfig, deliver::DeliveryMode, metrics::Metrics};

/// Node-bound datagrams one flow may queue; beyond, dropped.
const FLOW_QUEUE: usize = 256;
/// The longest one flow waits for its socket to take a datagram.
const SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

struct Flow {
    tx: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
}

/// Serves the channel until it closes; its flows end with it.
pub(super) async fn serve(agent: &UdpAgent, conn: &quinn::Connection) {
    let mut flows: HashMap<u32, Flow> = HashMap::new();
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<(u32, CloseReason)>();
    let m = &agent.metrics.udp;
    loop {
        let d = tokio::select! {
            r = conn.read_datagram() => match r {
                Ok(d) => d,
                Err(_) => break,
            },
            Some((id, reason)) = ended.recv() => {
                if flows.remove(&id).is_some() {
                    m.flows_active.dec();
                    m.closed(reason.as_str());
                    send(conn, &agent.metrics, Frame::Close { flow: id, reason }.encode());
                }
                continue;
            }
        };
        match Frame::decode(&d) {
            Ok(Frame::Data { flow, payload }) => match flows.get(&flow) {
                Some(f) => {
                    let at = d.len() - payload.len();
                    if f.tx.try_send(d.slice(at..)).is_err() {
                        m.drop("flow_queue_full");
                    }
                }
                None => {
                    // The gateway thinks it open (this agent restarted, or
                    // it ended here): it opens it again on this answer.
                    m.drop("unknown_flow");
                    let close = Frame::Close {
                        flow,
                        reason: CloseReason::UnknownFlow,
                    };
                    send(conn, &agent.metrics, close.encode());
                }
            },
            Ok(Frame::Open {
                flow,
                tunnel,
                remote,
                payload,
            }) => {
                let at = d.len() - payload.len();
                let payload = d.slice(at..);
                if let Some(f) = flows.get(&flow) {
                    // A repeated OPEN (our OPENED was lost): data, and answer again.
                    let _ = f.tx.try_send(payload);
                    let ok = Frame::Opened {
                        flow,
                        status: StreamStatus::Connected,
                    };
                    send(conn, &agent.metrics, ok.encode());
                    continue;
                }
                let status = match open(agent, conn, flow, tunnel, remote, &flows, &ended_tx).await
                {
                    Ok(f) => {
                        let _ = f.tx.try_send(payload);
                        flows.insert(flow, f);
                        m.flows_active.inc();
                        m.flows_opened.inc();
                        StreamStatus::Connected
                    }
                    Err(status) => status,
                };
                send(
                    conn,
                    &agent.metrics,
                    Frame::Opened { flow, status }.encode(),
                );
            }
            Ok(Frame::Close { flow, reason }) => {
                if let Some(f) = flows.remove(&flow) {
                    f.task.abort();
                    m.flows_active.dec();
                    m.closed(reason.as_str());
                }
            }
            Ok(Frame::Opened { .. }) | Err(_) => agent.metrics.bad_input("dgram_frame"),
        }
    }
    for (_, f) in flows.drain() {
        f.task.abort();
        m.flows_active.dec();
        m.closed("channel_closed");
    }
}

/// A new flow: its socket toward the tunnel's node, and its reply task.
async fn open(
    agent: &UdpAgent,
    conn: &quinn::Connection,
    flow: u32,
    tunnel: &str,
    remote: SocketAddr,
    flows: &HashMap<u32, Flow>,
    ended: &mpsc::UnboundedSender<(u32, CloseReason)>,
) -> Result<Flow, StreamStatus> {
    let Some(t) = agent.tunnels.iter().find(|t| t.name.as_str() == tunnel) else {
        agent.metrics.udp.drop("unknown_tunnel");
        return Err(StreamStatus::UnknownTunnel);
    };
    if flows.len() >= MAX_FLOWS {
        agent.metrics.udp.drop("flows_busy");
        return Err(StreamStatus::Busy);
    }
    let mode = t.deliver;
    let sock = match connect(t, remote, agent.mark).await {
        Ok((s, bound)) => {
            agent.metrics.delivered(mode.as_str(), bound.as_str());
            s
        }
        Err(e) => {
            tracing::warn!(tunnel = %t.name, target = %t.target, %remote, error = %e, "cannot open a UDP flow to the target");
            agent.metrics.delivered(mode.as_str(), "target_unreachable");
            return Err(StreamStatus::TargetUnreachable);
        }
    };
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let task = tokio::spawn(run(
        flow,
        sock,
        rx,
        conn.clone(),
        ended.clone(),
        agent.metrics.clone(),
    ));
    Ok(Flow { tx, task })
}

async fn connect(
    t: &TunnelConfig,
    remote: SocketAddr,
    mark: u32,
) -> std::io::Result<(UdpSocket, socket::Bound)> {
    let target = tokio::net::lookup_host((t.target.host.as_str(), t.target.port))
        .await?
        .find(|a| t.deliver != DeliveryMode::Transparent || a.is_ipv4() == remote.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "target resolves to no address of the remote's family",
            )
        })?;
    match t.deliver {
        DeliveryMode::Transparent => socket::transparent(remote, target, mark),
        _ => socket::plain(target).await,
    }
}

/// One flow: node-bound datagrams from its queue to its socket, the node's
/// replies to the channel, until it idles or the node's port refuses.
async fn run(
    flow: u32,
    sock: UdpSocket,
    mut rx: mpsc::Receiver<Bytes>,
    conn: quinn::Connection,
    ended: mpsc::UnboundedSender<(u32, CloseReason)>,
    metrics: Arc<Metrics>,
) {
    let mut buf = vec![0u8; 65_536];
    let idle = tokio::time::sleep(FLOW_IDLE);
    tokio::pin!(idle);
    let reason = loop {
        tokio::select! {
            r = sock.recv(&mut buf) => match r {
                Ok(n) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + FLOW_IDLE);
                    let f = Frame::Data { flow, payload: &buf[..n] }.encode();
                    if send(&conn, &metrics, f) {
                        metrics.udp.carried("outbound");
                    }
                }
                // An ICMP port unreachable from the node: nothing listens.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break CloseReason::TargetRefused,
                Err(_) => continue,
            },
            d = rx.recv() => match d {
                Some(d) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + FLOW_IDLE);
                    // Awaited, briefly: a new socket is not known writable
                    // until the reactor says so, and its first datagram is
                    // the flow's first (a QUIC Initial, say).
                    match tokio::time::timeout(SEND_WAIT, sock.send(&d)).await {
                        Ok(Ok(_)) => metrics.udp.carried("inbound"),
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => break CloseReason::TargetRefused,
                        Ok(Err(_)) | Err(_) => metrics.udp.drop("socket_full"),
                    }
                }
                None => return,
            },
            () = &mut idle => break CloseReason::Idle,
        }
    };
    let _ = ended.send((flow, reason));
}

/// Sends a frame without waiting; false (and counted) when it cannot go.
fn send(conn: &quinn::Connection, metrics: &Metrics, f: Vec<u8>) -> bool {
    match conn.max_datagram_size() {
        Some(max) if f.len() <= max => {}
        _ => {
            metrics.udp.drop("too_large");
            return false;
        }
    }
    if conn.datagram_send_buffer_space() < f.len() {
        metrics.udp.drop("channel_full");
        return false;
    }
    conn.send_datagram(Bytes::from(f)).is_ok()
}
