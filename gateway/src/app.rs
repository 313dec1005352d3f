//! Wiring: starts the host, sessions, public ports and admin API, prints what
//! an agent needs to join, and drains connections on SIGINT/SIGTERM.

use std::{path::Path, sync::Arc, time::Duration};

use libp2p::identity::Keypair;
use relaygate_common::{
    circuit::HOP_PROTOCOL,
    identity::{self, KeySource},
    names::Secret,
    protocol::FORWARD_PROTOCOL,
    shutdown,
    streams::Incoming,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    admission::{self, Admission},
    config::store::StoreKind,
    config::GatewayConfig,
    fleet::{
        bans::SharedBans,
        forward::Forwarder,
        members::{unix_now, Fleet, Member},
        ports::PortTable,
    },
    guard::Guard,
    hop::{Hop, Members},
    host,
    lanes::Lanes,
    lease::{Leases, PortPolicy},
    listener::{DataPlane, PlaneSettings},
    metrics::Metrics,
    overload::Overload,
    registry::AgentRegistry,
    reservations::Reservations,
    session::Sessions,
    session_lane::SessionLanes,
    stall::StallLedger,
    store::{EmbeddedStore, EtcdStore, LeaseStore},
};

pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    Ok(identity::ensure_private_dir(dir)?)
}

pub fn load_identity(cfg: &GatewayConfig) -> anyhow::Result<(Keypair, KeySource)> {
    Ok(cfg.identity.load(&cfg.data_dir)?)
}

pub fn load_token(cfg: &GatewayConfig) -> anyhow::Result<Option<(Secret, bool)>> {
    if !cfg.admission.tokens {
        return Ok(None);
    }
    if !cfg.admission.token.is_empty() {
        return Ok(Some((cfg.admission.token.clone(), false)));
    }
    ensure_data_dir(&cfg.data_dir)?;
    Ok(Some(admission::load_or_create_token(&cfg.token_file())?))
}

/// Which ports tunnels may lease, from `leases.*`.
pub fn port_policy(cfg: &GatewayConfig) -> PortPolicy {
    PortPolicy {
        range: cfg.leases.port_range,
        allowed: cfg.leases.allowed_ports.clone(),
        bind: cfg.leases.bind,
        max_per_agent: cfg.leases.max_tunnels_per_agent,
        expire_after: cfg.leases.expire_after,
    }
}

/// Every join token admitted: the main one, then `admission.accept_tokens`
/// (none when tokens are off).
pub fn accepted_tokens(cfg: &GatewayConfig, main: Option<&Secret>) -> Vec<Secret> {
    if !cfg.admission.tokens {
        return Vec::new();
    }
    main.into_iter()
        .chain(cfg.admission.accept_tokens.iter())
        .cloned()
        .collect()
}

