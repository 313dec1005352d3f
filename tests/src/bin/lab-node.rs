//! lab-node: a plain rust-libp2p node for the NAT lab and end-to-end tests.
//! TCP (Noise + yamux) and QUIC-v1, identify and ping; every event is one JSON
//! object per line on stdout, so tests can wait for exactly what they need.
//!
//!   lab-node listen --listen /ip4/203.0.113.10/tcp/4001 [--seed 7] [--deny-private-sources]
//!   lab-node dial --addr /ip4/203.0.113.10/tcp/4001/p2p/<id> [--expect-peer <id>] [--pings 3]
//!                 [--timeout-secs 20] [--listen <multiaddr>...]
//!
//!   lab-node reserve --relay /ip4/.../tcp/4001/p2p/<relay> [--seed 9]
//!
//! It is also a circuit relay v2 client: `dial` takes `/p2p-circuit` addresses,
//! and `reserve` holds a reservation on a relay (exit 1 when it is refused).
//!
//! Events: listening, connected, identify, ping, ping_failed, closed, denied,
//! dial_error, incoming_error, listener_error, reservation, circuit;
//! dial adds done / error and exits 0 / 1 (and dcutr with --try-dcutr, echo
//! with --echo-bytes: a `listen` node echoes streams of /relaygate-lab/echo/1);
//! reserve adds reservation_failed.

