//! Shares of a pool per source, so that one address (or one IPv6 /64, which
//! one host can fill with addresses) cannot take a whole pool: lane
//! handshakes in progress (also capped for the whole gateway), connections on
//! leased ports. A place is given back when its permit drops, however the
//! work it held ended.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::config::guard::Ipv6Prefix;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a place was not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// The gateway's cap is reached.
    Total,
    /// This source's share is reached.
    Source,
}

type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// What each source may hold of one pool.
pub struct Shares {
    /// Changed by a configuration reload; places already taken stay.
    share: std::sync::atomic::AtomicUsize,
    grouping: Ipv6Prefix,
    per_source: Counts,
}

/// One place of a source in a pool.
pub struct Share {
    source: IpAddr,
    per_source: Counts,
}

impl Shares {
    /// `share` places per source; IPv6 sources grouped by `grouping`.
    pub fn new(share: usize, grouping: Ipv6Prefix) -> Self {
        Self {
            share: std::sync::atomic::AtomicUsize::new(share.max(1)),
            grouping,
            per_source: Arc::default(),
        }
    }

    /// A new share per source, for places taken from now on.
    pub fn set_share(&self, share: usize) {
        self.share
            .store(share.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// A place for `ip`'s source, unless it holds its share already.
    pub fn try_take(&self, ip: IpAddr) -> Option<Share> {
        let source = self.grouping.source(ip);
        let mut counts = lock(&self.per_source);
        let held = counts.entry(source).or_default();
        if *held >= self.share.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        *held += 1;
        Some(Share {
            source,
            per_source: self.per_source.clone(),
        })
    }
}

impl Shares {
    /// A place for `ip`'s source past its share (counted, so its places
    /// above the share must be given back before it gets a new one when
    /// the share applies).
    fn take_past_share(&self, ip: IpAddr) -> Share {
        let source = self.grouping.source(ip);
        *lock(&self.per_source).entry(source).or_default() += 1;
        Share {
            source,
            per_source: self.per_source.clone(),
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut counts = lock(&self.per_source);
        if let Some(n) = counts.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// A pool of places for work in progress (lane handshakes, connections
/// being looked at or in their handshake, hop requests): a cap for the
/// gateway, and a share per source once half of it is taken. A quiet gateway lets one source (many
/// agents behind one NAT, starting at once) use what nobody else needs; a
/// busy one keeps the other half for everyone else.
pub struct Places {
    total: Arc<Semaphore>,
    size: usize,
    sources: Shares,
}

/// One place in a pool.
pub struct Permit {
    _total: OwnedSemaphorePermit,
    /// None for a trusted balancer, which speaks for many sources.
    _share: Option<Share>,
}

impl Places {
    pub fn new(total: usize, share: usize, grouping: Ipv6Prefix) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            size: total,
            sources: Shares::new(share, grouping),
        }
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<Permit, Busy> {
        let busy = self.total.available_permits() * 2 <= self.size;
        let share = match self.sources.try_take(ip) {
            Some(s) => s,
            None if busy => return Err(Busy::Source),
            None => self.sources.take_past_share(ip),
        };
        Ok(Permit {
            _total: self.take_total()?,
            _share: Some(share),
        })
    }

    /// A place under the cap only, for a peer that speaks for many sources
    /// (a trusted balancer: its clients are known only after their headers).
    pub fn try_acquire_unshared(&self) -> Result<Permit, Busy> {
        Ok(Permit {
            _total: self.take_total()?,
            _share: None,
        })
    }

    fn take_total(&self) -> Result<OwnedSemaphorePermit, Busy> {
        self.total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy::Total)
    }
}

/// At most `cap` at once per key (a connection's control streams).
pub struct PerKey<K: Copy + Eq + std::hash::Hash> {
    cap: usize,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

/// One of a key's places; given back on drop.
pub struct KeyPlace<K: Copy + Eq + std::hash::Hash> {
    key: K,
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Copy + Eq + std::hash::Hash> PerKey<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            held: Arc::default(),
        }
    }

    pub fn try_take(&self, key: K) -> Option<KeyPlace<K>> {
        let mut held = lock(&self.held);
        let n = held.entry(key).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(KeyPlace {
            key,
            held: self.held.clone(),
        })
    }
}

impl<K: Copy + Eq + std::hash::Hash> Drop for KeyPlace<K> {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_caps_each_key_and_forgets_empty_ones() {
        let p = PerKey::new(2);
        let (a1, a2) = (p.try_take(1u32).unwrap(), p.try_take(1u32).unwrap());
        assert!(p.try_take(1u32).is_none());
        let b = p.try_take(2u32).expect("another key has its own places");
        drop(a1);
        let a3 = p.try_take(1u32).expect("a place given back");
        drop((a2, a3, b));
        assert!(lock(&p.held).is_empty());
    }

    #[test]
    fn a_source_gets_its_share_and_gives_it_back() {
        // A share of 2, enforced at once: a pool of 4 is half taken after 2.
        let h = Places::new(4, 2, Ipv6Prefix::DEFAULT);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        let (p1, p2) = (h.try_acquire(a).unwrap(), h.try_acquire(a).unwrap());
        assert_eq!(h.try_acquire(a).err(), Some(Busy::Source));
        let others: Vec<_> = (0..3).map(|_| h.try_acquire(b)).collect();
        assert_eq!(others[2].as_ref().err(), Some(&Busy::Source));
        assert!(others[1].is_ok());
        drop(p1);
        let _p3 = h.try_acquire(a).expect("a place given back");
        drop((p2, others));
        assert!(lock(&h.sources.per_source).len() == 1);
    }

    #[test]
    fn a_balancer_takes_places_under_the_cap_only() {
        let h = Places::new(4, 1, Ipv6Prefix::DEFAULT);
        let lb: IpAddr = "198.51.100.9".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| h.try_acquire_unshared().unwrap()).collect();
        let other = h.try_acquire(lb).expect("its share is untouched");
        assert_eq!(h.try_acquire_unshared().err(), Some(Busy::Total));
        drop((held, other));
    }

    #[test]
    fn a_quiet_pool_lends_a_source_more_than_its_share() {
        let h = Places::new(8, 1, Ipv6Prefix::DEFAULT);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let held: Vec<_> = (0..4).map(|_| h.try_acquire(a)).collect();
        assert!(
            held.iter().all(Result::is_ok),
            "while half the pool is free"
        );
        assert_eq!(
            h.try_acquire(a).err(),
            Some(Busy::Source),
            "then the share holds"
        );
        assert!(
            h.try_acquire("198.51.100.8".parse().unwrap()).is_ok(),
            "others get in"
        );
    }

    #[test]
    fn one_v6_slash_64_is_one_source() {
        let h = Places::new(2, 1, Ipv6Prefix::DEFAULT);
        let _p = h.try_acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert_eq!(
            h.try_acquire("2001:db8:1:2:ffff::9".parse().unwrap()).err(),
            Some(Busy::Source)
        );
        assert!(h.try_acquire("2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _v4 = h
            .try_acquire("::ffff:198.51.100.7".parse().unwrap())
            .unwrap();
        assert_eq!(
            h.try_acquire("198.51.100.7".parse().unwrap()).err(),
            Some(Busy::Source),
            "a mapped address is its IPv4 source"
        );
    }
}
