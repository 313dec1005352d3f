//! The relay's books: who holds a reservation (per connection, with expiry and
//! class) and which circuits are open (per peer and per source IP), with the
//! caps from `[relay]`. Slots are RAII guards, so a circuit that ends for any
//! reason gives its place back.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::circuit::Status;

use crate::{
    config::RelayConfig,
    metrics::{RelayMetrics, ReservationClass},
};

#[derive(Clone, Copy, Debug)]
pub struct Reservation {
    pub connection: ConnectionId,
    pub class: ReservationClass,
    pub ip: Option<IpAddr>,
    pub expires: Instant,
    /// Unix seconds of `expires`, as sent to the holder.
    pub expires_unix: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reserved {
    New,
    Renewed,
}

#[derive(Default)]
struct Books {
    reservations: HashMap<PeerId, HashMap<ConnectionId, Reservation>>,
    circuits_total: usize,
    circuits_from: HashMap<PeerId, usize>,
    circuits_to: HashMap<PeerId, usize>,
    circuits_per_ip: HashMap<IpAddr, usize>,
}

pub struct Reservations {
    cfg: RelayConfig,
    books: Mutex<Books>,
}

impl Reservations {
    pub fn new(cfg: RelayConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            books: Mutex::new(Books::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or renews) `peer`'s reservation on `connection`, within the caps.
    pub fn reserve(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        class: ReservationClass,
        ip: Option<IpAddr>,
    ) -> Result<(Reserved, Reservation), Status> {
        let now = Instant::now();
        let ttl = self.cfg.reservation_ttl;
        let expires_unix = SystemTime::now()
            .checked_add(ttl)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        let r = Reservation {
            connection,
            class,
            ip,
            expires: now + ttl,
            expires_unix,
        };
        let mut b = self.lock();
        if let Some(existing) = b
            .reservations
            .get_mut(&peer)
            .and_then(|m| m.get_mut(&connection))
        {
            *existing = r;
            return Ok((Reserved::Renewed, r));
        }
        // Expired entries wait for the next sweep; they do not count.
        let live = |r: &&Reservation| r.expires > now;
        let total = b
            .reservations
            .values()
            .flat_map(HashMap::values)
            .filter(live)
            .count();
        let of_peer = b
            .reservations
            .get(&peer)
            .map_or(0, |m| m.values().filter(live).count());
        let of_ip = ip.map_or(0, |ip| {
            b.reservations
                .values()
                .flat_map(HashMap::values)
                .filter(live)
                .filter(|x| x.ip == Some(ip))
                .count()
        });
        if total >= self.cfg.max_reservations
            || of_peer >= self.cfg.max_reservations_per_peer
            || of_ip >= self.cfg.max_reservations_per_ip
        {
            return Err(Status::ResourceLimitExceeded);
        }
        b.reservations
            .entry(peer)
            .or_default()
            .insert(connection, r);
        Ok((Reserved::New, r))
    }

    /// The newest live reservation of `peer` whose connection `is_open`.
    pub fn lookup(
        &self,
        peer: &PeerId,
        is_open: impl Fn(ConnectionId) -> bool,
    ) -> Option<Reservation> {
        let now = Instant::now();
        let b = self.lock();
        b.reservations
            .get(peer)?
            .iter()
            .filter(|(c, r)| r.expires > now && is_open(**c))
            .map(|(_, r)| *r)
            .max_by_key(|r| r.expires)
    }

    /// Ends `peer`'s reservation on `connection`, if it has one.
    pub fn remove(&self, peer: &PeerId, connection: ConnectionId) -> bool {
        let mut b = self.lock();
        let Some(m) = b.reservations.get_mut(peer) else {
            return false;
        };
        let had = m.remove(&connection).is_some();
        if m.is_empty() {
            b.reservations.remove(peer);
        }
        had
    }

    /// Drops expired reservations and those whose connection closed; returns
    /// how many are left and the connections that lost theirs.
    pub fn sweep(&self, is_open: impl Fn(ConnectionId) -> bool) -> (usize, Vec<ConnectionId>) {
        let now = Instant::now();
        let mut b = self.lock();
        let mut dropped = Vec::new();
        for m in b.reservations.values_mut() {
            m.retain(|c, r| {
                let keep = r.expires > now && is_open(*c);
                if !keep {
                    dropped.push(*c);
                }
                keep
            });
        }
        b.reservations.retain(|_, m| !m.is_empty());
        (b.reservations.values().map(HashMap::len).sum(), dropped)
    }

    /// Takes a circuit slot for `src` (from `ip`) to `dst`, within the caps.
    pub fn open_circuit(
        self: &Arc<Self>,
        src: PeerId,
        dst: PeerId,
        ip: Option<IpAddr>,
        metrics: &RelayMetrics,
    ) -> Result<CircuitSlot, Status> {
        let mut b = self.lock();
        let count = |m: &HashMap<PeerId, usize>, p: &PeerId| m.get(p).copied().unwrap_or(0);
        let of_ip = ip.map_or(0, |ip| b.circuits_per_ip.get(&ip).copied().unwrap_or(0));
        if b.circuits_total >= self.cfg.max_circuits
            || count(&b.circuits_from, &src) >= self.cfg.max_circuits_per_source
            || count(&b.circuits_to, &dst) >= self.cfg.max_circuits_per_destination
            || of_ip >= self.cfg.max_circuits_per_ip
        {
            return Err(Status::ResourceLimitExceeded);
        }
        b.circuits_total += 1;
        *b.circuits_from.entry(src).or_default() += 1;
        *b.circuits_to.entry(dst).or_default() += 1;
        if let Some(ip) = ip {
            *b.circuits_per_ip.entry(ip).or_default() += 1;
        }
        metrics.circuits_active.inc();
        Ok(CircuitSlot {
            books: self.clone(),
            src,
            dst,
            ip,
            active: metrics.circuits_active.clone(),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.cfg.reservation_ttl
    }
}

/// One open circuit's place in the caps; dropping it frees the place.
pub struct CircuitSlot {
    books: Arc<Reservations>,
    src: PeerId,
    dst: PeerId,
    ip: Option<IpAddr>,
    active: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for CircuitSlot {
    fn drop(&mut self) {
        let mut b = self.books.lock();
        b.circuits_total = b.circuits_total.saturating_sub(1);
        let b = &mut *b;
        release(&mut b.circuits_from, self.src);
        release(&mut b.circuits_to, self.dst);
        if let Some(ip) = self.ip {
            release(&mut b.circuits_per_ip, ip);
        }
        self.active.dec();
    }
}

/// Takes one from a per-key count, forgetting keys that reach zero.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayConfig {
        RelayConfig {
            max_reservations: 3,
            max_reservations_per_peer: 2,
            max_reservations_per_ip: 2,
            max_circuits: 2,
            max_circuits_per_source: 2,
            max_circuits_per_destination: 1,
            max_circuits_per_ip: 2,
            ..RelayConfig::default()
        }
    }

    #[test]
    fn reservation_caps_and_renewal() {
        let r = Reservations::new(cfg());
        let (a, b) = (PeerId::random(), PeerId::random());
        let (c1, c2, c3) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
        );
        let ip: IpAddr = [198, 51, 100, 1].into();
        let m = ReservationClass::Member;
        assert_eq!(
            r.reserve(a, c1, m, Some(ip)).map(|x| x.0),
            Ok(Reserved::New)
        );
        assert_eq!(
            r.reserve(a, c1, m, Some(ip)).map(|x| x.0),
            Ok(Reserved::Renewed)
        );
        assert_eq!(
            r.reserve(a, c2, m, Some(ip)).map(|x| x.0),
            Ok(Reserved::New)
        );
        // per peer: a holds 2
        assert_eq!(
            r.reserve(a, c3, m, None).map(|x| x.0),
            Err(Status::ResourceLimitExceeded)
        );
        // per ip: 198.51.100.1 holds 2
        assert_eq!(
            r.reserve(b, c3, m, Some(ip)).map(|x| x.0),
            Err(Status::ResourceLimitExceeded)
        );
        assert_eq!(r.reserve(b, c3, m, None).map(|x| x.0), Ok(Reserved::New));
        assert!(r.lookup(&a, |c| c == c2).is_some());
        assert!(r.lookup(&b, |_| false).is_none(), "closed connection");
        assert_eq!(
            r.sweep(|c| c != c3).0,
            2,
            "a keeps c1 and c2, b's c3 closed"
        );
        assert!(r.remove(&a, c1));
        assert_eq!(r.sweep(|_| true).0, 1);
    }

    #[test]
    fn circuit_slots_are_returned_on_drop() {
        let r = Reservations::new(cfg());
        let metrics = RelayMetrics::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let slot = r.open_circuit(a, b, None, &metrics);
        assert!(slot.is_ok());
        assert_eq!(metrics.circuits_active.get(), 1);
        // b already has one circuit (per-destination cap 1)
        assert!(r.open_circuit(c, b, None, &metrics).is_err());
        drop(slot);
        assert_eq!(metrics.circuits_active.get(), 0);
        assert!(r.open_circuit(c, b, None, &metrics).is_ok());
    }

    #[test]
    fn sources_and_destinations_are_capped_apart() {
        let r = Reservations::new(RelayConfig {
            max_circuits: 10,
            max_circuits_per_source: 2,
            max_circuits_per_destination: 3,
            ..cfg()
        });
        let metrics = RelayMetrics::default();
        let stranger = PeerId::random();
        let member = PeerId::random();
        let a = r.open_circuit(stranger, member, None, &metrics);
        let b = r.open_circuit(stranger, member, None, &metrics);
        assert!(a.is_ok() && b.is_ok());
        // the stranger's own cap stops it, leaving the member's last slot free
        assert!(r.open_circuit(stranger, member, None, &metrics).is_err());
        let other = r.open_circuit(PeerId::random(), member, None, &metrics);
        assert!(other.is_ok());
        assert!(r
            .open_circuit(PeerId::random(), member, None, &metrics)
            .is_err());
        // a member that is itself a source of many circuits still takes new ones
        let c = r.open_circuit(member, stranger, None, &metrics);
        assert!(c.is_ok());
    }
}