use std::{collections::HashMap, io::Write, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use libp2p::{
    core::transport::ListenerId,
    core::ConnectedPoint,
    identify, identity,
    multiaddr::Protocol,
    noise, ping,
    swarm::{dial_opts::DialOpts, DialError, NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder,
};
use serde_json::{json, Value};

const PROTOCOL_VERSION: &str = "/relaygate-lab/1.0.0";
const AGENT_VERSION: &str = "lab-node";

#[derive(Parser)]
#[command(about = "A rust-libp2p node that reports its events as JSON lines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen and report events until killed.
    Listen {
        /// Multiaddrs to listen on (repeat the flag or list several).
        #[arg(long, required = true, num_args = 1..)]
        listen: Vec<Multiaddr>,
        /// Refuse inbound connections from private source addresses, like
        /// go-libp2p's private-address connection gater.
        #[arg(long)]
        deny_private_sources: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Dial, wait for pings from the remote, exit 0 (done) or 1 (error).
    Dial {
        #[arg(long)]
        addr: Multiaddr,
        /// Fail unless the remote has this peer id (default: the addr's /p2p/ part).
        #[arg(long)]
        expect_peer: Option<PeerId>,
        /// Successful pings to wait for.
        #[arg(long, default_value_t = 3)]
        pings: u32,
        #[arg(long, default_value_t = 20)]
        timeout_secs: u64,
        /// Listen here first, so the dial leaves from this port (libp2p port
        /// reuse, TCP and QUIC): a fixed source port shows how a NAT maps it.
        #[arg(long, num_args = 1..)]
        listen: Vec<Multiaddr>,
        /// After the pings, open a DCUtR stream to the remote over the
        /// connection and report how it was answered (`dcutr` event), then
        /// ping once more on the same connection.
        #[arg(long)]
        try_dcutr: bool,
        /// After the pings, send this many bytes on an echo stream to the
        /// remote (a `lab-node listen`) and check they come back the same
        /// (`echo` event; a mismatch is an error).
        #[arg(long, default_value_t = 0)]
        echo_bytes: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Reserve on a relay and answer whoever comes through it, until killed.
    Reserve {
        /// The relay's address, ending in /p2p/<relay peer id>.
        #[arg(long)]
        relay: Multiaddr,
        #[command(flatten)]
        common: Common,
    },
    /// A plain TCP echo server that reports every peer address it accepts.
    TcpEcho {
        #[arg(long, required = true, num_args = 1..)]
        listen: Vec<std::net::SocketAddr>,
    },
    /// Connect to an echo service and stream a known byte pattern for `seconds`,
    /// checking every echoed byte; exit 0 when all came back exactly.
    TcpStream {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Pace, in KiB per second.
        #[arg(long, default_value_t = 2048)]
        kib_per_sec: u64,
    },
    /// GET `path` from an HTTP server (an admin API inside a namespace) and print the body.
    HttpGet {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        path: String,
    },
    /// Connect, send `data`, half-close, print what came back; exit 0 when it echoed.
    TcpSend {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "hello")]
        data: String,
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

#[derive(Args)]
struct Common {
    /// Deterministic Ed25519 key from the 32 bytes [N; 32] (random without).
    #[arg(long)]
    seed: Option<u8>,
    /// Ping period; short so tests see several pings quickly.
    #[arg(long, default_value_t = 1000)]
    ping_interval_ms: u64,
}

#[derive(NetworkBehaviour)]
struct Node {
    gate: gate::Gate,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: libp2p::relay::client::Behaviour,
    /// Raw streams, for `dial --try-dcutr` (accepts none).
    streams: relaygate_common::streams::Behaviour,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::TcpEcho { listen } => plain_tcp::echo(listen).await,
        Cmd::TcpStream {
            addr,
            seconds,
            kib_per_sec,
        } => plain_tcp::stream(addr, Duration::from_secs(seconds), kib_per_sec).await,
        Cmd::HttpGet { addr, path } => {
            let cfg = relaygate_common::admin::AdminConfig::default();
            let (status, body) = relaygate_common::admin::get(addr, &cfg, &path)
                .map_err(|e| anyhow::anyhow!("GET {path}: {e}"))?;
            print!("{body}");
            if status != 200 {
                anyhow::bail!("GET {path}: status {status}");
            }
            Ok(())
        }
        Cmd::TcpSend {
            addr,
            data,
            timeout_secs,
        } => plain_tcp::send(addr, data, Duration::from_secs(timeout_secs)).await,
        Cmd::Listen {
            listen,
            deny_private_sources,
            common,
        } => {
            let (mut swarm, _, mut echo) = build(&common, deny_private_sources)?;
            // Echoes every stream of ECHO_PROTOCOL back to its sender.
            tokio::spawn(async move {
                while let Some(inc) = echo.recv().await {
                    tokio::spawn(async move {
                        use futures::{AsyncReadExt, AsyncWriteExt};
                        let (mut r, mut w) = inc.stream.split();
                        let _ = futures::io::copy(&mut r, &mut w).await;
                        let _ = w.close().await;
                    });
                }
            });
            for addr in listen {
                swarm
                    .listen_on(addr.clone())
                    .with_context(|| format!("listen on {addr}"))?;
            }
            loop {
                let ev = swarm.select_next_some().await;
                report(&swarm, &ev);
            }
        }
        Cmd::Reserve { relay, common } => {
            let (mut swarm, _, _) = build(&common, false)?;
            let circuit = relay.with(Protocol::P2pCircuit);
            let id = swarm
                .listen_on(circuit.clone())
                .with_context(|| format!("listen on {circuit}"))?;
            loop {
                let ev = swarm.select_next_some().await;
                report(&swarm, &ev);
                if let SwarmEvent::ListenerClosed {
                    listener_id,
                    reason: Err(e),
                    ..
                } = &ev
                {
                    if *listener_id == id {
                        emit(json!({"event": "reservation_failed", "reason": format!("{e:?}")}));
                        std::process::exit(1);
                    }
                }
            }
        }
        Cmd::Dial {
            addr,
            expect_peer,
            pings,
            timeout_secs,
            listen,
            try_dcutr,
            echo_bytes,
            common,
        } => {
            let (mut swarm, control, _) = build(&common, false)?;
            let extra = Extra {
                dcutr: try_dcutr,
                echo_bytes,
                control,
            };
            let mut unbound = HashMap::new();
            for addr in &listen {
                let id = swarm
                    .listen_on(addr.clone())
                    .with_context(|| format!("listen on {addr}"))?;
                unbound.insert(id, is_unspecified(addr));
            }
            let expect = expect_peer.or_else(|| match addr.iter().last() {
                Some(Protocol::P2p(peer)) => Some(peer),
                _ => None,
            });
            let outcome = tokio::time::timeout(
                Duration::from_secs(timeout_secs),
                dial(swarm, unbound, addr, expect, pings, extra),
            )
            .await
            .unwrap_or_else(|_| Err(format!("timeout after {timeout_secs}s")));
            match outcome {
                Ok(peer) => {
                    emit(json!({"event": "done", "peer": peer.to_string(), "pings": pings}))
                }
                Err(reason) => {
                    emit(json!({"event": "error", "reason": reason}));
                    std::process::exit(1);
                }
            }
            Ok(())
        }
    }
}

/// Waits for `unbound` listeners, dials `addr` and returns the remote once `pings` pings to it succeeded.
async fn dial(
    mut swarm: Swarm<Node>,
    mut unbound: HashMap<ListenerId, bool>,
    addr: Multiaddr,
    expect: Option<PeerId>,
    pings: u32,
    extra: Extra,
) -> Result<PeerId, String> {
    // Dial only once the listeners are bound, or the dial picks a random port.
    // A wildcard listener reports loopback and LAN addresses one by one, and
    // port reuse only applies to a non-loopback remote once a non-loopback
    // address is registered.
    while !unbound.is_empty() {
        let ev = swarm.select_next_some().await;
        report(&swarm, &ev);
        match ev {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } if unbound.get(&listener_id) == Some(&false) || !is_loopback(&address) => {
                unbound.remove(&listener_id);
            }
            SwarmEvent::ListenerClosed { .. } | SwarmEvent::ListenerError { .. } => {
                return Err("a --listen address failed".into())
            }
            _ => {}
        }
    }
    // Without a peer id in DialOpts libp2p accepts whoever answers; we check below.
    let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
    swarm.dial(opts).map_err(|e| format!("dial {addr}: {e}"))?;
    let mut remote = None;
    let mut seen = 0;
    loop {
        let ev = swarm.select_next_some().await;
        report(&swarm, &ev);
        match ev {
            // Inbound connections (a dialing node may also listen) are not the dial's answer.
            // Through a relay, the connection to the relay itself comes first.
            SwarmEvent::ConnectionEstablished { endpoint, .. }
                if is_circuit(&addr) && !endpoint.is_relayed() => {}
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } if endpoint.is_dialer() => {
                if let Some(want) = expect.filter(|want| *want != peer_id) {
                    return Err(format!("wrong peer id: expected {want}, got {peer_id}"));
                }
                remote = Some(peer_id);
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => return Err(dial_failure(&error)),
            // E.g. a gater on the other side: fail now rather than at the timeout.
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } if Some(peer_id) == remote => {
                let cause = cause.map_or("closed by the remote".into(), |c| c.to_string());
                return Err(format!("connection closed after {seen} pings: {cause}"));
            }
            SwarmEvent::Behaviour(NodeEvent::Ping(ping::Event {
                peer,
                result: Ok(_),
                ..
            })) if Some(peer) == remote => {
                seen += 1;
                if seen == pings {
                    if extra.echo_bytes > 0 {
                        echo(&mut swarm, &extra.control, peer, extra.echo_bytes).await?;
                    }
                    if !extra.dcutr {
                        return Ok(peer);
                    }
                    try_dcutr(&mut swarm, &extra.control, peer).await;
                } else if seen > pings {
                    // The connection still works after the DCUtR attempt.
                    return Ok(peer);
                }
            }
            _ => {}
        }
    }
}

