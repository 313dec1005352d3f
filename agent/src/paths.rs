//! Connections to other peers and how they run: relayed through the gateway
//! or direct. Keeps the hole-punch record of each peer (started when a
//! relayed connection appears with no direct one; done at the first direct
//! connection or when DCUtR gives up). Written by the host, read by services
//! and the admin API (`/v1/peers`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use libp2p::{swarm::ConnectionId, Multiaddr, PeerId};
use serde::Serialize;

use crate::metrics::Transport;

#[derive(Clone, Debug, Serialize)]
pub struct PunchRecord {
    /// Transport of the relayed connection that started it.
    pub transport: String,
    /// Milliseconds since the UNIX epoch.
    pub started_ms: u64,
    /// Time from the relayed connection to the first direct one.
    pub direct_after_ms: Option<u64>,
    /// Transport of the direct connection.
    pub direct_transport: Option<String>,
    pub dial_failures: u32,
    /// `success`, `failure: <why>`, or absent while under way.
    pub result: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub peer: String,
    pub relayed_connections: usize,
    pub direct_connections: usize,
    pub holepunch: Option<PunchRecord>,
}

/// What a new connection meant for hole punching.
pub enum PunchEvent {
    /// A relayed connection with no direct one: a punch starts.
    Started(Transport),
    /// The first direct connection after a relayed one.
    Succeeded {
        transport: Transport,
        after: Duration,
    },
}

struct Conn {
    peer: PeerId,
    remote: Multiaddr,
    relayed: bool,
}

struct Punch {
    started: Instant,
    record: PunchRecord,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ConnectionId, Conn>,
    punches: HashMap<PeerId, Punch>,
}

#[derive(Default)]
pub struct Paths {
    inner: Mutex<Inner>,
}

impl Paths {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection; says whether it started or completed a hole punch.
    pub fn connection_up(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        remote: Multiaddr,
        relayed: bool,
        address: &Multiaddr,
    ) -> Option<PunchEvent> {
        let mut g = self.lock();
        let had_direct = g.conns.values().any(|c| c.peer == peer && !c.relayed);
        g.conns.insert(
            connection,
            Conn {
                peer,
                remote,
                relayed,
            },
        );
        let transport = Transport::of(address);
        if relayed {
            if had_direct
                || g.punches
                    .get(&peer)
                    .is_some_and(|p| p.record.result.is_none())
            {
                return None;
            }
            let started_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            g.punches.insert(
                peer,
                Punch {
                    started: Instant::now(),
                    record: PunchRecord {
                        transport: label(transport).into(),
                        started_ms,
                        direct_after_ms: None,
                        direct_transport: None,
                        dial_failures: 0,
                        result: None,
                    },
                },
            );
            return Some(PunchEvent::Started(transport));
        }
        let p = g.punches.get_mut(&peer)?;
        if p.record.result.is_some() {
            return None;
        }
        let after = p.started.elapsed();
        p.record.direct_after_ms = Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        p.record.direct_transport = Some(label(transport).into());
        p.record.result = Some("success".into());
        Some(PunchEvent::Succeeded { transport, after })
    }

    pub fn connection_down(&self, connection: ConnectionId) {
        let mut g = self.lock();
        let Some(gone) = g.conns.remove(&connection) else {
            return;
        };
        let peer = gone.peer;
        let left = g.conns.values().filter(|c| c.peer == peer).count();
        let relayed_left = g.conns.values().any(|c| c.peer == peer && c.relayed);
        if left == 0 {
            // Records live as long as the peer's connections: memory stays bounded.
            g.punches.remove(&peer);
        } else if !relayed_left {
            if let Some(p) = g.punches.get_mut(&peer) {
                if p.record.result.is_none() {
                    p.record.result = Some("abandoned: the relayed connection closed".into());
                }
            }
        }
    }

    /// A direct dial to `peer` failed; counts toward its punch if one is under way.
    pub fn dial_failed(&self, peer: &PeerId) -> bool {
        let mut g = self.lock();
        match g.punches.get_mut(peer) {
            Some(p) if p.record.result.is_none() => {
                p.record.dial_failures += 1;
                true
            }
            _ => false,
        }
    }

    /// DCUtR gave up on `peer`; returns the punch's transport if it was under way.
    pub fn punch_failed(&self, peer: &PeerId, why: String) -> Option<Transport> {
        let mut g = self.lock();
        let p = g.punches.get_mut(peer)?;
        if p.record.result.is_some() {
            return None;
        }
        p.record.result = Some(format!("failure: {why}"));
        Some(match p.record.transport.as_str() {
            "quic" => Transport::Quic,
            "tcp" => Transport::Tcp,
            _ => Transport::Other,
        })
    }

    /// The remote address of a connection and whether it is relayed.
    pub fn remote(&self, connection: ConnectionId) -> Option<(Multiaddr, bool)> {
        self.lock()
            .conns
            .get(&connection)
            .map(|c| (c.remote.clone(), c.relayed))
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.lock().conns.values().any(|c| c.peer == *peer)
    }

    pub fn snapshot(&self) -> Vec<PeerView> {
        let g = self.lock();
        let mut peers: HashMap<PeerId, PeerView> = HashMap::new();
        for c in g.conns.values() {
            let v = peers.entry(c.peer).or_insert_with(|| PeerView {
                peer: c.peer.to_string(),
                relayed_connections: 0,
                direct_connections: 0,
                holepunch: None,
            });
            if c.relayed {
                v.relayed_connections += 1;
            } else {
                v.direct_connections += 1;
            }
        }
        for (peer, p) in &g.punches {
            peers
                .entry(*peer)
                .or_insert_with(|| PeerView {
                    peer: peer.to_string(),
                    relayed_connections: 0,
                    direct_connections: 0,
                    holepunch: None,
                })
                .holepunch = Some(p.record.clone());
        }
        let mut out: Vec<PeerView> = peers.into_values().collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

fn label(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Quic => "quic",
        Transport::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punch_starts_on_relayed_and_succeeds_on_direct() {
        let paths = Paths::default();
        let peer = PeerId::random();
        let relay_addr: Multiaddr = "/ip4/203.0.113.1/tcp/4001/p2p-circuit".parse().unwrap();
        let direct: Multiaddr = "/ip4/203.0.113.20/tcp/5000".parse().unwrap();
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        assert!(matches!(
            paths.connection_up(peer, c1, relay_addr.clone(), true, &relay_addr),
            Some(PunchEvent::Started(Transport::Tcp))
        ));
        assert!(paths.dial_failed(&peer));
        assert!(matches!(
            paths.connection_up(peer, c2, direct.clone(), false, &direct),
            Some(PunchEvent::Succeeded {
                transport: Transport::Tcp,
                ..
            })
        ));
        let v = paths.snapshot();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].relayed_connections, v[0].direct_connections), (1, 1));
        let rec = v[0].holepunch.clone().unwrap();
        assert_eq!(rec.dial_failures, 1);
        assert_eq!(rec.result.as_deref(), Some("success"));
        assert!(paths.punch_failed(&peer, "late".into()).is_none());
        assert_eq!(paths.remote(c1).map(|r| r.1), Some(true));
    }
}
