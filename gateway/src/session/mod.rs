//! Agent sessions: the control stream of each agent. Admits it, grants its
//! leases, binds their public ports, and keeps them open exactly as long as
//! the control stream lives.

mod claims;
mod ports;

use std::{sync::Arc, time::Duration};

use libp2p::{swarm::ConnectionId, PeerId, Stream};
use relaygate_common::{
    lane::LaneCount,
    protocol::DIALBACK_PROTOCOL,
    protocol::{
        read_control, write_control, ControlMessage, ControlReader, Hello, LeaseGrant,
        LeaseOutcome, Refusal, RefusalCode, Welcome, WireError, WIRE_VERSION,
    },
    streams::Incoming,
};
use tokio::io::AsyncWriteExt;
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken};

use crate::{
    admission::Admission,
    dialback,
    fleet::members::Fleet,
    guard::Guard,
    host::{Command, HostHandle},
    lease::Leases,
    listener::DataPlane,
    metrics::Metrics,
    nodes::NodeBook,
    registry::{AgentRegistry, NewSession},
    udp::UdpPlane,
};

/// An agent must say hello this soon after opening the control stream.
/// The least time between two `Lease` requests of one session.
const LEASE_RETRY_PACE: Duration = Duration::from_secs(1);
/// An agent sends its hello as soon as the stream is open.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Control and dial-back streams one connection may have open at once: an
/// agent uses one control stream, and a dial-back now and then.
pub const STREAMS_PER_CONNECTION: usize = 4;

pub struct Sessions {
    pub host: HostHandle,
    pub admission: Arc<Admission>,
    pub leases: Arc<Leases>,
    pub registry: Arc<AgentRegistry>,
    pub dataplane: Arc<DataPlane>,
    pub metrics: Arc<Metrics>,
    /// Host parts of the advertised addresses, sent to agents.
    pub public_hosts: Vec<String>,
    /// Offered to agents for their lanes (`session.data_path = "lane"`).
    pub lane_port: Option<u16>,
    /// Most lanes one agent may keep (`session.lanes`).
    pub lanes: LaneCount,
    pub bind: std::net::IpAddr,
    /// Control-stream violations and refused join tokens count towards a ban.
    pub guard: Arc<Guard>,
    /// Control and dial-back streams per connection ([`STREAMS_PER_CONNECTION`]).
    pub streams: crate::shares::PerKey<ConnectionId>,
    /// The fleet's gateways, named to agents that follow the fleet.
    pub fleet: Arc<Fleet>,
    /// Host parts of `fleet.advertise`, sent to agents.
    pub fleet_hosts: Vec<String>,
    /// A leased port is taken from the fleet's forwarder before it is bound.
    pub ports: Arc<crate::fleet::ports::PortTable>,
    /// Node ids agents front, once checked: circuits to them.
    pub nodes: Arc<NodeBook>,
    /// UDP tunnels: datagram channels and flows.
    pub udp: Arc<UdpPlane>,
}

type Control = tokio_util::compat::Compat<Stream>;

