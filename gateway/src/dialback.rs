//! Dial-back for `relaygate-agent doctor`: the gateway connects to one of the
//! asking agent's leased ports from its own side (as a remote would) and says
//! whether the tunnel's target answered. An agent may only ask about its own
//! ports, granted by this gateway or, in a fleet, by another.

use std::{net::SocketAddr, time::Duration};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::protocol::{read_control, write_control, ControlMessage};
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::lease::Leases;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A refused target resets the public connection at once; one still open after this answered.
const HOLD: Duration = Duration::from_millis(1500);

pub async fn serve<S>(peer: PeerId, mut s: S, leases: &Leases, public_hosts: &[String])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let port = match tokio::time::timeout(CONNECT_TIMEOUT, read_control(&mut s)).await {
        Ok(Ok(ControlMessage::Dialback { port, .. })) => port,
        _ => return,
    };
    // In a fleet the lease may have been granted by another gateway: then
    // this one answers the port by forwarding, and the probe checks that too.
    let (reachable, detail) = match leases.holder(port).await {
        Ok(Some(key)) if key.agent == peer => probe(target(public_hosts, port.get()).await).await,
        Ok(_) => (false, format!("port {port} is not leased to {peer}")),
        Err(e) => (false, format!("cannot check the lease of port {port}: {e}")),
    };
    tracing::info!(%peer, %port, reachable, %detail, "dial-back");
    let _ = write_control(
        &mut s,
        &ControlMessage::DialbackResult { reachable, detail },
    )
    .await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
}

/// The first advertised host (resolved), else loopback: the gateway's own side either way.
async fn target(public_hosts: &[String], port: u16) -> SocketAddr {
    for h in public_hosts
        .iter()
        .filter_map(|h| h.parse::<Multiaddr>().ok())
    {
        let resolved = match h.iter().next() {
            Some(Protocol::Ip4(ip)) => Some(SocketAddr::from((ip, port))),
            Some(Protocol::Ip6(ip)) => Some(SocketAddr::from((ip, port))),
            Some(Protocol::Dns(n) | Protocol::Dns4(n) | Protocol::Dns6(n)) => {
                tokio::net::lookup_host((n.as_ref(), port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
            }
            _ => None,
        };
        if let Some(a) = resolved {
            return a;
        }
    }
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn probe(addr: SocketAddr) -> (bool, String) {
    let mut c = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return (
                false,
                format!(
                "cannot connect to {addr} from the gateway: {e} (is the session up? a firewall?)"
            ),
            )
        }
        Err(_) => {
            return (
                false,
                format!("connecting to {addr} from the gateway timed out (a firewall drops it?)"),
            )
        }
    };
    let mut b = [0u8; 1];
    match tokio::time::timeout(HOLD, c.read(&mut b)).await {
        Err(_) | Ok(Ok(1..)) => (true, format!("{addr} accepted and the target answered")),
        Ok(Ok(0)) | Ok(Err(_)) => (
            false,
            format!("{addr} accepted, then the connection was closed: the agent could not reach its target"),
        ),
    }
}
