//! The ban list: peer ids in a hash map, networks in a prefix trie, so the
//! check on every new connection costs a hash lookup or a walk down at most
//! 128 levels, however many bans there are. Expired bans stay until
//! [`BanList::retain_in_force`] and are skipped by every check.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use ipnet::IpNet;
use libp2p::PeerId;
use prefix_trie::joint::map::JointPrefixMap;

use crate::guard::{BanTarget, BanView};

pub struct Ban {
    pub view: BanView,
    /// None: permanent.
    pub until: Option<Instant>,
}

impl Ban {
    fn in_force(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

#[derive(Default)]
pub struct BanList {
    peers: HashMap<PeerId, Ban>,
    nets: JointPrefixMap<IpNet, Ban>,
}

impl BanList {
    /// Adds a ban, replacing one on the same target.
    pub fn insert(&mut self, ban: Ban) {
        match ban.view.target {
            BanTarget::Peer(p) => {
                self.peers.insert(p, ban);
            }
            BanTarget::Net(n) => {
                self.nets.insert(n, ban);
            }
        }
    }

    /// Lifts the ban on exactly `target`; false if there was none.
    pub fn remove(&mut self, target: &BanTarget) -> bool {
        match target {
            BanTarget::Peer(p) => self.peers.remove(p).is_some(),
            BanTarget::Net(n) => self.nets.remove(n).is_some(),
        }
    }

    /// The ban on exactly `target`, in force or not.
    pub fn get(&self, target: &BanTarget) -> Option<&BanView> {
        match target {
            BanTarget::Peer(p) => self.peers.get(p),
            BanTarget::Net(n) => self.nets.get(n),
        }
        .map(|b| &b.view)
    }

    pub fn covers_ip(&self, ip: IpAddr, now: Instant) -> bool {
        self.nets
            .cover(&IpNet::from(ip))
            .any(|(_, b)| b.in_force(now))
    }

    pub fn has_peer(&self, peer: &PeerId, now: Instant) -> bool {
        self.peers.get(peer).is_some_and(|b| b.in_force(now))
    }

    pub fn retain_in_force(&mut self, now: Instant) {
        self.peers.retain(|_, b| b.in_force(now));
        self.nets.retain(|_, b| b.in_force(now));
    }

    pub fn len(&self) -> usize {
        self.peers.len() + self.nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn in_force(&self, now: Instant) -> Vec<BanView> {
        self.peers
            .values()
            .chain(self.nets.values())
            .filter(|b| b.in_force(now))
            .map(|b| b.view.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::guard::BanSource;

    fn ban(target: &str, until: Option<Instant>) -> Ban {
        Ban {
            view: BanView {
                target: target.parse().unwrap(),
                reason: String::new(),
                source: BanSource::Admin,
                expires: None,
            },
            until,
        }
    }

    #[test]
    fn nets_cover_their_addresses_and_expired_bans_do_not() {
        let now = Instant::now();
        let mut l = BanList::default();
        l.insert(ban("198.51.100.0/24", None));
        l.insert(ban("2001:db8:1:2::/64", None));
        // A longer, expired ban inside a shorter one in force: still covered.
        l.insert(ban("198.51.100.0/28", Some(now)));
        l.insert(ban("203.0.113.0/24", Some(now)));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.covers_ip(ip("198.51.100.7"), now));
        assert!(l.covers_ip(ip("2001:db8:1:2:ffff::1"), now));
        assert!(!l.covers_ip(ip("2001:db8:1:3::1"), now));
        assert!(!l.covers_ip(ip("203.0.113.9"), now), "expired");
        assert!(!l.covers_ip(ip("192.0.2.1"), now));
        l.retain_in_force(now);
        assert_eq!(l.len(), 2);
        assert!(l.remove(&"198.51.100.0/24".parse().unwrap()));
        assert!(!l.covers_ip(ip("198.51.100.7"), now));
    }

    #[test]
    fn a_hundred_thousand_bans_each_find_their_address() {
        let now = Instant::now();
        let mut l = BanList::default();
        for i in 0..100_000u32 {
            let net = IpNet::new(IpAddr::from((0x0a00_0000u32 + (i << 8)).to_be_bytes()), 24);
            l.insert(Ban {
                view: BanView {
                    target: BanTarget::Net(net.unwrap()),
                    reason: String::new(),
                    source: BanSource::Automatic,
                    expires: None,
                },
                until: Some(now + Duration::from_secs(60)),
            });
        }
        let mut hits = 0;
        for i in 0..100_000u32 {
            let ip = IpAddr::from((0x0a00_0001u32 + (i << 8)).to_be_bytes());
            hits += usize::from(l.covers_ip(ip, now));
        }
        assert_eq!(hits, 100_000);
        assert!(!l.covers_ip("192.0.2.1".parse().unwrap(), now));
    }
}
