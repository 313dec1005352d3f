//! Live agent sessions: who is connected, since when, from where, and what each
//! tunnel has carried. Read by the admin API; written by sessions.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use libp2p::{swarm::ConnectionId, Multiaddr, PeerId};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use relaygate_common::names::{LeasePort, TunnelName};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Counters of one tunnel; the same atomics back `/metrics` and `/v1/agents`.
pub struct TunnelStats {
    pub name: TunnelName,
    pub port: LeasePort,
    pub active: Gauge,
    pub opened: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// The last few source addresses, newest last, for `/v1/agents`.
    recent: std::sync::Mutex<std::collections::VecDeque<std::net::SocketAddr>>,
}

/// How many recent sources each tunnel remembers.
const RECENT_SOURCES: usize = 16;

impl TunnelStats {
    /// Records a connection's source.
    pub fn saw(&self, source: std::net::SocketAddr) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == RECENT_SOURCES {
            r.pop_front();
        }
        r.push_back(source);
    }

    fn recent_sources(&self) -> Vec<String> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    pub fn new(metrics: &Metrics, agent: &PeerId, name: TunnelName, port: LeasePort) -> Self {
        let (opened, bytes_in, bytes_out) = metrics.tunnel(&agent.to_string(), name.as_str());
        Self {
            opened,
            bytes_in,
            bytes_out,
            active: Gauge::default(),
            recent: Default::default(),
            name,
            port,
        }
    }
}

struct Entry {
    id: u64,
    connection: ConnectionId,
    since: SystemTime,
    remote: Option<Multiaddr>,
    ports: Vec<OpenPort>,
    cancel: CancellationToken,
    notices: Notices,
}

/// Where a session hears that one of its leases was revoked.
pub type Notices = tokio::sync::mpsc::UnboundedSender<LeaseNotice>;

/// A leased port a session serves: the task accepting on it, which ends
/// when `stop` (a child of the session's token) is cancelled.
pub struct OpenPort {
    pub stats: Arc<TunnelStats>,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

/// Told to a session when one of its tunnels lost its lease (revoked), so
/// it tells its agent.
#[derive(Debug)]
pub struct LeaseNotice {
    pub tunnel: TunnelName,
    pub reason: String,
}

/// A session about to be registered.
pub struct NewSession {
    /// The session's connection: tunnel streams go there.
    pub connection: ConnectionId,
    pub remote: Option<Multiaddr>,
    pub ports: Vec<OpenPort>,
    pub cancel: CancellationToken,
    pub notices: Notices,
}

pub struct AgentRegistry {
    inner: Mutex<HashMap<PeerId, Entry>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Bumped whenever the set of sessions or their ports changes: the
    /// fleet's forwarder follows it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for AgentRegistry {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            next_id: Default::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Where a public connection on a leased port goes: the agent's session.
pub struct PortOwner {
    pub agent: PeerId,
    pub connection: ConnectionId,
    pub stats: Arc<TunnelStats>,
}

#[derive(Serialize)]
pub struct AgentView {
    pub peer_id: String,
    /// Seconds since the UNIX epoch.
    pub since: u64,
    pub remote_addr: Option<String>,
    pub tunnels: Vec<TunnelView>,
}

#[derive(Serialize)]
pub struct TunnelView {
    pub name: String,
    pub port: u16,
    pub connections_active: i64,
    pub connections_total: u64,
    pub bytes_inbound: u64,
    pub bytes_outbound: u64,
    /// Source addresses of the latest connections, oldest first.
    pub recent_sources: Vec<String>,
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the agent's current session, if any, and waits until its public
    /// ports are closed, so a reconnecting agent can bind them again.
    pub async fn end(&self, peer: &PeerId) {
        let old = self.lock().remove(peer);
        if let Some(old) = old {
            self.changed.send_modify(|n| *n += 1);
            old.cancel.cancel();
            for p in old.ports {
                let _ = p.task.await;
            }
        }
    }

    /// Registers a session; returns its id for [`Self::unregister`].
    pub fn register(&self, peer: PeerId, s: NewSession) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            id,
            connection: s.connection,
            since: SystemTime::now(),
            remote: s.remote,
            ports: s.ports,
            cancel: s.cancel,
            notices: s.notices,
        };
        if let Some(old) = self.lock().insert(peer, entry) {
            old.cancel.cancel();
        }
        self.changed.send_modify(|n| *n += 1);
        id
    }

