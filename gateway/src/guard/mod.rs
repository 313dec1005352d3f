//! Who gets in. The blacklist (peer ids and CIDRs, permanent or until an
//! expiry, each with a reason; from config and changed at runtime through the
//! admin API), token buckets per IP and per peer for new connections,
//! reservations, circuits and tunnel connections, and temporary bans for
//! peers that keep sending bad input, moving to their source address when it
//! keeps producing fresh peer ids. Rates, caps and automatic bans key on the
//! source: an IPv4 address, or an IPv6 prefix (`guard.ipv6_prefix`, /64).
//! Checks are cheap and run before any handshake work where the transport
//! allows (pending inbound libp2p connections, accepted leased-port
//! sockets). Every refusal is counted.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::{Instant, SystemTime},
};

use arc_swap::ArcSwap;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::banlist::{Ban, BanList};
pub use crate::config::guard::{BanRequest, BanTarget, GuardConfig, Ipv6Prefix, Rate};
use crate::metrics::Metrics;
use crate::rates::Rates;

/// Where a ban came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// A ban as the admin API lists it (and a fleet shares it through etcd).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BanView {
    pub target: BanTarget,
    pub reason: String,
    pub source: BanSource,
    /// Unix seconds; absent for a permanent ban.
    pub expires: Option<u64>,
}

/// Where the bans made here go beyond this gateway (a fleet's shared list).
pub trait BanSink: Send + Sync {
    fn push(&self, change: BanChange);
}

/// A change of the ban list made on this gateway, for the fleet.
#[derive(Clone, Debug, PartialEq)]
pub enum BanChange {
    Added(BanView),
    Lifted(BanTarget),
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

/// What `guard.*` sets, swapped whole when the configuration is reloaded.
struct Settings {
    cfg: GuardConfig,
    rates: Rates,
}

pub struct Guard {
    settings: ArcSwap<Settings>,
    bans: RwLock<BanList>,
    violations: Mutex<HashMap<Offender, (u32, Instant)>>,
    /// Where each peer's open connections come from, counted per source.
    peer_sources: Mutex<HashMap<PeerId, Vec<IpAddr>>>,
    /// When peers from each source were banned automatically, recently.
    banned_from: Mutex<HashMap<IpAddr, Vec<Instant>>>,
    /// Where bans made here go to be shared with a fleet (etcd), if anywhere.
    outbox: std::sync::OnceLock<Arc<dyn BanSink>>,
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
        let blacklist = cfg.blacklist.clone();
        let g = Self {
            settings: ArcSwap::from_pointee(Settings {
                rates: Rates::new(&cfg),
                cfg,
            }),
            bans: RwLock::default(),
            violations: Mutex::default(),
            peer_sources: Mutex::default(),
            banned_from: Mutex::default(),
            outbox: std::sync::OnceLock::new(),
            metrics,
            overload,
        };
        for b in blacklist {
            g.ban(b, BanSource::Config);
        }
        Arc::new(g)
    }

    fn cfg(&self) -> arc_swap::Guard<Arc<Settings>> {
        self.settings.load()
    }

    /// Takes a reloaded `guard.*`: new rates (their buckets start full),
    /// thresholds, and the configured bans: those no longer listed are
    /// lifted, new ones added; a target banned through the admin API or
    /// automatically keeps that ban. Returns the targets newly banned, whose
    /// open connections the caller closes. Configured bans stay local, as at
    /// start. `ipv6_prefix` must not change (the reload refuses it).
    pub fn reload(&self, cfg: GuardConfig) -> Vec<BanTarget> {
        let same = |a: &BanRequest, b: &BanRequest| {
            a.target == b.target && a.reason == b.reason && a.ttl == b.ttl
        };
        let old = self.cfg().cfg.blacklist.clone();
        let listed = cfg.blacklist.clone();
        self.settings.store(Arc::new(Settings {
            rates: Rates::new(&cfg),
            cfg,
        }));
        let now = self.list();
        for b in now.iter().filter(|b| b.source == BanSource::Config) {
            if !listed.iter().any(|l| l.target == b.target) {
                self.lift(&b.target);
            }
        }
        let mut added = Vec::new();
        for b in listed {
            let unchanged = old.iter().any(|o| same(o, &b));
            let other = now
                .iter()
                .any(|v| v.target == b.target && v.source != BanSource::Config);
            if unchanged || other {
                continue;
            }
            added.push(b.target.clone());
            self.ban(b, BanSource::Config);
        }
        added
    }

    /// How sources are grouped (IPv6 prefix length).
    pub fn grouping(&self) -> Ipv6Prefix {
        self.cfg().cfg.ipv6_prefix
    }

