//! The guard's token buckets: new connections and circuits per source (an
//! IPv4 address or an IPv6 prefix), reservations and circuits per peer. Built
//! from `guard.*` and replaced whole when the configuration is reloaded.

use std::net::IpAddr;

use governor::{DefaultKeyedRateLimiter, RateLimiter};
use libp2p::PeerId;

use crate::config::guard::{GuardConfig, Rate};
use crate::guard::Action;

type IpLimiter = DefaultKeyedRateLimiter<IpAddr>;
type PeerLimiter = DefaultKeyedRateLimiter<PeerId>;

pub struct Rates {
    connections_per_ip: Option<IpLimiter>,
    tunnel_connections_per_ip: Option<IpLimiter>,
    reservations_per_peer: Option<PeerLimiter>,
    circuits_per_peer: Option<PeerLimiter>,
    circuits_per_ip: Option<IpLimiter>,
}

fn keyed<K: Clone + Eq + std::hash::Hash>(r: Rate) -> Option<DefaultKeyedRateLimiter<K>> {
    r.quota().map(RateLimiter::keyed)
}

impl Rates {
    pub fn new(cfg: &GuardConfig) -> Self {
        Self {
            connections_per_ip: keyed(cfg.connections_per_ip),
            tunnel_connections_per_ip: keyed(cfg.tunnel_connections_per_ip),
            reservations_per_peer: keyed(cfg.reservations_per_peer),
            circuits_per_peer: keyed(cfg.circuits_per_peer),
            circuits_per_ip: keyed(cfg.circuits_per_ip),
        }
    }

    /// The per-source bucket of `action`, if it has one.
    pub fn per_ip(&self, action: Action) -> Option<&IpLimiter> {
        match action {
            Action::Connection => self.connections_per_ip.as_ref(),
            Action::TunnelConnection => self.tunnel_connections_per_ip.as_ref(),
            Action::Circuit => self.circuits_per_ip.as_ref(),
            Action::Reservation => None,
        }
    }

    /// The per-peer bucket of `action`, if it has one.
    pub fn per_peer(&self, action: Action) -> Option<&PeerLimiter> {
        match action {
            Action::Reservation => self.reservations_per_peer.as_ref(),
            Action::Circuit => self.circuits_per_peer.as_ref(),
            Action::Connection | Action::TunnelConnection => None,
        }
    }

    /// Forgets buckets that are full again, so the tables stay as small as
    /// the set of recently active sources and peers.
    pub fn housekeeping(&self) {
        for l in [
            &self.connections_per_ip,
            &self.tunnel_connections_per_ip,
            &self.circuits_per_ip,
        ]
        .into_iter()
        .flatten()
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&self.reservations_per_peer, &self.circuits_per_peer]
            .into_iter()
            .flatten()
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}
