//! Agents' lanes: the TLS connections beside their sessions that carry
//! tunnelled connections (see `relaygate_common::lane`). A lane is accepted
//! only from an agent with a live session, and lives no longer than it. An
//! agent keeps a few, one per slot; a new connection takes the one with the
//! fewest streams. A lane from another gateway of the fleet is handed to the
//! forwarder, which serves the connections it carries.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Weak,
    },
};

use libp2p::{identity::Keypair, PeerId};
use relaygate_common::{
    lane::{
        Accepted, Budget, Lane, LaneConfig, LaneCount, LaneLink, LaneSlot, LaneTls, Rewind, Role,
        MAX_LANES,
    },
    metrics::Held,
    proxy_transport::Diverted,
};
use tokio::sync::mpsc;

use crate::{
    guard::{Action, Guard},
    metrics::Metrics,
    registry::AgentRegistry,
    shares::{Busy, Permit, Places},
};

/// Lane handshakes in progress at once; more are refused until one ends.
const MAX_HANDSHAKES: usize = 256;
/// Of those, what one source (an IPv4 address, an IPv6 /64) may hold once
/// half are taken: a handshake that stalls holds its place for the
/// handshake timeout (10 s).
const HANDSHAKES_PER_SOURCE: usize = 16;

pub struct Lanes {
    tls: LaneTls,
    cfg: LaneConfig,
    /// Receive window bytes one agent's lanes may commit (`session.lane_buffer`).
    buffer: u64,
    /// Each agent's budget, shared by its lanes while any is up.
    budgets: std::sync::Mutex<HashMap<PeerId, Weak<Budget>>>,
    /// Most lanes one agent may keep.
    per_agent: LaneCount,
    book: LaneBook,
    registry: Arc<AgentRegistry>,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    handshakes: Places,
    /// Numbers lane connections in the order they arrive.
    arrivals: std::sync::atomic::AtomicU64,
    /// Where lanes from the fleet's other gateways go (set when forwarding is on).
    links: std::sync::OnceLock<(IsMember, mpsc::Sender<FleetLane>)>,
}

/// Whether a peer is another gateway of the fleet (the fleet's view answers).
pub type IsMember = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// A lane another gateway of the fleet dialled, and who it is.
pub type FleetLane = (PeerId, Arc<Lane>);

