//! The public connections open now: each with its agent and tunnel, its real
//! source (after the PROXY policy), the dialer's peer id where known, and
//! its bytes each way, counted by its copy loops. The console lists them
//! per agent. A connection is in the table from its start to its end.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::SystemTime,
};

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use relaygate_common::{meter::Tally, names::TunnelName};
use serde::Serialize;

use crate::caps::{Caps, ConnPacers};

pub struct LiveConn {
    pub id: u64,
    /// Agent and tunnel, shared with the connection's pacers.
    pub key: Arc<(PeerId, TunnelName)>,
    pub port: u16,
    pub source: SocketAddr,
    /// Boxed: most connections have none, and this lives once per connection.
    pub peer: Option<Box<PeerId>>,
    pub since: SystemTime,
    /// Client -> node.
    pub inbound: AtomicU64,
    /// Node -> client.
    pub outbound: AtomicU64,
    /// Its caps' pacers, here rather than in the connection's task, so an
    /// idle connection's task stays as small as before.
    pace: ConnPacers,
}

/// A connection as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnView {
    pub id: u64,
    pub tunnel: String,
    pub port: u16,
    pub source: String,
    pub peer: Option<String>,
    /// Unix seconds.
    pub since: u64,
    pub bytes_inbound: u64,
    pub bytes_outbound: u64,
}

impl LiveConn {
    fn view(&self) -> ConnView {
        ConnView {
            id: self.id,
            tunnel: self.key.1.to_string(),
            port: self.port,
            source: self.source.to_string(),
            peer: self.peer.as_ref().map(|p| p.to_string()),
            since: relaygate_common::clock::unix_secs(self.since),
            bytes_inbound: self.inbound.load(Ordering::Relaxed),
            bytes_outbound: self.outbound.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<LiveConn>>>,
    /// Bytes of connections that ended, each way, so the totals only grow.
    closed_inbound: AtomicU64,
    closed_outbound: AtomicU64,
}

/// What a connection is known by at its start.
pub struct NewConn {
    pub agent: PeerId,
    pub tunnel: TunnelName,
    pub port: u16,
    pub source: SocketAddr,
    pub peer: Option<PeerId>,
}

impl LiveConns {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        // Single inserts and removes: a panic leaves the map consistent.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a connection, with its pacers; it leaves when the result drops.
    pub fn open(self: &Arc<Self>, caps: &Arc<Caps>, c: NewConn) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let key = Arc::new((c.agent, c.tunnel));
        let conn = Arc::new(LiveConn {
            id,
            pace: caps.pacers(key.clone()),
            key,
            port: c.port,
            source: c.source,
            peer: c.peer.map(Box::new),
            since: SystemTime::now(),
            inbound: AtomicU64::new(0),
            outbound: AtomicU64::new(0),
        });
        self.lock().insert(id, conn.clone());
        Tracked {
            table: self.clone(),
            conn,
        }
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Bytes carried since start, each way (inbound, outbound), open
    /// connections included.
    pub fn totals(&self) -> (u64, u64) {
        let open = self.lock();
        let (mut i, mut o) = (
            self.closed_inbound.load(Ordering::Relaxed),
            self.closed_outbound.load(Ordering::Relaxed),
        );
        for c in open.values() {
            i += c.inbound.load(Ordering::Relaxed);
            o += c.outbound.load(Ordering::Relaxed);
        }
        (i, o)
    }

    /// Each agent's connections, newest first, at most `limit` each, and
    /// how many it has in all.
    pub fn by_agent(&self, limit: usize) -> HashMap<PeerId, (Vec<ConnView>, usize)> {
        let conns: Vec<Arc<LiveConn>> = self.lock().values().cloned().collect();
        let mut out: HashMap<PeerId, (Vec<Arc<LiveConn>>, usize)> = HashMap::new();
        for c in conns {
            let e = out.entry(c.key.0).or_default();
            e.1 += 1;
            e.0.push(c);
        }
        out.into_iter()
            .map(|(agent, (mut v, n))| {
                v.sort_by_key(|c| std::cmp::Reverse(c.id));
                v.truncate(limit);
                (agent, (v.iter().map(|c| c.view()).collect(), n))
            })
            .collect()
    }
}

/// A connection in the table, with its pacers; leaves the table on drop.
pub struct Tracked {
    table: Arc<LiveConns>,
    pub conn: Arc<LiveConn>,
}

impl Tracked {
    /// Counts client -> node bytes into `tunnel` and this connection, paced
    /// by the caps.
    pub fn inbound<'a>(&'a self, tunnel: &'a Counter) -> Tally<'a> {
        Tally::new(tunnel)
            .own(&self.conn.inbound)
            .paced(Some(&self.conn.pace.inbound))
    }

    pub fn outbound<'a>(&'a self, tunnel: &'a Counter) -> Tally<'a> {
        Tally::new(tunnel)
            .own(&self.conn.outbound)
            .paced(Some(&self.conn.pace.outbound))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Under the table's lock, so `totals` never counts it twice or not at all.
        let mut open = self.table.lock();
        open.remove(&self.conn.id);
        let c = &self.conn;
        let t = &self.table;
        t.closed_inbound
            .fetch_add(c.inbound.load(Ordering::Relaxed), Ordering::Relaxed);
        t.closed_outbound
            .fetch_add(c.outbound.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