impl Sessions {
    /// Serves control streams until the host goes away.
    pub async fn run(self: Arc<Self>, mut incoming: tokio::sync::mpsc::Receiver<Incoming>) {
        while let Some(Incoming {
            peer,
            connection,
            stream,
            protocol,
        }) = incoming.recv().await
        {
            // Before admission nothing else bounds them: a peer opening
            // thousands would get a task and a read buffer for each.
            let Some(place) = self.streams.try_take(connection) else {
                self.metrics.refuse("control_streams_per_connection");
                continue; // dropping the stream resets it
            };
            if protocol == DIALBACK_PROTOCOL {
                let me = self.clone();
                tokio::spawn(async move {
                    dialback::serve(peer, stream.compat(), &me.leases, &me.public_hosts).await;
                    drop(place);
                });
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.handle(peer, connection, stream.compat()).await;
                drop(place);
            });
        }
    }

    async fn handle(self: Arc<Self>, peer: PeerId, connection: ConnectionId, mut ctl: Control) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut ctl)).await {
            Ok(Ok(ControlMessage::Hello(h))) => h,
            Ok(Ok(_)) => {
                return self
                    .refuse(
                        peer,
                        &mut ctl,
                        RefusalCode::BadRequest,
                        "expected hello".into(),
                        Some("unexpected_message"),
                    )
                    .await
            }
            Ok(Err(WireError::Version(v))) => {
                let msg = format!("wire version {v} is not supported; this gateway speaks {WIRE_VERSION}: upgrade the older side");
                return self
                    .refuse(
                        peer,
                        &mut ctl,
                        RefusalCode::UnsupportedVersion,
                        msg,
                        Some("version"),
                    )
                    .await;
            }
            Ok(Err(e)) => {
                let kind = e.kind();
                return self
                    .refuse(
                        peer,
                        &mut ctl,
                        RefusalCode::BadRequest,
                        e.to_string(),
                        Some(kind),
                    )
                    .await;
            }
            Err(_) => {
                self.metrics.bad_input("hello_timeout");
                self.host
                    .violation(&self.guard, peer, "hello_timeout")
                    .await;
                tracing::info!(%peer, "no hello within {HELLO_TIMEOUT:?}; closing");
                return;
            }
        };
        if self.dataplane.stop_accepting.is_cancelled() {
            let msg = "the gateway is shutting down; retry shortly".to_string();
            return self
                .refuse(peer, &mut ctl, RefusalCode::ShuttingDown, msg, None)
                .await;
        }
        let Some(how) = self.admission.check(&peer, hello.token.as_deref()) else {
            self.metrics.refuse("not_admitted");
            // Repeated wrong tokens are guessing; a misconfigured agent
            // retrying every few seconds stays under the threshold.
            self.host.violation(&self.guard, peer, "not_admitted").await;
            tracing::warn!(%peer, "refused agent: not on admission.allow and no valid join token");
            let msg = format!(
                "peer {peer} is not admitted: add it to the gateway's admission.allow, or start the agent with the gateway's join token"
            );
            let _ = write_control(
                &mut ctl,
                &ControlMessage::Refused(Refusal {
                    code: RefusalCode::NotAdmitted,
                    message: msg,
                }),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ctl.shutdown()).await;
            // Give the refusal time to arrive before the connection goes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.host.send(Command::Disconnect(peer)).await;
            return;
        };
        self.serve(peer, connection, how.as_str(), hello, ctl).await;
    }

    async fn serve(
        self: &Arc<Self>,
        peer: PeerId,
        connection: ConnectionId,
        how: &str,
        hello: Hello,
        mut ctl: Control,
    ) {
        // A reconnecting agent replaces its old session: free its ports first.
        self.registry.end(&peer).await;
        // Only an agent that names every tunnel it has releases the others.
        let mut grants = if hello.lease_lifecycle {
            let (tunnels, paused) = (&hello.tunnels, &hello.paused);
            self.leases.acquire_all(peer, tunnels, paused).await
        } else {
            self.leases.acquire(peer, &hello.tunnels).await
        };
        let cancel = CancellationToken::new();
        // The UDP side, when a tunnel asks for UDP and the gateway carries it.
        let udp = (self.udp.cfg.enabled && hello.tunnels.iter().any(|t| t.proto.udp()))
            .then(|| self.udp.session(peer, &cancel));
        let ports = self
            .open_ports(peer, connection, &mut grants, &hello.tunnels, udp.as_ref())
            .await;
        let n_ports = ports.len();
        let ports = self.serve_ports(ports, &cancel);
        let remote = self.host.state.remote_addr(&peer);
        // Revoked leases of this session: their ports are closed already.
        let (notices, mut revoked) = tokio::sync::mpsc::unbounded_channel();
        // Registered before the welcome: an agent reserves on the relay as soon as
        // it is welcomed, and the relay asks the registry who is a member.
        let id = self.registry.register(
            peer,
            NewSession {
                connection,
                remote: remote.clone(),
                ports,
                cancel: cancel.clone(),
                notices,
            },
        );
        let welcome = Welcome {
            version: WIRE_VERSION,
            public_hosts: self.public_hosts.clone(),
            leases: grants.clone(),
            lane_port: self.lane_port,
            lanes: self.lane_port.map(|_| self.lanes.get()),
            lane_flow: self
                .lane_port
                .map(|_| relaygate_common::lane::LaneFlow::TUNED_VERSION),
            lease_retry: true,
            fleet: if hello.fleet {
                self.fleet.for_agents()
            } else {
                Vec::new()
            },
            fleet_hosts: self.fleet_hosts.clone(),
            node_claims: true,
            udp: self
                .udp
                .cfg
                .enabled
                .then(|| relaygate_common::protocol::UdpOffer {
                    port: self.udp.cfg.channel_port(),
                }),
        };
        let mut told = welcome.fleet.clone();
        // Only membership: ports changing elsewhere concern the forwarder.
        let mut fleet_changes = self.fleet.member_changes();
        if let Err(e) = write_control(&mut ctl, &ControlMessage::Welcome(welcome)).await {
            tracing::info!(%peer, error = %e, "agent left before welcome");
            cancel.cancel();
            if let Some(u) = &udp {
                self.udp.end(u);
            }
            self.registry.unregister(&peer, id);
            return;
        }
        tracing::info!(
            %peer, admitted = how, remote = remote.as_ref().map(|a| a.to_string()).unwrap_or_default(),
            tunnels = %describe(&grants), "agent session up"
        );
        self.metrics.sessions_opened.inc();
        self.metrics.sessions_active.inc();
        self.metrics.tunnels_active.inc_by(n_ports as i64);

        // The session lives as long as the control stream. On it the agent
        // may ask again for tunnels refused for a passing reason.
        let mut n_ports = n_ports;
        // Node claims are checked on tasks of their own; the verdicts come back here.
        let (verdicts, mut verdict) = tokio::sync::mpsc::channel(16);
        // Cancel safe: a verdict or a fleet change never costs a frame half read.
        let mut reader = ControlReader::default();
        let checking: Arc<
            std::sync::Mutex<std::collections::HashSet<relaygate_common::names::TunnelName>>,
        > = Arc::default();
        let end = loop {
            let msg = tokio::select! {
                r = reader.next(&mut ctl) => r,
                _ = cancel.cancelled() => break "replaced by a new session".to_string(),
                Some(v) = verdict.recv() => {
                    if let Err(e) = write_control(&mut ctl, &v).await {
                        break e.to_string();
                    }
                    continue;
                }
                Some(notice) = revoked.recv() => {
                    n_ports = n_ports.saturating_sub(1);
                    self.metrics.tunnels_active.dec();
                    if !hello.lease_lifecycle {
                        // It would end the session on a message it does not
                        // know; ended here, it asks again as it reconnects.
                        break format!("lease of tunnel {} revoked ({}); an agent from before LeaseRevoked reconnects to ask again", notice.tunnel, notice.reason);
                    }
                    tracing::info!(%peer, tunnel = %notice.tunnel, reason = %notice.reason, "telling the agent its lease was revoked");
                    let msg = ControlMessage::LeaseRevoked {
                        tunnel: notice.tunnel,
                        reason: notice.reason,
                    };
                    if let Err(e) = write_control(&mut ctl, &msg).await {
                        break e.to_string();
                    }
                    continue;
                }
                Ok(()) = fleet_changes.changed(), if hello.fleet => {
                    let now = self.fleet.for_agents();
                    if now != told {
                        told = now.clone();
                        let update = ControlMessage::Fleet { gateways: now };
                        if let Err(e) = write_control(&mut ctl, &update).await {
                            break e.to_string();
                        }
                    }
                    continue;
                }
            };
            match msg {
                Ok(ControlMessage::Lease { tunnels }) => {
                    // Paced: an agent asks again every few seconds at most.
                    tokio::time::sleep(LEASE_RETRY_PACE).await;
                    // A tunnel this session serves already keeps its port
                    // (asked twice, say): neither moved nor bound again.
                    let (served, asked): (Vec<_>, Vec<_>) = tunnels
                        .into_iter()
                        .partition(|t| self.registry.tunnel(&peer, id, &t.name).is_some());
                    let mut grants = self.leases.acquire(peer, &asked).await;
                    let ports = self
                        .open_ports(peer, connection, &mut grants, &asked, udp.as_ref())
                        .await;
                    n_ports += ports.len();
                    self.metrics.tunnels_active.inc_by(ports.len() as i64);
                    let ports = self.serve_ports(ports, &cancel);
                    self.registry.add_tunnels(&peer, id, ports);
                    grants.extend(served.into_iter().filter_map(|t| {
                        let (_, port) = self.registry.tunnel(&peer, id, &t.name)?;
                        Some(LeaseGrant {
                            name: t.name,
                            outcome: LeaseOutcome::Granted { port },
                        })
                    }));
                    tracing::info!(%peer, tunnels = %describe(&grants), "leases asked again");
                    let answer = ControlMessage::Leases { leases: grants };
                    if let Err(e) = write_control(&mut ctl, &answer).await {
                        break e.to_string();
                    }
                }
                Ok(ControlMessage::Nodes { claims }) => {
                    // Paced as a lease request: each claim costs a handshake.
                    tokio::time::sleep(LEASE_RETRY_PACE).await;
                    // One check per tunnel at a time: a claim repeated while
                    // its check runs gets that check's verdict.
                    for claim in claims {
                        if !lock(&checking).insert(claim.tunnel.clone()) {
                            continue;
                        }
                        let me = self.clone();
                        let (tx, cancel, checking) =
                            (verdicts.clone(), cancel.clone(), checking.clone());
                        self.dataplane.tracker.spawn(async move {
                            let tunnel = claim.tunnel.clone();
                            let v = me.check_claim(peer, id, claim, &cancel).await;
                            lock(&checking).remove(&tunnel);
                            let _ = tx.send(v).await;
                        });
                    }
                }
                Ok(msg) => {
                    self.metrics.bad_input("unexpected_message");
                    self.host
                        .violation(&self.guard, peer, "unexpected_message")
                        .await;
                    break format!("unexpected {msg:?}");
                }
                Err(WireError::Truncated) => break "agent closed the session".into(),
                Err(e) => break e.to_string(),
            }
        };
        cancel.cancel();
        if let Some(u) = &udp {
            self.udp.end(u);
        }
        self.nodes.release(&peer, id);
        // Close, not drop: a dropped QUIC stream is reset and may lose what was written.
        let _ = tokio::time::timeout(Duration::from_secs(1), ctl.shutdown()).await;
        if self.registry.unregister(&peer, id) {
            // Its leases were in use until now: expiry counts from here.
            self.leases.touch_soon(self.leases.keys_of(&peer));
            // Its cap buckets go too: an agent that comes back starts afresh.
            self.dataplane.caps.forget(&peer);
        }
        self.metrics.sessions_active.dec();
        self.metrics.tunnels_active.dec_by(n_ports as i64);
        tracing::info!(%peer, reason = %end, "agent session down; its public ports refuse connections until it returns");
    }

    /// Answers `Refused`; `bad` names the kind of bad input, when it was that.
    async fn refuse(
        &self,
        peer: PeerId,
        ctl: &mut Control,
        code: RefusalCode,
        message: String,
        bad: Option<&str>,
    ) {
        if let Some(kind) = bad {
            self.metrics.bad_input(kind);
            self.host.violation(&self.guard, peer, kind).await;
        }
        self.metrics.refuse(code.as_str());
        tracing::warn!(%peer, code = code.as_str(), %message, "refused control stream");
        let _ = write_control(ctl, &ControlMessage::Refused(Refusal { code, message })).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), ctl.shutdown()).await;
    }
}

fn describe(grants: &[LeaseGrant]) -> String {
    grants
        .iter()
        .map(|g| match &g.outcome {
            LeaseOutcome::Granted { port } => format!("{}=:{port}", g.name),
            LeaseOutcome::Refused { code, .. } => format!("{}=refused({})", g.name, code.as_str()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