impl Lanes {
    pub fn new(
        key: &Keypair,
        per_agent: LaneCount,
        (cfg, buffer): (LaneConfig, u64),
        registry: Arc<AgentRegistry>,
        guard: Arc<Guard>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            tls: LaneTls::new(key)?,
            cfg,
            buffer,
            budgets: Default::default(),
            per_agent,
            book: LaneBook::default(),
            registry,
            metrics,
            handshakes: Places::new(MAX_HANDSHAKES, HANDSHAKES_PER_SOURCE, guard.grouping()),
            arrivals: Default::default(),
            links: Default::default(),
            guard,
        })
    }

    /// Lanes from peers `is_member` names are sent to `to` (the forwarder).
    pub fn take_fleet_lanes(&self, is_member: IsMember, to: mpsc::Sender<FleetLane>) {
        let _ = self.links.set((is_member, to));
    }

    /// The agent's lane with the fewest open streams, while one is up.
    pub fn get(&self, agent: &PeerId) -> Option<Arc<Lane>> {
        self.book.get(agent)
    }

    /// How many lanes the agent has up (the console shows it).
    pub fn count(&self, agent: &PeerId) -> usize {
        self.book.live().get(agent).map_or(0, |l| {
            l.iter().filter(|(_, _, lane)| !lane.is_closed()).count()
        })
    }

    /// Takes lane connections from the libp2p TCP listener until it goes away.
    pub async fn serve(self: Arc<Self>, mut diverted: mpsc::Receiver<Diverted>) {
        while let Some(d) = diverted.recv().await {
            // Bans, rates and memory pressure apply before any handshake work.
            if self
                .guard
                .check_ip(d.remote.ip(), Action::Connection)
                .is_err()
            {
                continue;
            }
            let permit = match self.handshakes.try_acquire(d.remote.ip()) {
                Ok(p) => p,
                Err(busy) => {
                    self.metrics.refuse(match busy {
                        Busy::Total => "lane_handshakes_busy",
                        Busy::Source => "lane_handshakes_per_source",
                    });
                    continue;
                }
            };
            let arrival = self.arrivals.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(self.clone().admit(d, arrival, permit));
        }
    }

    /// Runs one lane from its handshake to its end. `handshake` is its place
    /// among the handshakes in progress, given back once the handshake ends.
    async fn admit(self: Arc<Self>, d: Diverted, arrival: Arrival, handshake: Permit) {
        // The lane owns the socket from here on; the probe runs inside it.
        let rtt = relaygate_common::lane::prepare_socket(&d.tcp).ok();
        // No buffer under the lane: it writes its records gathered, in one call.
        let io = Rewind::new(d.prefix, d.tcp);
        let accepted = self.tls.accept(io).await;
        drop(handshake);
        let Accepted {
            io,
            peer,
            slot,
            flow,
            keys,
        } = match accepted {
            Ok(x) => x,
            Err(e) => {
                self.metrics.bad_input(e.kind());
                tracing::debug!(remote = %d.remote, error = %e, "lane handshake failed");
                return;
            }
        };
        // Only an agent with a session gets a lane, and the lane ends with it.
        let Some(session) = self.registry.cancel_token(&peer) else {
            if let Some((_, to)) = self.links.get().filter(|(is_member, _)| is_member(&peer)) {
                let link = LaneLink {
                    budget: self.budget(peer),
                    rtt,
                };
                // The dialling gateway opens a stream per connection it forwards.
                let cfg = LaneConfig {
                    flow,
                    opener: Role::Dialer,
                    ..self.cfg
                };
                let lane = Lane::start(io, keys, cfg, link);
                tracing::debug!(gateway = %peer, remote = %d.remote, "lane from a gateway of the fleet up");
                if to.send((peer, lane.clone())).await.is_err() {
                    lane.close();
                }
                return;
            }
            self.metrics.refuse("lane_without_session");
            tracing::debug!(%peer, remote = %d.remote, "lane from a peer without a session; closed");
            return;
        };
        if !self.per_agent.holds(slot) {
            self.metrics.refuse("lane_slot_over_limit");
            tracing::debug!(%peer, %slot, per_agent = %self.per_agent, "lane over the agent's limit; closed");
            return;
        }
        let link = LaneLink {
            budget: self.budget(peer),
            rtt,
        };
        let lane = Lane::start(io, keys, LaneConfig { flow, ..self.cfg }, link);
        if !self.book.insert(peer, slot, arrival, lane.clone()) {
            self.metrics.refuse("lane_stale");
            tracing::debug!(%peer, %slot, "a lane that arrived before the one in its slot; closed");
            lane.close();
            return;
        }
        let up = Held::new(&self.metrics.lanes_active);
        tracing::debug!(%peer, %slot, remote = %d.remote, "lane up");
        tokio::select! {
            () = lane.closed() => {}
            () = session.cancelled() => lane.close(),
        }
        self.book.remove(&peer, slot, &lane);
        drop(up);
        tracing::debug!(%peer, %slot, "lane down");
    }
}

impl Lanes {
    /// The budget `agent`'s lanes share: the one its live lanes hold, or a
    /// new one.
    pub(crate) fn budget(&self, agent: PeerId) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get(&agent).and_then(Weak::upgrade) {
            return b;
        }
        budgets.retain(|_, b| b.strong_count() > 0);
        let b = Budget::new(self.buffer, Some(self.metrics.lane_window_bytes.clone()));
        budgets.insert(agent, Arc::downgrade(&b));
        b
    }
}

/// One agent's lanes, by slot (at most `MAX_LANES`: a scan is cheap), each
/// with the order in which its connection arrived.
type AgentLanes = Vec<(LaneSlot, Arrival, Arc<Lane>)>;

/// When a lane's connection arrived, in the order of arrival: of two lanes
/// in one slot, the later one is the agent's current dial.
pub type Arrival = u64;

/// The lanes that are up, by agent and slot.
#[derive(Default)]
struct LaneBook {
    live: std::sync::Mutex<HashMap<PeerId, AgentLanes>>,
    /// Whose turn it is among equally busy lanes.
    turn: AtomicUsize,
}

impl LaneBook {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, AgentLanes>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent's lane with the fewest open streams, while one is up; lanes
    /// that tie take turns, so a burst of new connections spreads.
    fn get(&self, agent: &PeerId) -> Option<Arc<Lane>> {
        let live = self.live();
        let lanes = live.get(agent)?;
        let mut load = [(0usize, 0usize); MAX_LANES as usize];
        let mut n = 0;
        for (i, (_, _, lane)) in lanes.iter().enumerate().take(load.len()) {
            if !lane.is_closed() {
                load[n] = (i, lane.streams());
                n += 1;
            }
        }
        let load = &load[..n];
        let least = load.iter().map(|&(_, streams)| streams).min()?;
        let tied = || load.iter().filter(move |&&(_, streams)| streams == least);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % tied().count();
        let (i, _) = tied().nth(turn)?;
        Some(lanes[*i].2.clone())
    }