    /// Adds ports opened later in session `id` of `peer` (a lease asked
    /// again); if that session is gone, they end with it.
    pub fn add_tunnels(&self, peer: &PeerId, id: u64, ports: Vec<OpenPort>) {
        let mut m = self.lock();
        match m.get_mut(peer).filter(|e| e.id == id) {
            Some(e) => {
                e.ports.extend(ports);
                self.changed.send_modify(|n| *n += 1);
            }
            None => ports.iter().for_each(|p| p.task.abort()),
        }
    }

    /// Stops serving `peer`'s tunnel `name` (its session goes on): returns
    /// the accepting task, to wait until the port is closed, and where to
    /// tell the session. Connections already open are left to finish.
    pub fn close_tunnel(
        &self,
        peer: &PeerId,
        name: &TunnelName,
    ) -> Option<(JoinHandle<()>, Notices)> {
        let mut m = self.lock();
        let e = m.get_mut(peer)?;
        let i = e.ports.iter().position(|p| p.stats.name == *name)?;
        let port = e.ports.remove(i);
        port.stop.cancel();
        self.changed.send_modify(|n| *n += 1);
        Some((port.task, e.notices.clone()))
    }

    /// Every (agent, tunnel, port) served here.
    pub fn served(&self) -> Vec<(PeerId, TunnelName, LeasePort)> {
        self.lock()
            .iter()
            .flat_map(|(agent, e)| {
                e.ports
                    .iter()
                    .map(|p| (*agent, p.stats.name.clone(), p.stats.port))
            })
            .collect()
    }

    /// Agents with a session here.
    pub fn agents(&self) -> std::collections::HashSet<PeerId> {
        self.lock().keys().copied().collect()
    }

    /// Follows changes of the sessions and their ports.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The session serving leased `port`, if this gateway holds it.
    pub fn port(&self, port: u16) -> Option<PortOwner> {
        self.lock().iter().find_map(|(agent, e)| {
            e.ports
                .iter()
                .find(|p| p.stats.port.get() == port)
                .map(|p| PortOwner {
                    agent: *agent,
                    connection: e.connection,
                    stats: p.stats.clone(),
                })
        })
    }

    /// Session `id` of `peer`'s tunnel `name`: the session's connection and
    /// the tunnel's port.
    pub fn tunnel(
        &self,
        peer: &PeerId,
        id: u64,
        name: &TunnelName,
    ) -> Option<(ConnectionId, LeasePort)> {
        let m = self.lock();
        let e = m.get(peer).filter(|e| e.id == id)?;
        let p = e.ports.iter().find(|p| p.stats.name == *name)?;
        Some((e.connection, p.stats.port))
    }

    /// Every leased port this gateway serves.
    pub fn ports(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self
            .lock()
            .values()
            .flat_map(|e| e.ports.iter().map(|p| p.stats.port.get()))
            .collect();
        out.sort_unstable();
        out
    }

    /// Removes the session `id` of `peer` (not a newer one that replaced it).
    pub fn unregister(&self, peer: &PeerId, id: u64) -> bool {
        let mut m = self.lock();
        if m.get(peer).is_some_and(|e| e.id == id) {
            m.remove(peer);
            self.changed.send_modify(|n| *n += 1);
            true
        } else {
            false
        }
    }

    /// Cancelled when `peer`'s current session ends.
    pub fn cancel_token(&self, peer: &PeerId) -> Option<CancellationToken> {
        self.lock().get(peer).map(|e| e.cancel.clone())
    }

    /// Whether `peer` has a session now.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.lock().contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<AgentView> {
        let m = self.lock();
        let mut out: Vec<AgentView> = m
            .iter()
            .map(|(peer, e)| AgentView {
                peer_id: peer.to_string(),
                since: relaygate_common::clock::unix_secs(e.since),
                remote_addr: e.remote.as_ref().map(|a| a.to_string()),
                tunnels: e
                    .ports
                    .iter()
                    .map(|p| &p.stats)
                    .map(|t| TunnelView {
                        name: t.name.to_string(),
                        port: t.port.get(),
                        connections_active: t.active.get(),
                        connections_total: t.opened.get(),
                        bytes_inbound: t.bytes_in.get(),
                        bytes_outbound: t.bytes_out.get(),
                        recent_sources: t.recent_sources(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }
}
