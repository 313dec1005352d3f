//! Who gets in. The blacklist (peer ids and CIDRs, permanent or until an
//! expiry, each with a reason; from config and changed at runtime through the
//! admin API), token buckets per IP and per peer for new connections,
//! reservations, circuits and tunnel connections, and temporary bans for
//! peers that keep sending bad input. Checks are cheap and run before any
//! handshake work where the transport allows (pending inbound libp2p
//! connections, accepted leased-port sockets). Every refusal is counted.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::{
    host::{Command, HostHandle},
    metrics::Metrics,
};

/// What a ban applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BanTarget {
    Peer(PeerId),
    Net(IpNet),
}

impl BanTarget {
    fn covers_ip(&self, ip: IpAddr) -> bool {
        matches!(self, BanTarget::Net(n) if n.contains(&ip))
    }
}

impl FromStr for BanTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(p) = s.parse::<PeerId>() {
            return Ok(BanTarget::Peer(p));
        }
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(BanTarget::Net(n.trunc()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(BanTarget::Net(IpNet::from(ip)));
        }
        Err(format!(
            "expected a peer id, an IP or a CIDR (198.51.100.0/24), got {s:?}"
        ))
    }
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::Peer(p) => write!(f, "{p}"),
            BanTarget::Net(n) => write!(f, "{n}"),
        }
    }
}

relaygate_common::serde_via_str!(BanTarget);

/// A blacklist entry as written in config or posted to the admin API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanRequest {
    pub target: BanTarget,
    #[serde(default)]
    pub reason: String,
    /// How long the ban lasts; permanent when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

/// Where a ban came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BanSource {
    Config,
    Admin,
    /// Repeated protocol violations.
    Automatic,
}

impl BanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BanSource::Config => "config",
            BanSource::Admin => "admin",
            BanSource::Automatic => "automatic",
        }
    }
}

/// A ban as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct BanView {
    pub target: BanTarget,
    pub reason: String,
    pub source: BanSource,
    /// Unix seconds; absent for a permanent ban.
    pub expires: Option<u64>,
}

struct Ban {
    view: BanView,
    until: Option<Instant>,
}

impl Ban {
    fn in_force(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
    fn quota(self) -> Option<Quota> {
        let per = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second))?;
        Some(Quota::per_second(per).allow_burst(burst))
    }
}

/// `[guard]`: blacklist, rates, automatic bans.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Permanent or expiring bans loaded at start.
    pub blacklist: Vec<BanRequest>,
    /// New libp2p connections per source IP.
    pub connections_per_ip: Rate,
    /// New connections on leased ports per source IP.
    pub tunnel_connections_per_ip: Rate,
    /// Relay reservations (and renewals) per peer.
    pub reservations_per_peer: Rate,
    /// Relay circuits per source peer.
    pub circuits_per_peer: Rate,
    /// Relay circuits per source IP.
    pub circuits_per_ip: Rate,
    /// Protocol violations (malformed input) that earn a temporary ban...
    pub violations_before_ban: u32,
    /// ...when they happen within this window.
    #[serde(with = "humantime_serde")]
    pub violation_window: Duration,
    /// Length of an automatic ban.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            blacklist: Vec::new(),
            connections_per_ip: Rate::new(20, 100),
            tunnel_connections_per_ip: Rate::new(200, 1000),
            reservations_per_peer: Rate::new(1, 10),
            circuits_per_peer: Rate::new(10, 50),
            circuits_per_ip: Rate::new(20, 100),
            violations_before_ban: 20,
            violation_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(600),
        }
    }
}

/// What is being asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Connection,
    TunnelConnection,
    Reservation,
    Circuit,
}

/// Why a request was refused; `as_str` is the `refusals_total` reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Banned,
    RateLimited(Action),
    /// The gateway is over `limits.max_memory`.
    MemoryPressure,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Banned => "banned",
            Refused::MemoryPressure => "memory_pressure",
            Refused::RateLimited(Action::Connection) => "rate_limited_connection",
            Refused::RateLimited(Action::TunnelConnection) => "rate_limited_tunnel_connection",
            Refused::RateLimited(Action::Reservation) => "rate_limited_reservation",
            Refused::RateLimited(Action::Circuit) => "rate_limited_circuit",
        }
    }
}

/// Who misbehaved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offender {
    Peer(PeerId),
    Ip(IpAddr),
}

type IpLimiter = DefaultKeyedRateLimiter<IpAddr>;
type PeerLimiter = DefaultKeyedRateLimiter<PeerId>;