    /// Refuses a banned or over-rate IP for `action`.
    pub fn check_ip(&self, ip: IpAddr, action: Action) -> Result<(), Refused> {
        if self.is_banned_ip(ip) {
            return self.refuse(Refused::Banned);
        }
        if self.overload.is_on() {
            return self.refuse(Refused::MemoryPressure);
        }
        let settings = self.cfg();
        let source = settings.cfg.ipv6_prefix.source(ip);
        if settings
            .rates
            .per_ip(action)
            .is_some_and(|l| l.check_key(&source).is_err())
        {
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
        if self
            .cfg()
            .rates
            .per_peer(action)
            .is_some_and(|l| l.check_key(peer).is_err())
        {
            return self.refuse(Refused::RateLimited(action));
        }
        Ok(())
    }

    pub fn is_banned_peer(&self, peer: &PeerId) -> bool {
        self.read_bans().has_peer(peer, Instant::now())
    }

    pub fn is_banned_ip(&self, ip: IpAddr) -> bool {
        self.read_bans().covers_ip(ip, Instant::now())
    }

    /// A connection of `peer` from `ip` is up (the gate calls this), so a
    /// ban of the peer can find its source.
    pub fn connected(&self, peer: PeerId, ip: IpAddr) {
        lock(&self.peer_sources)
            .entry(peer)
            .or_default()
            .push(self.cfg().cfg.ipv6_prefix.source(ip));
    }

    /// That connection closed.
    pub fn disconnected(&self, peer: PeerId, ip: IpAddr) {
        let source = self.cfg().cfg.ipv6_prefix.source(ip);
        let mut all = lock(&self.peer_sources);
        if let Some(list) = all.get_mut(&peer) {
            if let Some(i) = list.iter().position(|s| *s == source) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                all.remove(&peer);
            }
        }
    }

    /// Drops expired bans and forgets buckets that are full again, so the
    /// tables stay as small as the set of recently active IPs and peers.
    /// Call periodically.
    pub fn housekeeping(&self) {
        let now = Instant::now();
        {
            let mut bans = self.write_bans();
            bans.retain_in_force(now);
            self.metrics.bans_active.set(bans.len() as i64);
        }
        let window = self.cfg().cfg.ban_duration;
        lock(&self.banned_from).retain(|_, times| {
            times.retain(|t| now.duration_since(*t) < window);
            !times.is_empty()
        });
        self.cfg().rates.housekeeping();
    }

    /// Counts a refusal decided elsewhere (a cap), under the same family.
    pub fn count_refusal(&self, reason: &str) {
        self.metrics.refuse(reason);
    }

    fn refuse(&self, why: Refused) -> Result<(), Refused> {
        self.metrics.refuse(why.as_str());
        Err(why)
    }

