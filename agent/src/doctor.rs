//! `relaygate-agent doctor`: checks, one verdict each with what to fix: the
//! running agent's sessions and leases, the reachability of every gateway of
//! the fleet, a dial-back from each gateway to every leased port (through its
//! forward where it holds no session), the advertised addresses, and the
//! transparent-delivery rules.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{
    multiaddr::Protocol,
    swarm::{dial_opts::DialOpts, dial_opts::PeerCondition, SwarmEvent},
    Multiaddr, PeerId,
};
use relaygate_common::{
    names::LeasePort,
    protocol::{read_control, write_control, ControlMessage, DIALBACK_PROTOCOL, WIRE_VERSION},
    streams, transport,
};
use serde::Deserialize;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::{app::load_identity, config::AgentConfig, deliver::DeliveryMode, transparent};

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("[ ok ] {what}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.problems += 1;
        println!("[FAIL] {what}\n       fix: {fix}");
    }
}

/// The parts of the agent's `/v1/advertise` that doctor reads.
#[derive(Deserialize)]
struct Advertise {
    session: Option<serde_json::Value>,
    #[serde(default)]
    sessions: Vec<SessionView>,
    /// Every gateway of the fleet the agent knows of (empty before this field existed).
    #[serde(default)]
    fleet: Vec<FleetView>,
    tunnels: Vec<TunnelView>,
}

#[derive(Deserialize)]
struct SessionView {
    gateway: String,
    address: String,
}

#[derive(Deserialize)]
struct FleetView {
    gateway: String,
    addresses: Vec<String>,
    session: bool,
}

#[derive(Deserialize)]
struct TunnelView {
    name: String,
    port: Option<u16>,
    addresses: Vec<String>,
    /// The node's circuit addresses (absent before they existed).
    #[serde(default)]
    circuits: Vec<String>,
    error: Option<String>,
}

/// A gateway doctor dials: the configured one, or another of the fleet.
struct Target {
    peer: PeerId,
    addresses: Vec<Multiaddr>,
    /// Whether the running agent holds a session with it.
    session: bool,
}

/// The configured gateway first, then every other gateway the running
/// agent knows of, so each is checked as its own remotes would reach it.
fn targets(cfg: &AgentConfig, seed: PeerId, view: Option<&Advertise>) -> Vec<Target> {
    let held =
        |p: &PeerId| view.is_some_and(|v| v.sessions.iter().any(|s| s.gateway == p.to_string()));
    let mut out = vec![Target {
        peer: seed,
        addresses: cfg.gateway.addresses.clone(),
        session: held(&seed),
    }];
    for g in view.map(|v| v.fleet.as_slice()).unwrap_or_default() {
        let Ok(peer) = g.gateway.parse::<PeerId>() else {
            continue;
        };
        if out.iter().any(|t| t.peer == peer) {
            continue;
        }
        out.push(Target {
            peer,
            addresses: g.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            session: g.session,
        });
    }
    out
}