    /// Files the agent's lane in its slot and closes the lane it replaces
    /// (the agent redialled the slot). A lane whose connection arrived before
    /// the one holding its slot (a handshake that finished late) is not
    /// filed: false, and the caller closes it.
    fn insert(&self, agent: PeerId, slot: LaneSlot, arrival: Arrival, lane: Arc<Lane>) -> bool {
        let old = {
            let mut live = self.live();
            let lanes = live.entry(agent).or_default();
            match lanes.iter_mut().find(|(s, _, _)| *s == slot) {
                Some((_, held_arrival, _)) if *held_arrival > arrival => return false,
                Some((_, held_arrival, held)) => {
                    *held_arrival = arrival;
                    Some(std::mem::replace(held, lane))
                }
                None => {
                    lanes.push((slot, arrival, lane));
                    None
                }
            }
        };
        if let Some(old) = old {
            old.close();
        }
        true
    }

    /// Forgets `lane` if it still holds its slot.
    fn remove(&self, agent: &PeerId, slot: LaneSlot, lane: &Arc<Lane>) {
        let mut live = self.live();
        if let Some(lanes) = live.get_mut(agent) {
            lanes.retain(|(s, _, l)| !(*s == slot && Arc::ptr_eq(l, lane)));
            if lanes.is_empty() {
                live.remove(agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use relaygate_common::lane::{LaneKeys, Role};

    use super::*;

    /// A lane over an in-memory connection, and its other end.
    fn lane() -> (Arc<Lane>, Arc<Lane>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let secret = [7u8; 32];
        let cfg = LaneConfig::default();
        let link = || LaneLink::alone(64 << 20);
        let ours = Lane::start(
            a,
            LaneKeys::from_secret(&secret, Role::Listener),
            cfg,
            link(),
        );
        let theirs = Lane::start(b, LaneKeys::from_secret(&secret, Role::Dialer), cfg, link());
        (ours, theirs)
    }

    fn is(found: Option<Arc<Lane>>, lane: &Arc<Lane>) -> bool {
        found.is_some_and(|f| Arc::ptr_eq(&f, lane))
    }

    #[tokio::test]
    async fn connections_take_the_least_busy_lane_and_a_redialled_slot_replaces_its_lane() {
        let book = LaneBook::default();
        let agent = Keypair::generate_ed25519().public().to_peer_id();
        let slots: Vec<LaneSlot> = LaneCount::new(2).unwrap().slots().collect();
        let (first, _f) = lane();
        let (second, _s) = lane();
        assert!(book.insert(agent, slots[0], 1, first.clone()));
        assert!(book.insert(agent, slots[1], 2, second.clone()));

        let (a, b) = (book.get(&agent), book.get(&agent));
        assert!(
            (is(a.clone(), &first) && is(b.clone(), &second)) || (is(a, &second) && is(b, &first)),
            "equally busy lanes take turns"
        );
        let _one = first.open().await.unwrap();
        assert!(is(book.get(&agent), &second), "the idle lane is taken");
        assert!(
            is(book.get(&agent), &second),
            "and again, while it is less busy"
        );
        let _two = second.open().await.unwrap();
        let _three = second.open().await.unwrap();
        assert!(is(book.get(&agent), &first), "then the less busy one");

        // The agent redials slot 1: the new lane replaces the old, which closes.
        let (third, _t) = lane();
        assert!(book.insert(agent, slots[1], 4, third.clone()));
        assert!(second.is_closed(), "the replaced lane is closed");
        // A handshake that finished late (its connection arrived before the
        // redial) does not take the slot from the current lane.
        let (late, _l) = lane();
        assert!(!book.insert(agent, slots[1], 3, late.clone()));
        assert!(!third.is_closed(), "the current lane stays");
        assert!(is(book.get(&agent), &third));
        // The old lane's end does not remove its successor.
        book.remove(&agent, slots[1], &second);
        assert!(is(book.get(&agent), &third));

        third.close();
        assert!(is(book.get(&agent), &first), "a closed lane is skipped");
        book.remove(&agent, slots[1], &third);
        book.remove(&agent, slots[0], &first);
        assert!(book.get(&agent).is_none());
        assert!(
            book.live().is_empty(),
            "an agent without lanes leaves no entry"
        );
    }
}