    fn read_bans(&self) -> std::sync::RwLockReadGuard<'_, BanList> {
        self.bans.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_bans(&self) -> std::sync::RwLockWriteGuard<'_, BanList> {
        self.bans.write().unwrap_or_else(|e| e.into_inner())
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
        {
            let mut bans = self.write_bans();
            bans.insert(Ban {
                view: view.clone(),
                until,
            });
            self.metrics.bans_active.set(bans.len() as i64);
        }
        self.metrics
            .bans_added
            .get_or_create(&relaygate_common::metrics::ReasonLabels::new(
                source.as_str(),
            ))
            .inc();
        // Configured bans stay local: each gateway has its own configuration.
        if source != BanSource::Config {
            self.share(BanChange::Added(view.clone()));
        }
        // Automatic bans of peer ids come as fast as an attacker makes ids:
        // counted, and logged quietly; the rest are rare and worth a warning.
        if matches!(
            (source, &view.target),
            (BanSource::Automatic, BanTarget::Peer(_))
        ) {
            tracing::debug!(target = %view.target, reason = %view.reason, "banned");
        } else {
            tracing::warn!(target = %view.target, reason = %view.reason, ?source, expires = ?view.expires, "banned");
        }
        view
    }

    /// Lifts the ban on `target`; false if there was none.
    pub fn unban(&self, target: &BanTarget) -> bool {
        let lifted = self.lift(target);
        self.share(BanChange::Lifted(target.clone()));
        lifted
    }

    fn lift(&self, target: &BanTarget) -> bool {
        let mut bans = self.write_bans();
        let lifted = bans.remove(target);
        self.metrics.bans_active.set(bans.len() as i64);
        lifted
    }

    /// From now on, bans made and lifted here are also sent to `outbox` (a
    /// fleet's shared list). Once only.
    pub fn share_with(&self, outbox: Arc<dyn BanSink>) {
        let _ = self.outbox.set(outbox);
    }

    fn share(&self, change: BanChange) {
        if let Some(o) = self.outbox.get() {
            o.push(change);
        }
    }

    /// A ban made on another gateway of the fleet: applied here, not shared
    /// again. An expiry already past is no ban.
    pub fn apply_shared(&self, view: BanView) -> bool {
        let until = match view.expires {
            None => None,
            Some(unix) => {
                let now = relaygate_common::clock::unix_now();
                match unix.checked_sub(now) {
                    Some(left) if left > 0 => {
                        Instant::now().checked_add(std::time::Duration::from_secs(left))
                    }
                    _ => return false,
                }
            }
        };
        let mut bans = self.write_bans();
        let known = bans.get(&view.target) == Some(&view);
        if !known {
            tracing::info!(target = %view.target, reason = %view.reason, "ban shared by the fleet");
        }
        bans.insert(Ban { view, until });
        self.metrics.bans_active.set(bans.len() as i64);
        !known
    }

    /// A ban lifted on another gateway (or expired in the fleet's list).
    pub fn lift_shared(&self, target: &BanTarget) -> bool {
        self.lift(target)
    }

    pub fn list(&self) -> Vec<BanView> {
        self.read_bans().in_force(Instant::now())
    }

    /// Counts a protocol violation by an authenticated peer; returns the
    /// bans it earned (the peer's, and its source's once that source has
    /// produced enough banned peers), whose connections the caller closes.
    pub fn peer_violation(&self, peer: PeerId, kind: &str) -> Vec<BanTarget> {
        let Some(ban) = self.violation(Offender::Peer(peer), kind) else {
            return Vec::new();
        };
        let mut earned = vec![ban.target];
        earned.extend(self.escalate(peer, Instant::now()));
        earned
    }

    /// Records a protocol violation; returns the ban when this one earned it.
    pub fn violation(&self, who: Offender, kind: &str) -> Option<BanView> {
        if self.cfg().cfg.violations_before_ban == 0 {
            return None;
        }
        let who = match who {
            Offender::Ip(ip) => Offender::Ip(self.cfg().cfg.ipv6_prefix.source(ip)),
            peer => peer,
        };
        let now = Instant::now();
        let count = {
            let mut v = lock(&self.violations);
            // Forget offenders whose window ended, so the table stays small.
            let window = self.cfg().cfg.violation_window;
            v.retain(|_, (_, since)| now.duration_since(*since) < window);
            let e = v.entry(who).or_insert((0, now));
            e.0 += 1;
            let n = e.0;
            if n >= self.cfg().cfg.violations_before_ban {
                v.remove(&who);
            }
            n
        };
        if count < self.cfg().cfg.violations_before_ban {
            return None;
        }
        let target = match who {
            Offender::Peer(p) => BanTarget::Peer(p),
            Offender::Ip(ip) => BanTarget::Net(self.cfg().cfg.ipv6_prefix.source_net(ip)),
        };
        Some(self.ban(
            BanRequest {
                target,
                reason: format!("{count} protocol violations (last: {kind})"),
                ttl: Some(self.cfg().cfg.ban_duration),
            },
            BanSource::Automatic,
        ))
    }

    /// A peer id was banned: count it against its sources, and ban a source
    /// that produced `peer_bans_before_source_ban` of them within a ban's
    /// length. Returns the sources banned.
    fn escalate(&self, peer: PeerId, now: Instant) -> Vec<BanTarget> {
        let limit = self.cfg().cfg.peer_bans_before_source_ban;
        if limit == 0 {
            return Vec::new();
        }
        // One entry per connection: a peer banned once counts once per source.
        let mut sources = lock(&self.peer_sources)
            .get(&peer)
            .cloned()
            .unwrap_or_default();
        sources.sort_unstable();
        sources.dedup();
        let mut to_ban = Vec::new();
        {
            let mut banned = lock(&self.banned_from);
            let window = self.cfg().cfg.ban_duration;
            for source in sources {
                let times = banned.entry(source).or_default();
                times.retain(|t| now.duration_since(*t) < window);
                times.push(now);
                if times.len() >= limit as usize {
                    to_ban.push((source, times.len()));
                    banned.remove(&source);
                }
            }
        }
        to_ban
            .into_iter()
            .map(|(source, n)| {
                self.ban(
                    BanRequest {
                        target: BanTarget::Net(self.cfg().cfg.ipv6_prefix.source_net(source)),
                        reason: format!(
                            "{n} peer ids from this source banned for protocol violations"
                        ),
                        ttl: Some(self.cfg().cfg.ban_duration),
                    },
                    BanSource::Automatic,
                )
                .target
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
