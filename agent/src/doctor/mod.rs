//! `relaygate-agent doctor`: checks, one verdict each with what to fix: the
//! running agent's sessions and leases, the reachability of every gateway of
//! the fleet, a dial-back from each gateway to every leased port (through its
//! forward where it holds no session), the advertised addresses, and the
//! transparent-delivery rules.
//!
//! The same checks run two ways. The CLI (another process) reads the agent
//! through its admin API, prints each verdict as it comes, and hands its
//! report to the running agent (`PUT /v1/doctor`). `POST /v1/doctor` runs them
//! inside the agent, reading its state directly. Either way the agent keeps
//! the last [`DoctorReport`] for its console.

mod net;
mod report;

use net::{dial, dialback};
use report::{hand_over, Report};
pub use report::{Check, DoctorReport};

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{identity::Keypair, multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{names::LeasePort, streams, transport};
use serde::Deserialize;
use tokio_util::task::AbortOnDropHandle;

use crate::{
    app::load_identity, config::AgentConfig, deliver::DeliveryMode, state::AgentState, transparent,
};

/// Longest an in-process run may take. A run is usually over in a second or
/// two; its worst case is a dial timeout per unreachable gateway address and
/// 10 s per dial-back that gets no answer.
pub const IN_PROCESS_LIMIT: Duration = Duration::from_secs(45);

/// Where doctor reads the running agent's sessions, leases and fleet.
enum Agent<'a> {
    /// Its admin API at `admin.listen` (the CLI, another process).
    AdminApi,
    /// Its state, in this very process (`POST /v1/doctor`).
    InProcess(&'a AgentState),
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

/// `relaygate-agent doctor`: runs every check against the running agent,
/// printing each verdict, then hands the report to that agent; returns
/// whether all passed.
pub async fn run(cfg: &AgentConfig) -> anyhow::Result<bool> {
    let mut r = Report::new(true);
    let seed = cfg.gateway_peer()?;
    let key = load_identity(cfg)?;
    let found = check(cfg, seed, key, Agent::AdminApi, &mut r).await?;
    let report = r.finish();
    let problems = report.checks.iter().filter(|c| !c.ok).count();
    if problems == 0 {
        println!("verdict: healthy");
    } else {
        println!("verdict: {problems} problem(s)");
    }
    // Only to an agent that answered: one not running has nothing to show.
    if found {
        let (listen, admin) = (cfg.admin_listen(), cfg.admin.clone());
        let handed = tokio::task::spawn_blocking(move || hand_over(listen, &admin, &report))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = handed {
            eprintln!("note: the running agent did not take this report: {e}");
        }
    }
    Ok(problems == 0)
}

/// Runs every check inside the agent, against itself, within
/// [`IN_PROCESS_LIMIT`] (`POST /v1/doctor`). Nothing is printed; what cannot
/// run, or what did not finish in time, is a failed check of the report.
///
/// It dials the gateways and asks for dial-backs exactly as the CLI does:
/// from a short-lived swarm of its own, with the agent's own identity (the
/// key is the agent's, already loaded). A gateway answers a dial-back only
/// for ports leased to the peer id that asks, so a fresh identity would not
/// do; a second connection from the agent's peer id beside its session is
/// what the CLI has always made. Using a swarm of its own, not the agent's,
/// keeps every check a fresh dial of each configured address, and the
/// agent's connections untouched. The swarm ends with the run (also when
/// the time limit cuts it short).
pub async fn run_in_process(cfg: &AgentConfig, key: Keypair, state: &AgentState) -> DoctorReport {
    let mut r = Report::new(false);
    let outcome = match cfg.gateway_peer() {
        Ok(seed) => {
            tokio::time::timeout(
                IN_PROCESS_LIMIT,
                check(cfg, seed, key, Agent::InProcess(state), &mut r),
            )
            .await
        }
        Err(e) => Ok(Err(e.into())),
    };
    match outcome {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => r.fail(
            "doctor",
            &format!("doctor could not run: {e:#}"),
            "see the agent's configuration and log",
        ),
        Err(_) => r.fail(
            "doctor",
            &format!(
                "doctor did not finish within {} s",
                IN_PROCESS_LIMIT.as_secs()
            ),
            "a gateway or a dial-back answers slowly or not at all: see the checks above and the agent's log",
        ),
    }
    r.finish()
}

/// The agent's `/v1/advertise`, read as `agent` says; `None` (with the
/// failure reported) when it cannot be read.
async fn read_view(cfg: &AgentConfig, agent: &Agent<'_>, r: &mut Report) -> Option<Advertise> {
    match agent {
        Agent::InProcess(state) => {
            match serde_json::to_value(state.advertise()).and_then(serde_json::from_value) {
                Ok(v) => Some(v),
                Err(e) => {
                    r.fail(
                        "agent",
                        &format!("cannot read the agent's state: {e}"),
                        "report this as a bug",
                    );
                    None
                }
            }
        }
        Agent::AdminApi => {
            let listen = cfg.admin_listen();
            let admin = cfg.admin.clone();
            let view = tokio::task::spawn_blocking(move || {
                relaygate_common::admin::get(listen, &admin, "/v1/advertise")
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match view {
                Ok((200, body)) => serde_json::from_str(&body).ok(),
                Ok((status, _)) => {
                    r.fail(
                        "agent",
                        &format!("agent admin API at {listen} answered HTTP {status}"),
                        "check admin.token / admin.token_file",
                    );
                    None
                }
                Err(e) => {
                    r.fail(
                        "agent",
                        &format!("running agent not found: {e}"),
                        "start relaygate-agent with this same config (doctor reads its admin API at admin.listen)",
                    );
                    None
                }
            }
        }
    }
}

/// Every check, into `r`; returns whether the running agent was read.
async fn check(
    cfg: &AgentConfig,
    seed: PeerId,
    key: Keypair,
    agent: Agent<'_>,
    r: &mut Report,
) -> anyhow::Result<bool> {
    let (behaviour, control, _incoming) = streams::new(vec![], 1);
    let mut swarm = transport::build_swarm(key, &cfg.session, None, |_| behaviour)?;

    // 1. the running agent: sessions, leases, and the fleet it knows
    let view = read_view(cfg, &agent, r).await;
    if let Some(v) = &view {
        match &v.session {
            Some(s) => r.ok("session", &format!("session up: {s}")),
            None => r.fail(
                "session",
                "agent has no session with the gateway",
                "see the agent's log: refused (join token, allow-list) or unreachable",
            ),
        }
        for s in v.sessions.iter().filter(|s| s.gateway != seed.to_string()) {
            r.ok(
                "session",
                &format!(
                    "session up with fleet gateway {} at {}",
                    s.gateway, s.address
                ),
            );
        }
        for t in &v.tunnels {
            match (t.port, &t.error) {
                (Some(p), _) => r.ok("lease", &format!("tunnel {} leased port {p}", t.name)),
                (None, Some(e)) => r.fail(
                    "lease",
                    &format!("tunnel {} has no lease: {e}", t.name),
                    "see the error; pick another port or ask the gateway operator",
                ),
                (None, None) => r.fail(
                    "lease",
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
                    r.ok(
                        "gateway",
                        &format!(
                            "gateway reachable at {addr} ({} ms)",
                            started.elapsed().as_millis()
                        ),
                    );
                }
                Err(e) if t.peer == seed => r.fail(
                    "gateway",
                    &format!("gateway not reachable at {addr}: {e}"),
                    transport_fix(addr),
                ),
                Err(e) => r.fail(
                    "gateway",
                    &format!("gateway not reachable at {addr}: {e}"),
                    &format!(
                        "{}; a gateway that is down leaves the fleet within its store.etcd.member_ttl",
                        transport_fix(addr)
                    ),
                ),
            }
        }
        if any && t.peer != seed && !t.session {
            r.ok(
                "gateway",
                &format!(
                    "fleet gateway {} holds no session with this agent (gateway.max_sessions): it forwards to one that does",
                    t.peer
                ),
            );
        }
        if any {
            reached.push(t.peer);
        }
    }
    // Keep the swarm running for the dial-back streams below; it ends
    // (and its connections close) when this run ends or is cut short.
    let _driver = AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    }));

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
                    Ok((true, detail)) => r.ok("dial-back", &format!("{what}: {detail}")),
                    Ok((false, detail)) => r.fail(
                        "dial-back",
                        &format!("{what}: {detail}"),
                        &target_fix(cfg, &t.name),
                    ),
                    Err(e) => r.fail(
                        "dial-back",
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
                r.ok(
                    "advertise",
                    &format!("tunnel {} advertises {}", t.name, t.addresses.join(",")),
                );
            } else {
                r.fail(
                    "advertise",
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
                r.ok(
                    "circuits",
                    &format!(
                        "tunnel {}'s node is reachable by its own peer id at {}",
                        t.name,
                        t.circuits.join(",")
                    ),
                );
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
                    Ok(s) if s.trim() == want => r.ok(
                        "advertise file",
                        &format!("advertise file {} is current", path.display()),
                    ),
                    Ok(s) => r.fail(
                        "advertise file",
                        &format!("advertise file {} holds {:?}", path.display(), s.trim()),
                        "the agent rewrites it on each session; check the volume is writable",
                    ),
                    Err(e) => r.fail(
                        "advertise file",
                        &format!("advertise file {}: {e}", path.display()),
                        "mount the shared volume in the agent and the node",
                    ),
                }
            }
        }
    }

    // 5. transparent delivery (runs `nft` and `ip`: off the async workers)
    if cfg
        .tunnels
        .iter()
        .any(|t| t.deliver == DeliveryMode::Transparent)
    {
        let rules = cfg.transparent.clone();
        let checked = tokio::task::spawn_blocking(move || {
            transparent::check_socket()
                .and_then(|()| transparent::check_rules(&rules))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match checked {
            Ok(()) => r.ok("transparent", "transparent delivery: IP_TRANSPARENT works and the mark rule and local route are in place"),
            Err(e) => r.fail("transparent", &format!("transparent delivery: {e}"), "give the agent CAP_NET_ADMIN, or run `relaygate-agent transparent-rules | sh` in an init container"),
        }
    }
    Ok(view.is_some())
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
