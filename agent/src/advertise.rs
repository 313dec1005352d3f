//! Advertised addresses: where the node behind a tunnel can be reached, and
//! publishing them (log line, admin API, a file the node can read).
//!
//! File format: one line, the tunnel's multiaddrs separated by commas, e.g.
//! `/dns4/gw.example.com/tcp/20000/p2p/12D3KooW...` — what Teranode's
//! `p2p_advertise_addresses` and most libp2p nodes' announce settings take.

use std::path::Path;

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{names::LeasePort, protocol::Proto};

/// `/<host>/tcp/<port>[/p2p/<node>]` for each gateway host, then
/// `/<host>/udp/<port>/quic-v1[/p2p/<node>]` for a tunnel carrying UDP.
pub fn addresses(
    hosts: &[Multiaddr],
    port: LeasePort,
    node: Option<PeerId>,
    proto: Proto,
) -> Vec<Multiaddr> {
    let with_node = |a: Multiaddr| match node {
        Some(p) => a.with(Protocol::P2p(p)),
        None => a,
    };
    let tcp = hosts
        .iter()
        .filter(|_| proto.tcp())
        .map(|h| with_node(h.clone().with(Protocol::Tcp(port.get()))));
    let udp = hosts.iter().filter(|_| proto.udp()).map(|h| {
        with_node(
            h.clone()
                .with(Protocol::Udp(port.get()))
                .with(Protocol::QuicV1),
        )
    });
    tcp.chain(udp).collect()
}

/// Host parts to advertise: the fleet's shared name first (`fleet.advertise`
/// on the gateways), then the gateway's own, or the host this agent dialled.
pub fn hosts(
    fleet_hosts: &[String],
    public_hosts: &[String],
    dialled: &Multiaddr,
) -> Vec<Multiaddr> {
    let fleet: Vec<Multiaddr> = fleet_hosts.iter().filter_map(|h| h.parse().ok()).collect();
    let given: Vec<Multiaddr> = public_hosts.iter().filter_map(|h| h.parse().ok()).collect();
    if !given.is_empty() {
        return fleet.into_iter().chain(given).collect();
    }
    let own = dialled
        .iter()
        .next()
        .filter(|p| {
            matches!(
                p,
                Protocol::Ip4(_)
                    | Protocol::Ip6(_)
                    | Protocol::Dns(_)
                    | Protocol::Dns4(_)
                    | Protocol::Dns6(_)
            )
        })
        .map(|p| Multiaddr::empty().with(p));
    fleet.into_iter().chain(own).collect()
}

/// The file's one line.
pub fn file_line(addrs: &[Multiaddr]) -> String {
    let mut s = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    s
}

/// Writes the file whole (a node reading it never sees half a line), world-
/// readable: it holds public addresses, for a node that may run as another user.
pub fn write_file(path: &Path, addrs: &[Multiaddr]) -> std::io::Result<()> {
    relaygate_common::files::write_atomic(path, file_line(addrs).as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_advertised_addresses() {
        let node = PeerId::random();
        let hosts = hosts(
            &[],
            &["/dns4/gw.example.com".into(), "/ip4/203.0.113.7".into()],
            &"/ip4/1.2.3.4/udp/4001/quic-v1".parse().unwrap(),
        );
        let a = addresses(
            &hosts,
            LeasePort::new(9905).unwrap(),
            Some(node),
            Proto::Tcp,
        );
        assert_eq!(
            a[0].to_string(),
            format!("/dns4/gw.example.com/tcp/9905/p2p/{node}")
        );
        assert_eq!(
            a[1].to_string(),
            format!("/ip4/203.0.113.7/tcp/9905/p2p/{node}")
        );
        let fallback = super::hosts(
            &["/dns4/fleet.example.com".into()],
            &[],
            &"/ip4/203.0.113.9/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap(),
        );
        let fleet = addresses(&fallback, LeasePort::new(20000).unwrap(), None, Proto::Tcp);
        let both = addresses(&fallback, LeasePort::new(20000).unwrap(), None, Proto::Both);
        assert_eq!(both.len(), 4);
        assert_eq!(
            both[2].to_string(),
            "/dns4/fleet.example.com/udp/20000/quic-v1"
        );
        assert_eq!(both[3].to_string(), "/ip4/203.0.113.9/udp/20000/quic-v1");
        let udp = addresses(&fallback, LeasePort::new(20000).unwrap(), None, Proto::Udp);
        assert_eq!(udp, both[2..].to_vec());
        assert_eq!(fleet[0].to_string(), "/dns4/fleet.example.com/tcp/20000");
        assert_eq!(fleet[1].to_string(), "/ip4/203.0.113.9/tcp/20000");
        assert_eq!(
            file_line(&a[..1]),
            format!("/dns4/gw.example.com/tcp/9905/p2p/{node}\n")
        );
    }
}
