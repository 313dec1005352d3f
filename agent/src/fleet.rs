//! Sessions with several gateways of a fleet. The agent starts with the
//! gateway it is configured with; every gateway's welcome, and its later
//! `Fleet` messages, name the fleet's gateways. The agent keeps a session
//! (and its lanes and relay reservation) with `gateway.max_sessions` of
//! them: the configured one, and the others ranked by a hash of the agent's
//! and the gateway's peer ids, so agents spread evenly over a larger fleet
//! and each keeps the same gateways while the fleet is unchanged. It joins
//! gateways that appear and drops those that leave.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::Arc,
};

use libp2p::{Multiaddr, PeerId};
use relaygate_common::names::Secret;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::AgentConfig,
    gateways::Gateways,
    host::HostHandle,
    lane::LaneDialer,
    metrics::Metrics,
    session::{FleetNews, Session},
    state::AgentState,
};

pub struct FleetSessions {
    /// With only the tunnels that may start.
    pub cfg: AgentConfig,
    pub seed: PeerId,
    pub host: HostHandle,
    pub token: Option<Secret>,
    pub state: Arc<AgentState>,
    pub metrics: Arc<Metrics>,
    pub gateways: Arc<Gateways>,
    /// The seed's lanes (`session.data_path = "lane"`); the others' share
    /// their settings and buffer budget.
    pub lanes: Option<Arc<LaneDialer>>,
    /// UDP tunnels' channels, one per gateway session; none without UDP tunnels.
    pub udp: Option<Arc<crate::udp::UdpAgent>>,
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FleetSessions {
    /// Keeps the sessions until `stop` is cancelled, then ends them all.
    pub async fn run(self, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut running: HashMap<PeerId, Running> = HashMap::new();
        self.start(
            self.seed,
            self.cfg.gateway.addresses.clone(),
            &tx,
            &mut running,
        );
        loop {
            tokio::select! {
                Some(news) = rx.recv() => {
                    let known = self.parse(news);
                    self.reconcile(&known, &tx, &mut running).await;
                }
                _ = stop.cancelled() => break,
            }
        }
        for r in running.values() {
            r.stop.cancel();
        }
        for (_, r) in running {
            let _ = r.task.await;
        }
    }

    /// The gateways a message names, skipping (and counting) what does not parse.
    fn parse(&self, news: FleetNews) -> BTreeMap<PeerId, Vec<Multiaddr>> {
        let mut out = BTreeMap::new();
        for g in news.gateways {
            let Ok(peer) = g.peer_id.parse::<PeerId>() else {
                self.metrics.bad_input("fleet_gateway");
                continue;
            };
            let addrs: Vec<Multiaddr> = g
                .addresses
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                // Another gateway's id on the address: skipped.
                .filter_map(|a| a.with_p2p(peer).ok())
                .collect();
            if addrs.is_empty() {
                self.metrics.bad_input("fleet_gateway");
                continue;
            }
            out.insert(peer, addrs);
        }
        tracing::debug!(from = %news.from, gateways = out.len(), "the fleet as a gateway names it");
        out
    }

    /// The gateways to hold: the configured one, then the best ranked others.
    fn choose(&self, known: &BTreeMap<PeerId, Vec<Multiaddr>>) -> Vec<PeerId> {
        let max = self.cfg.gateway.max_sessions.max(1);
        let me = self.host.peer_id;
        let mut others: Vec<PeerId> = known.keys().copied().filter(|p| *p != self.seed).collect();
        others.sort_by_key(|gw| {
            let mut h = std::hash::DefaultHasher::new();
            me.hash(&mut h);
            gw.hash(&mut h);
            h.finish()
        });
        std::iter::once(self.seed).chain(others).take(max).collect()
    }

    async fn reconcile(
        &self,
        known: &BTreeMap<PeerId, Vec<Multiaddr>>,
        tx: &mpsc::UnboundedSender<FleetNews>,
        running: &mut HashMap<PeerId, Running>,
    ) {
        for peer in known.keys() {
            self.gateways.trust(*peer);
        }
        self.state.set_fleet(known);
        let wanted = self.choose(known);
        let leaving: Vec<PeerId> = running
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p))
            .collect();
        for peer in leaving {
            if let Some(r) = running.remove(&peer) {
                tracing::info!(gateway = %peer, "leaving a gateway (it left the fleet, or others rank first)");
                r.stop.cancel();
                let _ = r.task.await;
                self.state.session_down(&peer);
                crate::session::publish(&self.state, &self.cfg.tunnels, &self.metrics);
                self.host.disconnect(peer).await;
            }
        }
        for peer in self.gateways.all() {
            if peer != self.seed && !known.contains_key(&peer) {
                self.gateways.forget(&peer);
            }
        }
        for peer in wanted {
            if running.contains_key(&peer) {
                continue;
            }
            if let Some(addrs) = known.get(&peer) {
                tracing::info!(gateway = %peer, "joining a gateway of the fleet");
                self.start(peer, addrs.clone(), tx, running);
            }
        }
    }

    fn start(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        tx: &mpsc::UnboundedSender<FleetNews>,
        running: &mut HashMap<PeerId, Running>,
    ) {
        self.gateways.trust(peer);
        let mut session = Session::new(
            &self.cfg,
            peer,
            addrs,
            self.host.clone(),
            self.token.clone(),
            self.state.clone(),
            self.metrics.clone(),
        );
        session.lane = self.lanes.as_ref().map(|l| {
            let lanes = if peer == self.seed {
                l.clone()
            } else {
                l.for_gateway(peer)
            };
            self.gateways.set_lanes(peer, lanes.clone());
            lanes
        });
        session.udp = self.udp.clone();
        session.news = Some(tx.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(session.run(stop.clone()));
        running.insert(peer, Running { stop, task });
    }
}