/// What `dial` does after its pings.
struct Extra {
    dcutr: bool,
    echo_bytes: usize,
    control: relaygate_common::streams::Control,
}

/// Streams a `lab-node listen` echoes back.
const ECHO_PROTOCOL: &str = "/relaygate-lab/echo/1";

/// Sends `n` bytes on an echo stream to `peer` while driving the swarm and
/// checks they come back the same.
async fn echo(
    swarm: &mut Swarm<Node>,
    control: &relaygate_common::streams::Control,
    peer: PeerId,
    n: usize,
) -> Result<(), String> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let started = std::time::Instant::now();
    let run = async {
        let s = control
            .open_stream(peer, libp2p::StreamProtocol::new(ECHO_PROTOCOL))
            .await
            .map_err(|e| format!("echo stream: {e}"))?;
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&data).await?;
            w.close().await
        };
        let mut back = Vec::with_capacity(n);
        let (sent, read) = futures::join!(send, r.read_to_end(&mut back));
        sent.map_err(|e| format!("echo write: {e}"))?;
        read.map_err(|e| format!("echo read: {e}"))?;
        Ok::<Vec<u8>, String>(back)
    };
    tokio::pin!(run);
    let back = loop {
        tokio::select! {
            r = &mut run => break r?,
            ev = swarm.select_next_some() => report(swarm, &ev),
        }
    };
    let same = back == data;
    emit(
        json!({"event": "echo", "bytes": n, "same": same, "ms": started.elapsed().as_millis() as u64}),
    );
    if same {
        Ok(())
    } else {
        Err(format!(
            "echo came back different: {} of {n} bytes",
            back.len()
        ))
    }
}

