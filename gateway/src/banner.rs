//! What the gateway tells its operator and agents at start: the addresses
//! agents dial (advertised ones, else what it listens on), and the banner
//! with the command that starts an agent.

use libp2p::{multiaddr::Protocol, Multiaddr};
use relaygate_common::names::Secret;

use crate::config::GatewayConfig;

/// Addresses an agent can dial: advertised ones, else the concrete listen addresses.
pub fn dial_addrs(
    advertise: &[Multiaddr],
    listening: &[Multiaddr],
    peer: &libp2p::PeerId,
) -> Vec<Multiaddr> {
    let base: Vec<Multiaddr> = if advertise.is_empty() {
        listening.to_vec()
    } else {
        advertise.to_vec()
    };
    let mut out: Vec<Multiaddr> = base
        .into_iter()
        .map(|a| a.with(Protocol::P2p(*peer)))
        .collect();
    // QUIC first: it is what agents try first.
    out.sort_by_key(|a| !a.iter().any(|p| matches!(p, Protocol::QuicV1)));
    out.dedup();
    out
}

pub fn print_banner(
    cfg: &GatewayConfig,
    listening: &[Multiaddr],
    peer: &libp2p::PeerId,
    admin: std::net::SocketAddr,
    token: Option<&(Secret, bool)>,
) {
    let addrs = dial_addrs(&cfg.advertise, listening, peer);
    let mut s = String::new();
    s.push_str(&format!(
        "relaygate-gateway {} is up\n",
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str(&format!("  peer id   {peer}\n"));
    for a in &addrs {
        s.push_str(&format!("  address   {a}\n"));
    }
    s.push_str(&format!(
        "  ports     {} (leased to tunnels)\n",
        cfg.leases.port_range
    ));
    s.push_str(&format!("  admin     http://{admin}/v1/agents\n"));
    s.push_str(&format!("  console   http://{admin}/ui/\n\n"));
    // One QUIC and one TCP address of the first host: QUIC is tried first, TCP is the fallback.
    let is_quic = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::QuicV1));
    let first_host = addrs.first().and_then(|a| a.iter().next());
    let same_host: Vec<&Multiaddr> = addrs
        .iter()
        .filter(|a| a.iter().next() == first_host)
        .collect();
    let gw: Vec<String> = same_host
        .iter()
        .find(|a| is_quic(a))
        .into_iter()
        .chain(same_host.iter().find(|a| !is_quic(a)))
        .map(|a| format!("--gateway {a}"))
        .collect();
    s.push_str("Run an agent next to your node with:\n");
    match token {
        Some((t, true)) => {
            // In the environment, not on the command line, where `ps` shows it.
            s.push_str(&format!(
                "  RELAYGATE_GATEWAY__TOKEN={} relaygate-agent {} --tunnel node=127.0.0.1:9905\n",
                t.expose(),
                gw.join(" ")
            ));
            s.push_str(&format!("(the join token was just created in {}; it is shown only now, `relaygate-gateway token` prints it again)\n", cfg.token_file().display()));
        }
        Some((_, false)) => {
            s.push_str(&format!(
                "  RELAYGATE_GATEWAY__TOKEN=<join token> relaygate-agent {} --tunnel node=127.0.0.1:9905\n",
                gw.join(" ")
            ));
            s.push_str("(print the join token with `relaygate-gateway token`)\n");
        }
        None => {
            s.push_str(&format!(
                "  relaygate-agent {} --tunnel node=127.0.0.1:9905\n",
                gw.join(" ")
            ));
            s.push_str("(join tokens are off: add the agent's peer id to admission.allow)\n");
        }
    }
    print!("{s}");
}
