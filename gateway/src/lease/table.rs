//! The in-memory lease table: who holds which port, when each lease was last
//! in use, and the order in which free ports are handed out (never-freed
//! ports first, then freed ones, least recently freed first, so a revoked
//! agent asking again gets another port while others are free).

use std::collections::{BTreeMap, HashMap, HashSet};

use libp2p::PeerId;
use relaygate_common::names::{LeasePort, PortRange, TunnelName};

use crate::store::{Lease, LeaseKey};

/// `since` of a lease whose claim has not reached the store yet.
const PENDING: u64 = u64::MAX;

#[derive(Default)]
pub(super) struct Table {
    pub by_key: BTreeMap<LeaseKey, LeasePort>,
    pub by_port: HashMap<LeasePort, LeaseKey>,
    /// When each lease was last in use by a session (milliseconds since
    /// the UNIX epoch), as far as this gateway knows.
    pub active: HashMap<LeaseKey, u64>,
    /// Leases the store holds that this table does not (granted by other
    /// gateways of the fleet), as of the last sweep: listed, never decided on.
    pub others: HashMap<LeaseKey, (LeasePort, Option<u64>)>,
    /// Ports freed, by the order they were freed in.
    freed: HashMap<LeasePort, u64>,
    freed_seq: u64,
    /// Bumped whenever a lease is settled (in the store); `since` holds its
    /// value when each key's lease was, [`PENDING`] while its claim is
    /// under way, so a sweep can tell what the store had when it looked.
    generation: u64,
    since: HashMap<LeaseKey, u64>,
}

impl Table {
    pub fn insert(&mut self, key: LeaseKey, port: LeasePort) -> Option<LeasePort> {
        let old = self.by_key.insert(key.clone(), port);
        if let Some(old) = old {
            self.by_port.remove(&old);
        }
        self.freed.remove(&port);
        self.others.remove(&key);
        self.generation += 1;
        self.since.insert(key.clone(), self.generation);
        self.by_port.insert(port, key);
        old
    }

    /// Moves `key` to `port`; its previous port stays held by it until the
    /// move is settled, so no other agent can take it while the store has
    /// not yet agreed to the move.
    pub fn begin_move(&mut self, key: LeaseKey, port: LeasePort) -> Option<LeasePort> {
        let previous = self.insert(key.clone(), port);
        self.since.insert(key.clone(), PENDING);
        if let Some(p) = previous {
            self.by_port.insert(p, key);
        }
        previous
    }

    /// Ends a move: on success frees the previous port, on failure gives
    /// `key` its previous port back (or no lease, if it had none).
    pub fn settle_move(
        &mut self,
        key: &LeaseKey,
        port: LeasePort,
        previous: Option<LeasePort>,
        ok: bool,
    ) {
        let held_by_key = |t: &Self, p: &LeasePort| t.by_port.get(p) == Some(key);
        if self.by_key.contains_key(key) {
            self.generation += 1;
            self.since.insert(key.clone(), self.generation);
        }
        match (ok, previous) {
            (true, Some(p)) if p != port && held_by_key(self, &p) => {
                self.by_port.remove(&p);
                self.mark_freed(p);
            }
            (true, _) => {}
            (false, prev) => {
                if held_by_key(self, &port) {
                    self.by_port.remove(&port);
                }
                match prev {
                    Some(p) => {
                        self.by_key.insert(key.clone(), p);
                        self.by_port.insert(p, key.clone());
                    }
                    None => {
                        self.by_key.remove(key);
                        self.since.remove(key);
                        self.active.remove(key);
                    }
                }
            }
        }
    }

    /// Drops `key`'s lease (or the store's, as last seen); its port goes to
    /// the back of the pick order.
    pub fn remove(&mut self, key: &LeaseKey) -> Option<LeasePort> {
        self.active.remove(key);
        self.since.remove(key);
        let other = self.others.remove(key).map(|(p, _)| p);
        if let Some(p) = other.filter(|p| !self.by_port.contains_key(p)) {
            self.mark_freed(p);
        }
        let Some(port) = self.by_key.remove(key) else {
            return other;
        };
        if self.by_port.get(&port) == Some(key) {
            self.by_port.remove(&port);
            self.mark_freed(port);
        }
        Some(port)
    }

    /// Puts back a lease whose removal the store refused, unless its key or
    /// port was taken meanwhile.
    pub fn restore(&mut self, key: &LeaseKey, port: LeasePort, active: Option<u64>) {
        if self.by_key.contains_key(key) || self.by_port.contains_key(&port) {
            return;
        }
        self.insert(key.clone(), port);
        if let Some(a) = active {
            self.active.insert(key.clone(), a);
        }
    }

    fn mark_freed(&mut self, port: LeasePort) {
        self.freed_seq += 1;
        self.freed.insert(port, self.freed_seq);
    }