/// Opens a DCUtR stream to `peer` while driving the swarm, and reports how
/// it was answered: `refused` (the remote does not take it there), `accepted`,
/// or `timeout` (a hang).
async fn try_dcutr(
    swarm: &mut Swarm<Node>,
    control: &relaygate_common::streams::Control,
    peer: PeerId,
) {
    let started = std::time::Instant::now();
    let open = tokio::time::timeout(
        Duration::from_secs(5),
        control.open_stream(peer, libp2p::StreamProtocol::new("/libp2p/dcutr")),
    );
    tokio::pin!(open);
    let result = loop {
        tokio::select! {
            r = &mut open => break match r {
                Ok(Ok(_)) => "accepted".to_string(),
                Ok(Err(e)) => format!("refused: {e}"),
                Err(_) => "timeout".to_string(),
            },
            ev = swarm.select_next_some() => report(swarm, &ev),
        }
    };
    emit(json!({"event": "dcutr", "result": result, "ms": started.elapsed().as_millis() as u64}));
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => ip.is_unspecified(),
        _ => false,
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

fn dial_failure(error: &DialError) -> String {
    match error {
        DialError::WrongPeerId { obtained, .. } => format!("wrong peer id: got {obtained}"),
        other => format!("dial failed: {other}"),
    }
}

type Built = (
    Swarm<Node>,
    relaygate_common::streams::Control,
    tokio::sync::mpsc::Receiver<relaygate_common::streams::Incoming>,
);

fn build(common: &Common, deny_private_sources: bool) -> anyhow::Result<Built> {
    let key = match common.seed {
        Some(n) => identity::Keypair::ed25519_from_bytes([n; 32]).context("seed key")?,
        None => identity::Keypair::generate_ed25519(),
    };
    let ping_every = Duration::from_millis(common.ping_interval_ms.max(1));
    let (streams, control, incoming) =
        relaygate_common::streams::new(vec![libp2p::StreamProtocol::new(ECHO_PROTOCOL)], 64);
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay| Node {
            relay,
            streams,
            gate: gate::Gate {
                deny_private_sources,
            },
            identify: identify::Behaviour::new(
                identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(AGENT_VERSION.into()),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(ping_every)),
        })?
        // Pings do not keep a connection alive; tests want it to stay.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok((swarm, control, incoming))
}

/// Prints the JSON line for an event (nothing for uninteresting ones).
fn report(swarm: &Swarm<Node>, ev: &SwarmEvent<NodeEvent>) {
    let line = match ev {
        SwarmEvent::NewListenAddr { address, .. } => json!({
            "event": "listening", "peer_id": swarm.local_peer_id().to_string(), "addr": address.to_string(),
        }),
        SwarmEvent::ConnectionEstablished {
            peer_id, endpoint, ..
        } => json!({
            "event": "connected", "peer": peer_id.to_string(),
            "remote_addr": endpoint.get_remote_address().to_string(),
            "endpoint": if matches!(endpoint, ConnectedPoint::Listener { .. }) { "listener" } else { "dialer" },
        }),
        SwarmEvent::ConnectionClosed {
            peer_id,
            endpoint,
            cause,
            ..
        } => json!({
            "event": "closed", "peer": peer_id.to_string(),
            "remote_addr": endpoint.get_remote_address().to_string(),
            "cause": cause.as_ref().map_or("closed".to_string(), |c| c.to_string()),
        }),
        SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => json!({
            "event": "dial_error", "peer": peer_id.map(|p| p.to_string()), "error": error.to_string(),
        }),
        // Denials were already reported by the gate, with their reason.
        SwarmEvent::IncomingConnectionError {
            error: libp2p::swarm::ListenError::Denied { .. },
            ..
        } => return,
        SwarmEvent::IncomingConnectionError {
            send_back_addr,
            error,
            ..
        } => json!({
            "event": "incoming_error", "remote_addr": send_back_addr.to_string(), "error": error.to_string(),
        }),
        SwarmEvent::ListenerError { error, .. } => {
            json!({"event": "listener_error", "error": error.to_string()})
        }
        SwarmEvent::ListenerClosed {
            addresses, reason, ..
        } => json!({
            "event": "listener_error", "addrs": strings(addresses), "error": format!("closed: {reason:?}"),
        }),
        SwarmEvent::Behaviour(NodeEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            ..
        })) => json!({
            "event": "identify", "peer": peer_id.to_string(), "observed_addr": info.observed_addr.to_string(),
            "listen_addrs": strings(&info.listen_addrs), "agent_version": info.agent_version,
            "protocol_version": info.protocol_version,
        }),
        SwarmEvent::Behaviour(NodeEvent::Ping(ping::Event { peer, result, .. })) => match result {
            Ok(rtt) => {
                json!({"event": "ping", "peer": peer.to_string(), "rtt_us": rtt.as_micros() as u64})
            }
            Err(e) => {
                json!({"event": "ping_failed", "peer": peer.to_string(), "error": e.to_string()})
            }
        },
        SwarmEvent::Behaviour(NodeEvent::Relay(e)) => {
            use libp2p::relay::client::Event as R;
            // libp2p does not export the Limit type's name, so a macro reads it.
            macro_rules! limit {
                ($l:expr) => {
                    match $l {
                        Some(l) => json!({
                            "duration_secs": l.duration().map(|d| d.as_secs()),
                            "data_bytes": l.data_in_bytes(),
                        }),
                        None => Value::Null,
                    }
                };
            }
            match e {
                R::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    limit: l,
                } => json!({
                    "event": "reservation", "relay": relay_peer_id.to_string(),
                    "renewal": renewal, "limit": limit!(l),
                }),
                R::OutboundCircuitEstablished {
                    relay_peer_id,
                    limit: l,
                } => json!({
                    "event": "circuit", "direction": "outbound", "relay": relay_peer_id.to_string(),
                    "limit": limit!(l),
                }),
                R::InboundCircuitEstablished {
                    src_peer_id,
                    limit: l,
                } => json!({
                    "event": "circuit", "direction": "inbound", "peer": src_peer_id.to_string(),
                    "limit": limit!(l),
                }),
            }
        }
        SwarmEvent::Behaviour(NodeEvent::Gate(never)) => match *never {},
        SwarmEvent::Behaviour(NodeEvent::Streams(never)) => match *never {},
        _ => return,
    };
    emit(line);
}