pub struct Guard {
    cfg: GuardConfig,
    bans: Mutex<Vec<Ban>>,
    connections_per_ip: Option<IpLimiter>,
    tunnel_connections_per_ip: Option<IpLimiter>,
    reservations_per_peer: Option<PeerLimiter>,
    circuits_per_peer: Option<PeerLimiter>,
    circuits_per_ip: Option<IpLimiter>,
    violations: Mutex<HashMap<Offender, (u32, Instant)>>,
    metrics: Arc<Metrics>,
    overload: Arc<crate::overload::Overload>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guard {
    pub fn new(
        cfg: GuardConfig,
        metrics: Arc<Metrics>,
        overload: Arc<crate::overload::Overload>,
    ) -> Arc<Self> {
        fn keyed<K: Clone + Eq + std::hash::Hash>(r: Rate) -> Option<DefaultKeyedRateLimiter<K>> {
            r.quota().map(RateLimiter::keyed)
        }
        let g = Self {
            connections_per_ip: keyed(cfg.connections_per_ip),
            tunnel_connections_per_ip: keyed(cfg.tunnel_connections_per_ip),
            reservations_per_peer: keyed(cfg.reservations_per_peer),
            circuits_per_peer: keyed(cfg.circuits_per_peer),
            circuits_per_ip: keyed(cfg.circuits_per_ip),
            bans: Mutex::new(Vec::new()),
            violations: Mutex::new(HashMap::new()),
            metrics,
            overload,
            cfg,
        };
        for b in g.cfg.blacklist.clone() {
            g.ban(b, BanSource::Config);
        }
        Arc::new(g)
    }

    /// Refuses a banned or over-rate IP for `action`.
    pub fn check_ip(&self, ip: IpAddr, action: Action) -> Result<(), Refused> {
        if self.banned(|t| t.covers_ip(ip)) {
            return self.refuse(Refused::Banned);
        }
        if self.overload.is_on() {
            return self.refuse(Refused::MemoryPressure);
        }
        let limiter = match action {
            Action::Connection => &self.connections_per_ip,
            Action::TunnelConnection => &self.tunnel_connections_per_ip,
            Action::Circuit => &self.circuits_per_ip,
            Action::Reservation => &None,
        };
        if limiter.as_ref().is_some_and(|l| l.check_key(&ip).is_err()) {
            return self.refuse(Refused::RateLimited(action));
        }
        Ok(())
    }

    /// Refuses a banned or over-rate peer for `action`.
    pub fn check_peer(&self, peer: &PeerId, action: Action) -> Result<(), Refused> {
        if self.is_banned_peer(peer) {
            return self.refuse(Refused::Banned);
        }
        if self.overload.is_on() {
            return self.refuse(Refused::MemoryPressure);
        }
        let limiter = match action {
            Action::Reservation => &self.reservations_per_peer,
            Action::Circuit => &self.circuits_per_peer,
            Action::Connection | Action::TunnelConnection => &None,
        };
        if limiter.as_ref().is_some_and(|l| l.check_key(peer).is_err()) {
            return self.refuse(Refused::RateLimited(action));
        }
        Ok(())
    }

    pub fn is_banned_peer(&self, peer: &PeerId) -> bool {
        self.banned(|t| *t == BanTarget::Peer(*peer))
    }

    /// Drops expired bans and forgets buckets that are full again, so the
    /// tables stay as small as the set of recently active IPs and peers.
    /// Call periodically.
    pub fn housekeeping(&self) {
        let now = Instant::now();
        let mut bans = lock(&self.bans);
        bans.retain(|b| b.in_force(now));
        self.metrics.bans_active.set(bans.len() as i64);
        drop(bans);
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

    /// Counts a refusal decided elsewhere (a cap), under the same family.
    pub fn count_refusal(&self, reason: &str) {
        self.metrics.refuse(reason);
    }

    fn refuse(&self, why: Refused) -> Result<(), Refused> {
        self.metrics.refuse(why.as_str());
        Err(why)
    }

    /// Checked on every new connection: a read-only scan; expired bans are
    /// skipped here and removed by [`Self::housekeeping`].
    fn banned(&self, matches: impl Fn(&BanTarget) -> bool) -> bool {
        let now = Instant::now();
        lock(&self.bans)
            .iter()
            .any(|b| b.in_force(now) && matches(&b.view.target))
    }

    /// Adds (or replaces) a ban.
    pub fn ban(&self, req: BanRequest, source: BanSource) -> BanView {
        // A ttl too long for the clock (`"ttl":"18446744073709551615s"`) is a
        // permanent ban, not an overflow that panics the handler.
        let until = req.ttl.and_then(|t| Instant::now().checked_add(t));
        let expires = req.ttl.filter(|_| until.is_some()).and_then(|t| {
            SystemTime::now()
                .checked_add(t)?
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        });
        let view = BanView {
            target: req.target,
            reason: req.reason,
            source,
            expires,
        };
        let mut bans = lock(&self.bans);
        bans.retain(|b| b.view.target != view.target);
        bans.push(Ban {
            view: view.clone(),
            until,
        });
        self.metrics.bans_active.set(bans.len() as i64);
        self.metrics
            .bans_added
            .get_or_create(&relaygate_common::metrics::ReasonLabels::new(
                source.as_str(),
            ))
            .inc();
        tracing::warn!(target = %view.target, reason = %view.reason, ?source, expires = ?view.expires, "banned");
        view
    }

    /// Lifts the ban on `target`; false if there was none.
    pub fn unban(&self, target: &BanTarget) -> bool {
        let mut bans = lock(&self.bans);
        let before = bans.len();
        bans.retain(|b| b.view.target != *target);
        self.metrics.bans_active.set(bans.len() as i64);
        bans.len() != before
    }

    pub fn list(&self) -> Vec<BanView> {
        let now = Instant::now();
        lock(&self.bans)
            .iter()
            .filter(|b| b.in_force(now))
            .map(|b| b.view.clone())
            .collect()
    }

    /// Counts a protocol violation by an authenticated peer; enough of them
    /// ban it and close its connections.
    pub async fn peer_violation(&self, host: &HostHandle, peer: PeerId, kind: &str) {
        if self.violation(Offender::Peer(peer), kind).is_some() {
            host.send(Command::Disconnect(peer)).await;
        }
    }

    /// Records a protocol violation; returns the ban when this one earned it.
    pub fn violation(&self, who: Offender, kind: &str) -> Option<BanView> {
        if self.cfg.violations_before_ban == 0 {
            return None;
        }
        let now = Instant::now();
        let count = {
            let mut v = lock(&self.violations);
            // Forget offenders whose window ended, so the table stays small.
            let window = self.cfg.violation_window;
            v.retain(|_, (_, since)| now.duration_since(*since) < window);
            let e = v.entry(who).or_insert((0, now));
            e.0 += 1;
            let n = e.0;
            if n >= self.cfg.violations_before_ban {
                v.remove(&who);
            }
            n
        };
        if count < self.cfg.violations_before_ban {
            return None;
        }
        let target = match who {
            Offender::Peer(p) => BanTarget::Peer(p),
            Offender::Ip(ip) => BanTarget::Net(IpNet::from(ip)),
        };
        Some(self.ban(
            BanRequest {
                target,
                reason: format!("{count} protocol violations (last: {kind})"),
                ttl: Some(self.cfg.ban_duration),
            },
            BanSource::Automatic,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(cfg: GuardConfig) -> Arc<Guard> {
        Guard::new(
            cfg,
            Arc::new(Metrics::new()),
            Arc::new(crate::overload::Overload::new(0)),
        )
    }

    #[test]
    fn bans_by_cidr_and_peer_expire_and_lift() {
        let peer = PeerId::random();
        let g = guard(GuardConfig {
            blacklist: vec![BanRequest {
                target: "198.51.100.0/24".parse().unwrap(),
                reason: "scanner".into(),
                ttl: None,
            }],
            ..Default::default()
        });
        let inside: IpAddr = "198.51.100.7".parse().unwrap();
        let outside: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(g.check_ip(inside, Action::Connection), Err(Refused::Banned));
        assert_eq!(g.check_ip(outside, Action::Connection), Ok(()));
        g.ban(
            BanRequest {
                target: BanTarget::Peer(peer),
                reason: "test".into(),
                ttl: Some(Duration::from_millis(50)),
            },
            BanSource::Admin,
        );
        assert_eq!(g.check_peer(&peer, Action::Circuit), Err(Refused::Banned));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(g.check_peer(&peer, Action::Circuit), Ok(()), "expired");
        assert!(g.unban(&"198.51.100.0/24".parse().unwrap()));
        assert_eq!(g.check_ip(inside, Action::Connection), Ok(()));
        assert!(g.list().is_empty());
    }

    #[test]
    fn rates_and_automatic_bans() {
        let g = guard(GuardConfig {
            circuits_per_ip: Rate::new(1, 2),
            violations_before_ban: 3,
            ..Default::default()
        });
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(g.check_ip(ip, Action::Circuit).is_ok());
        assert!(g.check_ip(ip, Action::Circuit).is_ok());
        assert_eq!(
            g.check_ip(ip, Action::Circuit),
            Err(Refused::RateLimited(Action::Circuit))
        );
        let peer = PeerId::random();
        assert!(g.violation(Offender::Peer(peer), "x").is_none());
        assert!(g.violation(Offender::Peer(peer), "x").is_none());
        let ban = g.violation(Offender::Peer(peer), "x");
        assert!(ban.is_some_and(|b| b.source == BanSource::Automatic && b.expires.is_some()));
        assert!(g.is_banned_peer(&peer));
        assert!("not a target".parse::<BanTarget>().is_err());
        assert_eq!(
            "203.0.113.9".parse::<BanTarget>().map(|t| t.to_string()),
            Ok("203.0.113.9/32".to_string())
        );
    }
}
