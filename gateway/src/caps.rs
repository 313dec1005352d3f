//! Bandwidth caps: token buckets per agent (all its tunnels together) and
//! per tunnel, each direction, from `bandwidth.*` and the caps the admin
//! API sets per agent. A connection's copy loops ask its [`ConnPacer`]
//! before bytes go on; with no cap anywhere it answers at once, without
//! allocating. Bytes held here stay unread in the socket or the lane, so
//! TCP and the lane's window push back on the sender.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use libp2p::PeerId;
use relaygate_common::{
    meter::{Pacer, Wait},
    names::TunnelName,
};
use serde::Serialize;

use crate::{
    config::bandwidth::{Bandwidth, BandwidthConfig},
    metrics::{Direction, DirectionLabels, Metrics},
};

/// A wait shorter than this is not "held" in the metrics: a bucket with
/// tokens to spare still costs a clock read.
const HELD: Duration = Duration::from_millis(1);

/// Where an agent's cap comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapSource {
    Config,
    Admin,
}

/// An agent's cap as the admin API shows it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CapView {
    pub inbound: u64,
    pub outbound: u64,
    pub burst: u64,
    pub source: CapSource,
}

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    /// Bytes per cell of the bucket (see `new`).
    cell: u64,
    /// The most cells one wait may ask for: the burst.
    piece: NonZeroU32,
}

/// Cells per second above which a cell holds more than one byte. governor
/// replenishes one cell per whole nanosecond count: at 400 MB/s a byte's
/// 2.5 ns would round to 2 ns, a cap 25% too high. With at most 10^7 cells
/// a second a cell's period is 100 ns or more, rounded by under 1%.
const MAX_CELLS_PER_SECOND: u64 = 10_000_000;

impl Bucket {
    fn new(rate: u64, burst: u64) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let cell = rate.div_ceil(MAX_CELLS_PER_SECOND);
        let clamp = |v: u64| NonZeroU32::new(u32::try_from(v).unwrap_or(u32::MAX));
        let per_second = clamp(rate / cell)?;
        let piece = clamp((burst / cell).max(1)).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(piece)),
            cell,
            piece,
        })
    }

    /// Takes `n` bytes if they may pass now, without waiting (a datagram
    /// over the cap is dropped, not queued).
    fn try_take(&self, n: usize) -> bool {
        let cells = u32::try_from((n as u64).div_ceil(self.cell)).unwrap_or(u32::MAX);
        match NonZeroU32::new(cells) {
            None => true,
            Some(c) => matches!(self.limiter.check_n(c.min(self.piece)), Ok(Ok(()))),
        }
    }

    async fn take(&self, n: usize) {
        let cells = (n as u64).div_ceil(self.cell);
        let mut left = u32::try_from(cells).unwrap_or(u32::MAX);
        while let Some(want) = NonZeroU32::new(left) {
            let piece = want.min(self.piece);
            // Never more than the burst, so the bucket can always grant it.
            let _ = self.limiter.until_n_ready(piece).await;
            left -= piece.get();
        }
    }
}

/// Both directions of one cap.
struct Pair {
    inbound: Option<Bucket>,
    outbound: Option<Bucket>,
}

impl Pair {
    fn new(bw: Bandwidth) -> Option<Arc<Self>> {
        if bw.is_uncapped() {
            return None;
        }
        Some(Arc::new(Self {
            inbound: Bucket::new(bw.inbound, bw.burst_for(bw.inbound)),
            outbound: Bucket::new(bw.outbound, bw.burst_for(bw.outbound)),
        }))
    }

    fn get(&self, dir: Direction) -> Option<&Bucket> {
        match dir {
            Direction::inbound => self.inbound.as_ref(),
            Direction::outbound => self.outbound.as_ref(),
        }
    }
}

#[derive(Default)]
struct Buckets {
    agents: HashMap<PeerId, Option<Arc<Pair>>>,
    tunnels: HashMap<(PeerId, TunnelName), Option<Arc<Pair>>>,
}