fn strings(addrs: &[Multiaddr]) -> Vec<String> {
    addrs.iter().map(ToString::to_string).collect()
}

/// One line per event, flushed at once: tests read it while we run.
fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// A connection gater refusing inbound connections from private addresses.
mod gate {
    use std::{
        convert::Infallible,
        net::{Ipv4Addr, Ipv6Addr},
        task::{Context, Poll},
    };

    use libp2p::{
        core::{transport::PortUse, Endpoint},
        multiaddr::Protocol,
        swarm::{
            dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
            THandlerInEvent, THandlerOutEvent, ToSwarm,
        },
        Multiaddr, PeerId,
    };
    use serde_json::json;

    pub struct Gate {
        pub deny_private_sources: bool,
    }

    impl NetworkBehaviour for Gate {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = Infallible;

        // `remote_addr` is the send-back address: the source the connection came from.
        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            peer: PeerId,
            _local_addr: &Multiaddr,
            remote_addr: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            match private_class(remote_addr).filter(|_| self.deny_private_sources) {
                None => Ok(dummy::ConnectionHandler),
                Some(class) => {
                    let reason = format!("private source address ({class})");
                    super::emit(json!({
                        "event": "denied", "remote_addr": remote_addr.to_string(),
                        "peer": peer.to_string(), "reason": reason,
                    }));
                    Err(ConnectionDenied::new(reason))
                }
            }
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, _: FromSwarm) {}

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            ev: THandlerOutEvent<Self>,
        ) {
            match ev {}
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
            Poll::Pending
        }
    }

    /// Which private range the address's IP is in, if any. 203.0.113.0/24
    /// (the lab's internet) counts as public on purpose.
    pub fn private_class(addr: &Multiaddr) -> Option<&'static str> {
        match addr.iter().next()? {
            Protocol::Ip4(ip) => v4_class(ip),
            Protocol::Ip6(ip) => ip.to_ipv4_mapped().map_or_else(|| v6_class(ip), v4_class),
            _ => None,
        }
    }

    fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
        let [a, b, ..] = ip.octets();
        Some(match () {
            _ if ip.is_loopback() => "loopback",
            _ if ip.is_private() => "rfc1918",
            _ if a == 100 && b & 0xc0 == 64 => "shared 100.64.0.0/10",
            _ if ip.is_link_local() => "link-local",
            _ if a == 198 && b & 0xfe == 18 => "benchmark 198.18.0.0/15",
            _ if ip.is_unspecified() => "unspecified",
            _ => return None,
        })
    }

    fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
        let first = ip.segments()[0];
        Some(match () {
            _ if ip.is_loopback() => "loopback",
            _ if first & 0xfe00 == 0xfc00 => "unique-local fc00::/7",
            _ if first & 0xffc0 == 0xfe80 => "link-local",
            _ if ip.is_unspecified() => "unspecified",
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::private_class;

        fn class(a: &str) -> Option<&'static str> {
            private_class(&a.parse().unwrap())
        }

        #[test]
        fn private_ranges() {
            for a in [
                "/ip4/127.0.0.1/tcp/1",
                "/ip4/10.1.2.3/tcp/1",
                "/ip4/172.16.0.1/tcp/1",
                "/ip4/192.168.1.1/tcp/1",
                "/ip4/100.64.0.1/tcp/1",
                "/ip4/169.254.1.1/tcp/1",
                "/ip4/198.18.1.10/tcp/1",
                "/ip4/198.19.255.1/tcp/1",
                "/ip6/::1/tcp/1",
                "/ip6/fd00:1::10/tcp/1",
                "/ip6/fe80::1/tcp/1",
                "/ip6/::ffff:10.0.0.1/tcp/1",
            ] {
                assert!(class(a).is_some(), "{a} should be private");
            }
            for a in [
                "/ip4/203.0.113.101/tcp/1",
                "/ip4/198.51.100.7/udp/1/quic-v1",
                "/ip4/100.128.0.1/tcp/1",
                "/ip4/198.20.0.1/tcp/1",
                "/ip6/2001:db8:1::101/tcp/1",
            ] {
                assert_eq!(class(a), None, "{a} should be public");
            }
        }
    }
}