    /// The agent's leases; with `named`, only those under these names (a
    /// hello's full list: the others are about to be released).
    pub fn count_for(&self, agent: &PeerId, named: Option<&HashSet<TunnelName>>) -> usize {
        self.by_key
            .keys()
            .filter(|k| &k.agent == agent && named.is_none_or(|n| n.contains(&k.tunnel)))
            .count()
    }

    /// The agent's leases under names not in `named`.
    pub fn renamed(&self, agent: &PeerId, named: &HashSet<TunnelName>) -> Vec<LeaseKey> {
        self.by_key
            .keys()
            .filter(|k| &k.agent == agent && !named.contains(&k.tunnel))
            .cloned()
            .collect()
    }

    /// The first port of `range` to hand out automatically that `usable`
    /// accepts: never freed ones in order, then freed ones, least recently
    /// freed first.
    pub fn pick_free(
        &self,
        range: &PortRange,
        usable: impl Fn(LeasePort) -> bool,
    ) -> Option<LeasePort> {
        let free = |p: &LeasePort| !self.by_port.contains_key(p);
        if let Some(p) = range
            .iter()
            .find(|p| free(p) && !self.freed.contains_key(p) && usable(*p))
        {
            return Some(p);
        }
        let mut again: Vec<(u64, LeasePort)> = self
            .freed
            .iter()
            .filter(|(p, _)| range.contains(**p) && free(p))
            .map(|(p, seq)| (*seq, *p))
            .collect();
        again.sort_unstable();
        again.into_iter().map(|(_, p)| p).find(|p| usable(*p))
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `key`'s lease reached the store after generation `g`, or has
    /// not yet.
    pub fn newer_than(&self, key: &LeaseKey, g: u64) -> bool {
        self.since.get(key).is_some_and(|s| *s > g)
    }

    pub fn leases(&self) -> Vec<Lease> {
        self.by_key
            .iter()
            .map(|(k, p)| Lease {
                key: k.clone(),
                port: *p,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(agent: PeerId, name: &str) -> LeaseKey {
        LeaseKey {
            agent,
            tunnel: name.parse().unwrap(),
        }
    }

    fn p(n: u16) -> LeasePort {
        LeasePort::new(n).unwrap()
    }

    #[test]
    fn freed_ports_are_picked_last_least_recently_freed_first() {
        let range: PortRange = "100-104".parse().unwrap();
        let any = |_| true;
        let mut t = Table::default();
        let a = PeerId::random();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            let got = t.pick_free(&range, any).unwrap();
            assert_eq!(got, p(100 + i as u16), "in order at first");
            t.insert(key(a, n), got);
        }
        t.remove(&key(a, "b")); // 101 freed
        t.remove(&key(a, "a")); // 100 freed after it
        assert_eq!(t.pick_free(&range, any), Some(p(103)), "never freed first");
        t.insert(key(a, "d"), p(103));
        t.insert(key(a, "e"), p(104));
        assert_eq!(t.pick_free(&range, any), Some(p(101)), "freed longest ago");
        assert_eq!(
            t.pick_free(&range, |x| x != p(101)),
            Some(p(100)),
            "then the next one freed"
        );
        // Taken again by number, then freed again: to the back.
        t.insert(key(a, "f"), p(101));
        t.remove(&key(a, "f"));
        assert_eq!(t.pick_free(&range, any), Some(p(100)));
        t.insert(key(a, "g"), p(100));
        assert_eq!(t.pick_free(&range, any), Some(p(101)));
        t.insert(key(a, "h"), p(101));
        assert_eq!(t.pick_free(&range, any), None, "range full");
    }

    #[test]
    fn a_settled_move_frees_the_old_port_to_the_back() {
        let range: PortRange = "200-202".parse().unwrap();
        let mut t = Table::default();
        let a = PeerId::random();
        t.insert(key(a, "x"), p(200));
        let prev = t.begin_move(key(a, "x"), p(202));
        assert_eq!(prev, Some(p(200)));
        assert_eq!(t.pick_free(&range, |_| true), Some(p(201)), "200 held");
        t.settle_move(&key(a, "x"), p(202), prev, true);
        t.insert(key(a, "y"), p(201));
        assert_eq!(t.pick_free(&range, |_| true), Some(p(200)));
    }

    #[test]
    fn counting_under_a_hellos_names_leaves_out_renamed_tunnels() {
        let mut t = Table::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        t.insert(key(a, "old"), p(300));
        t.insert(key(a, "kept"), p(301));
        t.insert(key(b, "old"), p(302));
        let named: HashSet<TunnelName> = ["kept".parse().unwrap(), "new".parse().unwrap()].into();
        assert_eq!(t.count_for(&a, None), 2);
        assert_eq!(t.count_for(&a, Some(&named)), 1);
        assert_eq!(t.renamed(&a, &named), vec![key(a, "old")]);
        assert!(t.renamed(&b, &["old".parse().unwrap()].into()).is_empty());
    }
}