pub struct Caps {
    cfg: RwLock<BandwidthConfig>,
    /// Set per agent through the admin API; win over the configuration.
    overrides: Mutex<HashMap<PeerId, Bandwidth>>,
    buckets: Mutex<Buckets>,
    /// Bumped by every change: pacers then look their buckets up again.
    generation: AtomicU64,
    /// Whether any cap is set at all; when not, pacers answer at once.
    any: AtomicBool,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every mutation is a single map operation: a panic leaves it consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Caps {
    pub fn new(cfg: BandwidthConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let caps = Arc::new(Self {
            cfg: RwLock::new(BandwidthConfig::default()),
            overrides: Mutex::default(),
            buckets: Mutex::default(),
            generation: AtomicU64::new(0),
            any: AtomicBool::new(false),
            metrics,
        });
        caps.reload(cfg);
        caps
    }

    /// Takes a new `bandwidth.*`; connections open now follow it from their
    /// next bytes (their buckets start afresh, full).
    pub fn reload(&self, cfg: BandwidthConfig) {
        *self.cfg.write().unwrap_or_else(PoisonError::into_inner) = cfg;
        self.changed();
    }

    /// Sets (`Some`) or clears an agent's cap from the admin API.
    pub fn set_agent(&self, peer: PeerId, cap: Option<Bandwidth>) {
        {
            let mut o = lock(&self.overrides);
            match cap {
                Some(c) => o.insert(peer, c),
                None => o.remove(&peer),
            };
        }
        self.changed();
    }

    fn changed(&self) {
        // Under the buckets' lock, so two changes at once cannot leave `any`
        // computed from the state before the later one.
        let mut buckets = lock(&self.buckets);
        let configured = self.read_cfg().any();
        let overridden = lock(&self.overrides).values().any(|c| !c.is_uncapped());
        *buckets = Buckets::default();
        self.any.store(configured || overridden, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn read_cfg(&self) -> std::sync::RwLockReadGuard<'_, BandwidthConfig> {
        self.cfg.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn agent_cap(&self, peer: &PeerId) -> CapView {
        // One lock at a time: never `overrides` and `cfg` together.
        let set = lock(&self.overrides).get(peer).copied();
        let (bw, source) = match set {
            Some(b) => (b, CapSource::Admin),
            None => (self.read_cfg().for_agent(peer), CapSource::Config),
        };
        CapView {
            inbound: bw.inbound,
            outbound: bw.outbound,
            burst: bw.burst,
            source,
        }
    }

    pub fn tunnel_cap(&self, name: &TunnelName) -> Bandwidth {
        self.read_cfg().for_tunnel(name)
    }

    /// Lets go of an agent's buckets (its session ended).
    pub fn forget(&self, peer: &PeerId) {
        let mut b = lock(&self.buckets);
        b.agents.remove(peer);
        b.tunnels.retain(|(p, _), _| p != peer);
    }

    fn lookup(
        &self,
        agent: &PeerId,
        tunnel: &TunnelName,
    ) -> (Option<Arc<Pair>>, Option<Arc<Pair>>) {
        let set = lock(&self.overrides).get(agent).copied();
        let agent_cap = set.unwrap_or_else(|| self.read_cfg().for_agent(agent));
        let tunnel_cap = self.tunnel_cap(tunnel);
        let mut b = lock(&self.buckets);
        let a = b
            .agents
            .entry(*agent)
            .or_insert_with(|| Pair::new(agent_cap))
            .clone();
        let t = b
            .tunnels
            .entry((*agent, tunnel.clone()))
            .or_insert_with(|| Pair::new(tunnel_cap))
            .clone();
        (a, t)
    }

    /// The pacers of one connection of `agent`'s `tunnel`.
    pub fn pacers(self: &Arc<Self>, key: Arc<(PeerId, TunnelName)>) -> ConnPacers {
        let pacer = |dir| ConnPacer {
            caps: self.clone(),
            key: key.clone(),
            dir,
            cached: Mutex::new(Cached {
                generation: u64::MAX,
                agent: None,
                tunnel: None,
            }),
        };
        ConnPacers {
            inbound: pacer(Direction::inbound),
            outbound: pacer(Direction::outbound),
        }
    }
}

/// One connection's pacers, a direction each.
pub struct ConnPacers {
    pub inbound: ConnPacer,
    pub outbound: ConnPacer,
}

struct Cached {
    generation: u64,
    agent: Option<Arc<Pair>>,
    tunnel: Option<Arc<Pair>>,
}

pub struct ConnPacer {
    caps: Arc<Caps>,
    /// Agent and tunnel, shared by both directions.
    key: Arc<(PeerId, TunnelName)>,
    dir: Direction,
    /// The buckets found at `generation`, so a capped connection does not
    /// take the shared lock for every chunk.
    cached: Mutex<Cached>,
}

impl ConnPacer {
    /// The agent's and the tunnel's buckets, unless neither caps this direction.
    #[allow(clippy::type_complexity)]
    fn buckets(&self) -> Option<(Option<Arc<Pair>>, Option<Arc<Pair>>)> {
        if !self.caps.any.load(Ordering::Relaxed) {
            return None;
        }
        let generation = self.caps.generation.load(Ordering::Acquire);
        let (agent, tunnel) = {
            let mut c = lock(&self.cached);
            if c.generation != generation {
                let (a, t) = self.caps.lookup(&self.key.0, &self.key.1);
                *c = Cached {
                    generation,
                    agent: a,
                    tunnel: t,
                };
            }
            (c.agent.clone(), c.tunnel.clone())
        };
        let dir = self.dir;
        let capped = |p: &Option<Arc<Pair>>| p.as_ref().is_some_and(|p| p.get(dir).is_some());
        (capped(&agent) || capped(&tunnel)).then_some((agent, tunnel))
    }

    /// Whether a datagram of `n` bytes fits the caps now (taking it from
    /// them); one that does not is dropped and counted as throttled.
    pub fn police(&self, n: usize) -> bool {
        let Some((agent, tunnel)) = self.buckets() else {
            return true;
        };
        let dir = self.dir;
        let ok = [&tunnel, &agent]
            .into_iter()
            .flatten()
            .filter_map(|p| p.get(dir))
            .all(|b| b.try_take(n));
        if !ok {
            let labels = DirectionLabels { direction: dir };
            let m = &self.caps.metrics.bandwidth;
            m.throttled_bytes.get_or_create(&labels).inc_by(n as u64);
        }
        ok
    }
}

impl Pacer for ConnPacer {
    fn pass(&self, n: usize) -> Option<Wait<'_>> {
        let (agent, tunnel) = self.buckets()?;
        let dir = self.dir;
        Some(Box::pin(async move {
            let start = Instant::now();
            for pair in [&tunnel, &agent].into_iter().flatten() {
                if let Some(b) = pair.get(dir) {
                    b.take(n).await;
                }
            }
            let held = start.elapsed();
            if held >= HELD {
                let labels = DirectionLabels { direction: dir };
                let m = &self.caps.metrics.bandwidth;
                m.throttled_bytes.get_or_create(&labels).inc_by(n as u64);
                m.held_seconds
                    .get_or_create(&labels)
                    .inc_by(held.as_secs_f64());
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(inbound: u64, outbound: u64) -> Bandwidth {
        Bandwidth {
            inbound,
            outbound,
            burst: 64 * 1024,
        }
    }

    #[tokio::test]
    async fn a_high_cap_is_kept_to_within_a_percent() {
        // 400 MB/s: one byte's 2.5 ns would round to 2 ns in whole bytes.
        let b = Bucket::new(400_000_000, 4_000_000).unwrap();
        b.take(4_000_000).await; // the burst
        let start = Instant::now();
        for _ in 0..100 {
            b.take(1_600_000).await;
        }
        // 160 MB at 400 MB/s: 0.4 s.
        let took = start.elapsed().as_secs_f64();
        assert!((0.396..0.44).contains(&took), "{took} s");
    }

    #[tokio::test]
    async fn a_capped_direction_is_paced_and_the_rest_passes_at_once() {
        let cfg = BandwidthConfig {
            tunnels: vec![crate::config::bandwidth::TunnelBandwidth {
                name: "slow".parse().unwrap(),
                inbound: 1024 * 1024,
                outbound: 0,
                burst: 64 * 1024,
            }],
            ..Default::default()
        };
        let caps = Caps::new(cfg, Arc::new(Metrics::new()));
        let agent = PeerId::random();
        let slow = caps.pacers(Arc::new((agent, "slow".parse().unwrap())));
        let fast = caps.pacers(Arc::new((agent, "fast".parse().unwrap())));
        assert!(fast.inbound.pass(1 << 20).is_none(), "uncapped tunnel");
        assert!(slow.outbound.pass(1 << 20).is_none(), "uncapped direction");
        // 64 KiB burst, then 1 MiB/s: 512 KiB more takes about half a second.
        let start = Instant::now();
        for _ in 0..9 {
            if let Some(f) = slow.inbound.pass(64 * 1024) {
                f.await;
            }
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(900),
            "{took:?}"
        );
        // An admin cap on the agent applies to its uncapped tunnel at once.
        caps.set_agent(agent, Some(bw(0, 512 * 1024)));
        assert!(fast.outbound.pass(1024).is_some());
        caps.set_agent(agent, None);
        assert!(fast.outbound.pass(1024).is_none());
    }
}