/// Runs every check; returns whether all passed.
pub async fn run(cfg: &AgentConfig) -> anyhow::Result<bool> {
    let mut r = Report { problems: 0 };
    let seed = cfg.gateway_peer()?;
    let key = load_identity(cfg)?;
    let (behaviour, control, _incoming) = streams::new(vec![], 1);
    let mut swarm = transport::build_swarm(key, &cfg.session, None, |_| behaviour)?;

    // 1. the running agent: sessions, leases, and the fleet it knows
    let listen = cfg.admin_listen();
    let admin = cfg.admin.clone();
    let view = tokio::task::spawn_blocking(move || {
        relaygate_common::admin::get(listen, &admin, "/v1/advertise")
    })
    .await?;
    let view: Option<Advertise> = match view {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        Ok((status, _)) => {
            r.fail(
                &format!("agent admin API at {listen} answered HTTP {status}"),
                "check admin.token / admin.token_file",
            );
            None
        }
        Err(e) => {
            r.fail(
                &format!("running agent not found: {e}"),
                "start relaygate-agent with this same config (doctor reads its admin API at admin.listen)",
            );
            None
        }
    };
    if let Some(v) = &view {
        match &v.session {
            Some(s) => r.ok(&format!("session up: {s}")),
            None => r.fail(
                "agent has no session with the gateway",
                "see the agent's log: refused (join token, allow-list) or unreachable",
            ),
        }
        for s in v.sessions.iter().filter(|s| s.gateway != seed.to_string()) {
            r.ok(&format!(
                "session up with fleet gateway {} at {}",
                s.gateway, s.address
            ));
        }
        for t in &v.tunnels {
            match (t.port, &t.error) {
                (Some(p), _) => r.ok(&format!("tunnel {} leased port {p}", t.name)),
                (None, Some(e)) => r.fail(
                    &format!("tunnel {} has no lease: {e}", t.name),
                    "see the error; pick another port or ask the gateway operator",
                ),
                (None, None) => r.fail(
                    &format!("tunnel {} has no lease yet", t.name),
                    "wait for the session, or see the agent's log",
                ),
            }
        }
    }

    // 2. every gateway's reachability, every address
    let targets = targets(cfg, seed, view.as_ref());
    let mut reached = Vec::new();
    for t in &targets {
        let mut any = false;
        for addr in &t.addresses {
            let started = Instant::now();
            match dial(&mut swarm, t.peer, addr.clone(), cfg.gateway.dial_timeout).await {
                Ok(()) => {
                    any = true;
                    r.ok(&format!(
                        "gateway reachable at {addr} ({} ms)",
                        started.elapsed().as_millis()
                    ));
                }
                Err(e) if t.peer == seed => r.fail(
                    &format!("gateway not reachable at {addr}: {e}"),
                    transport_fix(addr),
                ),
                Err(e) => r.fail(
                    &format!("gateway not reachable at {addr}: {e}"),
                    &format!(
                        "{}; a gateway that is down leaves the fleet within its store.etcd.member_ttl",
                        transport_fix(addr)
                    ),
                ),
            }
        }
        if any && t.peer != seed && !t.session {
            r.ok(&format!(
                "fleet gateway {} holds no session with this agent (gateway.max_sessions): it forwards to one that does",
                t.peer
            ));
        }
        if any {
            reached.push(t.peer);
        }
    }
    // Keep the swarm running for the dial-back streams below.
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });

    // 3. dial-back from each gateway reached to each leased port
    if let Some(v) = &view {
        for gateway in &reached {
            let through = if *gateway == seed {
                "the gateway".to_string()
            } else {
                format!("fleet gateway {gateway}")
            };
            for t in v.tunnels.iter() {
                let Some(port) = t.port.and_then(LeasePort::new) else {
                    continue;
                };
                let what = format!("dial-back to {} (port {port}) through {through}", t.name);
                match dialback(&control, *gateway, port).await {
                    Ok((true, detail)) => r.ok(&format!("{what}: {detail}")),
                    Ok((false, detail)) => {
                        r.fail(&format!("{what}: {detail}"), &target_fix(cfg, &t.name))
                    }
                    Err(e) => r.fail(
                        &format!("{what} failed: {e}"),
                        "upgrade the gateway (it needs /relaygate/dialback/1)",
                    ),
                }
            }
        }
    }

    // 4. advertised addresses
    if let Some(v) = &view {
        for t in &v.tunnels {
            let Some(port) = t.port else { continue };
            let cfg_t = cfg.tunnels.iter().find(|c| c.name.as_str() == t.name);
            let problems = advertise_problems(
                &t.addresses,
                port,
                cfg_t.and_then(|c| c.node_peer_id.and_then(crate::config::NodeId::given)),
            );
            if problems.is_empty() {
                r.ok(&format!(
                    "tunnel {} advertises {}",
                    t.name,
                    t.addresses.join(",")
                ));
            } else {
                r.fail(
                    &format!(
                        "tunnel {} advertises {:?}: {}",
                        t.name,
                        t.addresses,
                        problems.join("; ")
                    ),
                    "set the gateway's advertise to its public DNS name or IP",
                );
            }
            if !t.circuits.is_empty() {
                r.ok(&format!(
                    "tunnel {}'s node is reachable by its own peer id at {}",
                    t.name,
                    t.circuits.join(",")
                ));
            }
            if let Some(path) = cfg_t.and_then(|c| c.advertise_file.as_ref()) {
                let want = t
                    .addresses
                    .iter()
                    .chain(&t.circuits)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(",");
                match std::fs::read_to_string(path) {
                    Ok(s) if s.trim() == want => {
                        r.ok(&format!("advertise file {} is current", path.display()))
                    }
                    Ok(s) => r.fail(
                        &format!("advertise file {} holds {:?}", path.display(), s.trim()),
                        "the agent rewrites it on each session; check the volume is writable",
                    ),
                    Err(e) => r.fail(
                        &format!("advertise file {}: {e}", path.display()),
                        "mount the shared volume in the agent and the node",
                    ),
                }
            }
        }
    }

    // 5. transparent delivery
    if cfg
        .tunnels
        .iter()
        .any(|t| t.deliver == DeliveryMode::Transparent)
    {
        match transparent::check_socket().and_then(|()| transparent::check_rules(&cfg.transparent)) {
            Ok(()) => r.ok("transparent delivery: IP_TRANSPARENT works and the mark rule and local route are in place"),
            Err(e) => r.fail(&format!("transparent delivery: {e}"), "give the agent CAP_NET_ADMIN, or run `relaygate-agent transparent-rules | sh` in an init container"),
        }
    }

    driver.abort();
    if r.problems == 0 {
        println!("verdict: healthy");
    } else {
        println!("verdict: {} problem(s)", r.problems);
    }
    Ok(r.problems == 0)
}

async fn dial(
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

async fn dialback(
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

fn advertise_problems(addrs: &[String], port: u16, node: Option<PeerId>) -> Vec<String> {
    let mut out = Vec::new();
    if addrs.is_empty() {
        out.push("no addresses".into());
    }
    for a in addrs {
        let Ok(m) = a.parse::<Multiaddr>() else {
            out.push(format!("{a} is not a multiaddr"));
            continue;
        };
        if !m.iter().any(|p| p == Protocol::Tcp(port)) {
            out.push(format!("{a} does not name the leased port {port}"));
        }
        match m.iter().next() {
            Some(Protocol::Ip4(ip)) if ip.is_private() || ip.is_loopback() => {
                out.push(format!("{a} is not public: remote peers cannot dial it"))
            }
            _ => {}
        }
        if let Some(n) = node {
            if !m.iter().any(|p| p == Protocol::P2p(n)) {
                out.push(format!("{a} lacks /p2p/{n}"));
            }
        }
    }
    out
}

fn transport_fix(addr: &Multiaddr) -> &'static str {
    if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
        "open UDP on the gateway's firewall for QUIC (TCP is the fallback), and check the address and peer id"
    } else {
        "open the gateway's TCP port in its firewall, and check the address and peer id the gateway printed"
    }
}

fn target_fix(cfg: &AgentConfig, name: &str) -> String {
    match cfg.tunnels.iter().find(|t| t.name.as_str() == name) {
        Some(t) => format!(
            "make sure the node listens on {} (as seen from the agent)",
            t.target
        ),
        None => "check the tunnel's target".into(),
    }
}