/// Plain TCP tools: what a tunnel target and a remote client see, without libp2p.
mod plain_tcp {
    use std::{net::SocketAddr, time::Duration};

    use serde_json::json;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::emit;

    /// Byte `i` of the stream: a pattern that catches loss, duplication and reordering.
    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(2_654_435_761) >> 13) as u8
    }

    pub async fn stream(
        addr: SocketAddr,
        length: Duration,
        kib_per_sec: u64,
    ) -> anyhow::Result<()> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let local = s.local_addr()?.to_string();
        emit(json!({"event": "connected", "local": local}));
        let (mut r, mut w) = s.into_split();
        let chunk = 16 * 1024u64;
        let per_tick = (kib_per_sec * 1024 / 20).max(1);
        let writer = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut sent: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while start.elapsed() < length {
                tick.tick().await;
                let mut budget = per_tick;
                while budget > 0 {
                    let n = budget.min(chunk);
                    let buf: Vec<u8> = (sent..sent + n).map(pattern).collect();
                    w.write_all(&buf).await?;
                    sent += n;
                    budget -= n;
                }
            }
            w.shutdown().await?;
            anyhow::Ok(sent)
        });
        let mut received: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = tokio::time::Instant::now();
        let mut bad = None;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(15), r.read(&mut buf)).await??;
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                if bad.is_none() && *b != pattern(received + k as u64) {
                    bad = Some(received + k as u64);
                }
            }
            received += n as u64;
            if last.elapsed() >= Duration::from_millis(500) {
                emit(json!({"event": "progress", "received": received}));
                last = tokio::time::Instant::now();
            }
        }
        let sent = writer.await??;
        let ok = bad.is_none() && received == sent;
        emit(
            json!({"event": "stream_done", "sent": sent, "received": received, "ok": ok, "first_bad": bad}),
        );
        if !ok {
            anyhow::bail!("echo differs: sent {sent}, received {received}, first bad byte {bad:?}");
        }
        Ok(())
    }

    pub async fn echo(listen: Vec<SocketAddr>) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for addr in listen {
            let l = TcpListener::bind(addr).await?;
            emit(json!({"event": "listening", "addr": l.local_addr()?.to_string()}));
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, peer)) = l.accept().await {
                    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    emit(json!({"event": "accepted", "peer": peer.to_string(), "local": local}));
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        Ok(())
    }

    pub async fn send(addr: SocketAddr, data: String, timeout: Duration) -> anyhow::Result<()> {
        let run = async {
            let mut s = TcpStream::connect(addr).await?;
            let local = s.local_addr()?.to_string();
            s.write_all(data.as_bytes()).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            Ok::<_, std::io::Error>((local, back))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok((local, back))) if back == data.as_bytes() => {
                emit(json!({"event": "echoed", "local": local, "data": data}));
                Ok(())
            }
            Ok(Ok((_, back))) => {
                emit(json!({"event": "error", "reason": format!("got {} bytes back", back.len())}));
                std::process::exit(1)
            }
            Ok(Err(e)) => {
                emit(json!({"event": "error", "reason": e.to_string()}));
                std::process::exit(1)
            }
            Err(_) => {
                emit(json!({"event": "error", "reason": "timeout"}));
                std::process::exit(1)
            }
        }
    }
}