/// Runs the gateway until SIGINT/SIGTERM; `reload` reads the configuration
/// again for SIGHUP and `POST /v1/reload`.
pub async fn run(cfg: GatewayConfig, reload: crate::reload::Source) -> anyhow::Result<()> {
    let (key, key_source) = load_identity(&cfg)?;
    let peer_id = key.public().to_peer_id();
    tracing::info!(%peer_id, source = ?key_source, "identity");
    let mut token = load_token(&cfg)?;
    // etcd's join token, for a reload in a fleet to keep.
    let mut fleet_token = None;
    // One client for everything the fleet shares (it multiplexes requests).
    let etcd = match cfg.store.kind {
        StoreKind::Etcd => Some(crate::store::connect_client(&cfg.store.etcd).await?),
        StoreKind::Embedded => None,
    };
    if let (Some(client), Some((mine, created))) = (&etcd, &token) {
        // An agent admitted here is admitted by every gateway of the fleet.
        let mut client = client.clone();
        let fleet =
            crate::fleet::token::fleet_token(&mut client, &cfg.store.etcd.prefix, mine).await?;
        fleet_token = Some(fleet.clone());
        if fleet.expose() != mine.expose() {
            if cfg.admission.token.is_empty() {
                crate::fleet::token::keep(&cfg.token_file(), &fleet)?;
                tracing::info!(file = %cfg.token_file().display(), "using the fleet's join token from etcd");
                token = Some((fleet, *created));
            } else {
                tracing::warn!("admission.token differs from the fleet's join token in etcd: agents admitted by the other gateways are refused here; fix: give every gateway the same token, or none inline");
            }
        }
    }

    let store: Arc<dyn LeaseStore> = match &etcd {
        None => {
            let db = cfg.lease_db();
            Arc::new(tokio::task::spawn_blocking(move || EmbeddedStore::open(&db)).await??)
        }
        Some(client) => Arc::new(EtcdStore::with_client(client.clone(), &cfg.store.etcd)),
    };
    let policy = port_policy(&cfg);
    // The store may block (redb's file, etcd's round trips): off the runtime.
    let mut leases = tokio::task::spawn_blocking(move || Leases::load(store, policy)).await??;
    let metrics = Arc::new(Metrics::new());
    leases.unavailable = metrics
        .refusals
        .get_or_create(&relaygate_common::metrics::ReasonLabels::new(
            "store_unavailable",
        ))
        .clone();
    leases.freed = metrics.leases_freed.clone();
    leases.gauge = metrics.leases.clone();
    let leases = Arc::new(leases);
    metrics.leases.set(leases.count() as i64);

    let admin_listen = cfg.admin_listen();
    let admin_auth = cfg.admin.auth(admin_listen)?;

    let overload = Arc::new(Overload::new(cfg.limits.max_memory));
    tracing::info!(
        limit_mib = overload.limit() >> 20,
        "memory limit for new work (limits.max_memory)"
    );
    let guard = Guard::new(cfg.guard.clone(), metrics.clone(), overload.clone());
    {
        let gauge = metrics.memory_overloaded.clone();
        tokio::spawn(async move { overload.watch(Duration::from_secs(1), gauge).await });
    }
    check_open_files(&cfg);
    let host::Started {
        handle: host,
        incoming,
        lanes: lane_conns,
    } = host::start(key.clone(), &cfg, metrics.clone(), guard.clone())?;
    let registry = Arc::new(AgentRegistry::default());
    let fleet = Fleet::new(
        peer_id,
        describe(&cfg, peer_id, &registry, &host.state),
        cfg.store.kind == StoreKind::Etcd,
    );
    if let Some(client) = etcd {
        // The fleet's gateways share their bans and records through the same etcd.
        let etcd = &cfg.store.etcd;
        let outbox = Arc::new(crate::fleet::bans::Outbox::default());
        guard.share_with(outbox.clone());
        let shared = SharedBans::new(client.clone(), &etcd.prefix);
        tokio::spawn(shared.run(guard.clone(), host.clone(), outbox));
        tokio::spawn(fleet.clone().run(
            client,
            etcd.prefix.clone(),
            etcd.member_ttl,
            registry.changes(),
        ));
    }
    let lanes = Arc::new(Lanes::new(
        &key,
        cfg.session.lanes,
        cfg.session.lane(),
        registry.clone(),
        guard.clone(),
        metrics.clone(),
    )?);
    if let Some(conns) = lane_conns {
        tokio::spawn(lanes.clone().serve(conns));
    }
    let session_lanes = Arc::new(SessionLanes::new(
        host.control.clone(),
        lanes.clone(),
        registry.clone(),
        metrics.clone(),
        cfg.session.lane().0,
    ));
    // Circuits and session streams whose reader stopped, per peer whose
    // connection window their unread bytes hold.
    let stalls = StallLedger::new(StallLedger::share_for(
        cfg.session.stream_window,
        cfg.session.connection_window,
    ));
    if cfg.bandwidth.any() && cfg.session.data_path != relaygate_common::transport::DataPath::Lane {
        tracing::warn!("bandwidth caps with session.data_path = \"session\": a capped connection's held bytes sit in the agent's QUIC connection window and can slow its other connections; keep lanes on with caps");
    }
    let live = Arc::new(crate::conns::LiveConns::default());
    let caps = crate::caps::Caps::new(cfg.bandwidth.clone(), metrics.clone());
    let dataplane = Arc::new(DataPlane {
        control: host.control.clone(),
        lanes: lanes.clone(),
        // Only where lanes are on: `session.data_path = "session"` keeps
        // every connection a session stream.
        session_lanes: (cfg.session.data_path == relaygate_common::transport::DataPath::Lane)
            .then_some(session_lanes),
        metrics: metrics.clone(),
        tracker: TaskTracker::new(),
        stop_accepting: CancellationToken::new(),
        settings: arc_swap::ArcSwap::from_pointee(PlaneSettings {
            proxy: cfg.proxy_protocol.clone(),
            max_per_tunnel: cfg.limits.max_connections_per_tunnel,
            idle_timeout: cfg.limits.idle_timeout,
        }),
        guard: guard.clone(),
        sources: crate::shares::Shares::new(
            cfg.limits.max_connections_per_source,
            cfg.guard.ipv6_prefix,
        ),
        stalls: stalls.clone(),
        stalled_readers: metrics
            .refusals
            .get_or_create(&relaygate_common::metrics::ReasonLabels::new(
                "stalled_reader",
            ))
            .clone(),
        live: live.clone(),
        caps: caps.clone(),
    });
    let ports = Arc::new(PortTable::default());
    let nodes = Arc::new(crate::nodes::NodeBook::default());
    let udp = crate::udp::UdpPlane::new(
        cfg.udp.clone(),
        metrics.clone(),
        guard.clone(),
        caps.clone(),
    );
    if cfg.udp.enabled {
        let ep = crate::udp::channel::bind(&key, cfg.udp.listen)?;
        tracing::info!(listen = %cfg.udp.listen, "UDP tunnels' datagram channel listening");
        tokio::spawn(crate::udp::channel::accept(udp.clone(), ep));
    }
    let admission = Arc::new(Admission::new(
        cfg.admission.allow.iter().copied(),
        accepted_tokens(&cfg, token.as_ref().map(|(t, _)| t)),
    ));
    let sessions = Arc::new(Sessions {
        host: host.clone(),
        admission: admission.clone(),
        leases: leases.clone(),
        registry: registry.clone(),
        dataplane: dataplane.clone(),
        metrics: metrics.clone(),
        public_hosts: cfg.public_hosts(),
        lane_port: cfg.lane_port(),
        lanes: cfg.session.lanes,
        bind: cfg.leases.bind,
        guard: guard.clone(),
        streams: crate::shares::PerKey::new(crate::session::STREAMS_PER_CONNECTION),
        fleet: fleet.clone(),
        fleet_hosts: cfg.fleet.hosts(),
        ports: ports.clone(),
        nodes: nodes.clone(),
        udp: udp.clone(),
    });
    let forwarder = cfg
        .forwards()
        .then(|| {
            anyhow::Ok(Arc::new(Forwarder {
                fleet: fleet.clone(),
                registry: registry.clone(),
                ports: ports.clone(),
                dp: dataplane.clone(),
                host: host.clone(),
                bind: cfg.leases.bind,
                links: crate::fleet::links::Links::new(&key, cfg.session.lane())?,
            }))
        })
        .transpose()?;
    if let Some(f) = &forwarder {
        tokio::spawn(f.clone().run());
        let (to, from) = mpsc::channel(16);
        let members = fleet.clone();
        lanes.take_fleet_lanes(Arc::new(move |p| members.is_member(p)), to);
        tokio::spawn(f.clone().serve_links(from));
    }
    let hop = Arc::new(Hop {
        key,
        cfg: cfg.relay.clone(),
        books: Reservations::new(cfg.relay.clone()),
        members: Members {
            registry: registry.clone(),
            admission: admission.clone(),
        },
        limited: arc_swap::ArcSwap::from_pointee(cfg.relay.limited_peers.iter().copied().collect()),
        host: host.clone(),
        advertise: cfg.advertise.clone(),
        metrics: metrics.clone(),
        tracker: dataplane.tracker.clone(),
        draining: dataplane.stop_accepting.clone(),
        guard: guard.clone(),
        requests: crate::shares::Places::new(
            cfg.relay.max_pending_requests,
            cfg.relay.max_pending_requests_per_source,
            cfg.guard.ipv6_prefix,
        ),
        stalls,
        nodes: nodes.clone(),
        dp: dataplane.clone(),
    });
    let (to_sessions, session_streams) = mpsc::channel(1024);
    tokio::spawn(route(incoming, to_sessions, hop.clone(), forwarder));
    tokio::spawn(sessions.run(session_streams));
    tokio::spawn(housekeeping(hop.clone(), guard.clone()));
    // Refreshes the leases in use here, frees expired ones (`leases.expire_after`).
    tokio::spawn(
        crate::lease::expiry::Sweeper {
            leases: leases.clone(),
            registry: registry.clone(),
        }
        .run(),
    );

    let reloader = crate::reload::Reloader::new(
        reload,
        cfg.clone(),
        fleet_token,
        admission.clone(),
        guard.clone(),
        dataplane.clone(),
        caps.clone(),
        leases.clone(),
        hop.clone(),
        host.clone(),
        metrics.clone(),
    );
    tokio::spawn(crate::reload::on_sighup(reloader.clone()));

    let stop_admin = CancellationToken::new();
    let state = admin::AdminState {
        metrics: metrics.clone(),
        registry: registry.clone(),
        host: host.state.clone(),
        guard: guard.clone(),
        disconnect: host.clone(),
        fleet: fleet.clone(),
        nodes: nodes.clone(),
        leases: leases.clone(),
        console: Arc::new(admin::console::Console {
            peer_id: host.peer_id,
            advertise: cfg.advertise.clone(),
            started: std::time::Instant::now(),
            caps: caps.clone(),
            live: live.clone(),
            lanes: lanes.clone(),
            reloader: reloader.clone(),
        }),
    };
    let (admin_addr, admin_task) = relaygate_common::admin::serve(
        admin_listen,
        admin::router(state),
        admin_auth,
        stop_admin.clone(),
    )
    .await?;

    // Listeners report their addresses asynchronously; wait briefly so the banner is complete.
    for _ in 0..50 {
        if host.state.listeners_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !host.state.listeners_up() {
        anyhow::bail!(
            "libp2p listeners did not come up on {:?}; is the port in use?",
            cfg.listen
        );
    }
    crate::banner::print_banner(
        &cfg,
        &host.state.listen_addrs(),
        &host.peer_id,
        admin_addr,
        token.as_ref(),
    );
    tracing::info!(admin = %admin_addr, leases = leases.count(), "gateway ready");

    let sig = shutdown::signal_received().await;
    tracing::info!(signal = sig, grace = ?cfg.shutdown_grace, "stopping: no new connections, draining open ones");
    // libp2p listeners stay open: closing the QUIC one would close every
    // session on it. New sessions are refused instead (see session.rs).
    dataplane.stop_accepting.cancel();
    udp.stop_accepting.cancel();
    let left = shutdown::drain(&dataplane.tracker, cfg.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            open = left,
            "grace period over; closing remaining connections"
        );
    }
    stop_admin.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Raises the open-files limit to its hard maximum and warns when even that
/// is below what the configured caps can use.
fn check_open_files(cfg: &GatewayConfig) {
    let need = cfg.limits.descriptors_needed();
    relaygate_common::nofile::raise_open_files(need, "limits.*");
}

/// Sends relay hop streams to the hop, the rest (control, dial-back) to the sessions.
async fn route(
    mut incoming: mpsc::Receiver<Incoming>,
    sessions: mpsc::Sender<Incoming>,
    hop: Arc<Hop>,
    forwarder: Option<Arc<Forwarder>>,
) {
    while let Some(i) = incoming.recv().await {
        if i.protocol == FORWARD_PROTOCOL {
            // Taken only from the fleet's gateways (checked first thing).
            match &forwarder {
                Some(f) => {
                    // Tracked: shutdown drains them like any public connection.
                    f.dp.tracker.spawn(f.clone().inbound(
                        i.peer,
                        tokio_util::compat::FuturesAsyncReadCompatExt::compat(i.stream),
                    ));
                }
                None => hop.guard.count_refusal("forward_off"),
            }
        } else if i.protocol == HOP_PROTOCOL {
            // Hop requests in their handshake are bounded; an open circuit
            // is counted by the circuit caps instead.
            let source = hop
                .host
                .state
                .remote_ip(&i.peer)
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            match hop.requests.try_acquire(source) {
                Ok(permit) => {
                    let hop = hop.clone();
                    tokio::spawn(async move {
                        hop.serve(i.peer, i.connection, i.stream).await;
                        drop(permit);
                    });
                }
                Err(crate::shares::Busy::Total) => hop.guard.count_refusal("relay_requests_busy"),
                Err(crate::shares::Busy::Source) => {
                    hop.guard.count_refusal("relay_requests_per_source")
                }
            }
        } else if sessions.send(i).await.is_err() {
            return;
        }
    }
}

/// Periodic upkeep: expired reservations (so `relay_reservations_active`
/// stays true) and the rate limiters' idle keys.
async fn housekeeping(hop: Arc<Hop>, guard: Arc<Guard>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        hop.sweep();
        guard.housekeeping();
    }
}

/// This gateway's record in the fleet, as it is when asked.
fn describe(
    cfg: &GatewayConfig,
    peer: libp2p::PeerId,
    registry: &Arc<AgentRegistry>,
    state: &Arc<host::HostState>,
) -> Arc<dyn Fn() -> Member + Send + Sync> {
    let (cfg, registry, state) = (cfg.clone(), registry.clone(), state.clone());
    Arc::new(move || Member {
        peer_id: peer.to_string(),
        addresses: crate::banner::dial_addrs(&cfg.advertise, &state.listen_addrs(), &peer)
            .iter()
            .map(ToString::to_string)
            .collect(),
        lane_port: cfg.lane_port(),
        // Whoever forwards serves the lanes others dial to it (`serve_links`).
        takes_links: cfg.forwards() && cfg.lane_port().is_some(),
        ready: state.listeners_up(),
        agents: registry.snapshot().into_iter().map(|a| a.peer_id).collect(),
        ports: registry.ports(),
        updated: unix_now(),
    })
}
