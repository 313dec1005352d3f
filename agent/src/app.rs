//! Wiring: identity, host, session, tunnel streams and admin API; drains open
//! connections on SIGINT/SIGTERM.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use libp2p::identity::Keypair;
use relaygate_common::{
    names::Secret,
    protocol::{LANE_PROTOCOL, SERVICE_PROTOCOL},
    shutdown,
    streams::Incoming,
    transport::DataPath,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    config::{AgentConfig, TunnelConfig},
    console::Console,
    deliver::DeliveryMode,
    fleet::FleetSessions,
    gateways::Gateways,
    host,
    lane::LaneDialer,
    limits::{self, Limits},
    metrics::Metrics,
    services::Services,
    state::{AgentState, TunnelStatus},
    transparent::{self, InstalledRules},
    tunnel::Tunnels,
    visitor::Visitor,
};

pub fn load_identity(cfg: &AgentConfig) -> anyhow::Result<Keypair> {
    let (key, source) = cfg.identity.load(&cfg.data_dir)?;
    tracing::info!(peer_id = %key.public().to_peer_id(), ?source, "identity");
    Ok(key)
}

fn load_token(cfg: &AgentConfig) -> anyhow::Result<Option<Secret>> {
    if let Some(p) = &cfg.gateway.token_file {
        let t = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read gateway.token_file {}", p.display()))?;
        return Ok(Some(Secret::new(t.trim())));
    }
    Ok((!cfg.gateway.token.is_empty()).then(|| cfg.gateway.token.clone()))
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let key = load_identity(&cfg)?;
    let token = load_token(&cfg)?;
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AgentState::default());
    let admin_listen = cfg.admin_listen();
    let admin_auth = cfg.admin.auth(admin_listen)?;

    let gateway = cfg.gateway_peer()?;
    let gateways = Gateways::new(gateway);
    state.set_seed(gateway);
    let (host, incoming) = host::start(
        key.clone(),
        &cfg,
        metrics.clone(),
        state.clone(),
        gateways.clone(),
    )?;
    let tracker = TaskTracker::new();
    let limits = Limits::new(&cfg.limits, metrics.clone());
    limits::check_open_files(&cfg.limits);
    // Visitor ports bind before anything else, so a taken port fails the start.
    let mut visitors = Vec::new();
    for v in &cfg.connect {
        let visitor = Arc::new(Visitor::new(
            v.clone(),
            host.clone(),
            &cfg.gateway.addresses,
            metrics.clone(),
            limits.clone(),
        ));
        let listener = visitor.bind().await.with_context(|| {
            format!(
                "cannot listen on {} for connect to {} {}",
                v.listen, v.peer, v.service
            )
        })?;
        visitors.push(tokio::spawn(visitor.run(listener, tracker.clone())));
    }
    let services = Arc::new(Services::new(
        &cfg.services,
        host.paths.clone(),
        metrics.clone(),
        cfg.connect_timeout,
        limits.clone(),
    ));
    let tunnels = Arc::new(Tunnels::new(
        &cfg.tunnels,
        host.peer_id,
        gateways.clone(),
        metrics.clone(),
        cfg.connect_timeout,
        cfg.transparent.mark.get(),
        limits,
    ));
    let (to_tunnels, tunnel_streams) = mpsc::channel(cfg.session.max_streams.max(1));
    let tunnels_task = tokio::spawn(tunnels.clone().run(tunnel_streams, tracker.clone()));
    let lanes = Arc::new(LaneDialer::new(
        &key,
        gateway,
        cfg.session.lanes,
        cfg.session.lane(),
        tunnels,
        tracker.clone(),
        metrics.clone(),
    )?);
    let accept = tokio::spawn(route(
        incoming,
        to_tunnels,
        services,
        gateways.clone(),
        metrics.clone(),
        tracker.clone(),
    ));
    // Lanes of our own only with `session.data_path = "lane"`.
    let lane = (cfg.session.data_path == DataPath::Lane).then_some(lanes);

    let (mut active, mut refused) = check_delivery(&cfg);
    // Kept until exit: dropping it removes the rules this process installed.
    // Runs `nft`/`ip`, so off the async workers.
    let (c, a) = (cfg.clone(), active.clone());
    let rules = match tokio::task::spawn_blocking(move || transparent_ready(&c, &a)).await? {
        Ok(r) => r,
        Err(e) => {
            // Refuse the transparent tunnels only; the others still start.
            let (t, rest): (Vec<_>, Vec<_>) = active
                .into_iter()
                .partition(|t| t.deliver == DeliveryMode::Transparent);
            refused.extend(t.into_iter().map(|t| (t, e.to_string())));
            active = rest;
            None
        }
    };
    let stop = CancellationToken::new();
    let session_cfg = AgentConfig {
        tunnels: active,
        ..cfg.clone()
    };
    for t in &session_cfg.tunnels {
        state.set_tunnel(
            &t.name,
            TunnelStatus {
                name: t.name.to_string(),
                target: t.target.to_string(),
                ..Default::default()
            },
        );
    }
    let udp = crate::udp::UdpAgent::new(
        &key,
        &session_cfg.tunnels,
        cfg.transparent.mark.get(),
        metrics.clone(),
    );
    let sessions = FleetSessions {
        cfg: session_cfg,
        seed: gateway,
        host: host.clone(),
        token,
        state: state.clone(),
        metrics: metrics.clone(),
        gateways: gateways.clone(),
        lanes: lane.clone(),
        udp,
    };
    for (t, why) in refused {
        tracing::error!(tunnel = %t.name, error = %why, "tunnel not started");
        state.set_tunnel(
            &t.name,
            TunnelStatus {
                name: t.name.to_string(),
                target: t.target.to_string(),
                error: Some(why),
                ..Default::default()
            },
        );
    }
    let session_task = tokio::spawn(sessions.run(stop.clone()));

    let stop_admin = CancellationToken::new();
    let (admin_addr, admin_task) = relaygate_common::admin::serve(
        admin_listen,
        admin::router(admin::AdminState {
            metrics: metrics.clone(),
            state: state.clone(),
            paths: host.paths.clone(),
            console: Arc::new(Console::new(
                host.peer_id,
                started,
                state.clone(),
                host.paths.clone(),
                cfg.clone(),
                key.clone(),
            )),
        }),
        admin_auth,
        stop_admin.clone(),
    )
    .await?;
    tracing::info!(peer_id = %host.peer_id, %gateway, admin = %admin_addr, tunnels = cfg.tunnels.len(), "agent started");

    let sig = shutdown::signal_received().await;
    tracing::info!(signal = sig, grace = ?cfg.shutdown_grace, "stopping: no new connections, draining open ones");
    // Refuse new streams and visitor connections; the session stays up while open ones drain.
    accept.abort();
    tunnels_task.abort();
    // One drain for every gateway's lanes: they share it.
    if let Some(l) = &lane {
        l.drain();
    }
    for v in &visitors {
        v.abort();
    }
    let left = shutdown::drain(&tracker, cfg.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            open = left,
            "grace period over; closing remaining connections"
        );
    }
    stop.cancel();
    let _ = session_task.await;
    stop_admin.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    if let Some(r) = rules {
        let _ = tokio::task::spawn_blocking(move || drop(r)).await;
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Sends service streams to the services, tunnel streams to the tunnels.
async fn route(
    mut incoming: mpsc::Receiver<Incoming>,
    tunnels: mpsc::Sender<Incoming>,
    services: Arc<Services>,
    gateways: Arc<Gateways>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
) {
    while let Some(i) = incoming.recv().await {
        if i.protocol == SERVICE_PROTOCOL {
            tracker.spawn(services.clone().serve(i.peer, i.connection, i.stream));
        } else if i.protocol == LANE_PROTOCOL {
            // Only the fleet's gateways carry tunnelled connections, each
            // on the lanes of its own session.
            match gateways.lanes(&i.peer) {
                Some(lanes) => {
                    tokio::spawn(async move { lanes.serve_session(i.stream).await });
                }
                None => metrics.refuse("lane_not_from_gateway"),
            }
        } else if tunnels.send(i).await.is_err() {
            return;
        }
    }
}

/// Splits the tunnels into those that can start and those refused, with why.
/// Transparent delivery never falls back silently to plain delivery.
fn check_delivery(cfg: &AgentConfig) -> (Vec<TunnelConfig>, Vec<(TunnelConfig, String)>) {
    let mut active = Vec::new();
    let mut refused = Vec::new();
    let wants_transparent = cfg
        .tunnels
        .iter()
        .any(|t| t.deliver == DeliveryMode::Transparent);
    let socket_ok = if wants_transparent {
        transparent::check_socket().map_err(|e| e.to_string())
    } else {
        Ok(())
    };
    for t in &cfg.tunnels {
        if t.deliver == DeliveryMode::Transparent {
            if let Err(e) = &socket_ok {
                refused.push((t.clone(), e.clone()));
                continue;
            }
            if is_loopback_host(&t.target.host) {
                refused.push((
                    t.clone(),
                    transparent::TransparentError::LoopbackTarget(t.target.to_string()).to_string(),
                ));
                continue;
            }
            if !is_local_address(&t.target.host) {
                refused.push((
                    t.clone(),
                    transparent::TransparentError::RemoteTarget(t.target.to_string()).to_string(),
                ));
                continue;
            }
        }
        active.push(t.clone());
    }
    (active, refused)
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `host` is an IP address of this host (what can be bound). A
/// name, or another host's address, is not: a transparent connection to it
/// would leave with a public client's source address toward another host.
fn is_local_address(host: &str) -> bool {
    host.trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| std::net::TcpListener::bind((ip, 0)).is_ok())
}

/// Installs (or checks) the routing rules when an active tunnel delivers transparently.
fn transparent_ready(
    cfg: &AgentConfig,
    active: &[TunnelConfig],
) -> Result<Option<InstalledRules>, transparent::TransparentError> {
    if !active
        .iter()
        .any(|t| t.deliver == DeliveryMode::Transparent)
    {
        return Ok(None);
    }
    transparent::prepare(&cfg.transparent)
}
