//! Agents' lanes: the TLS connections beside their sessions that carry
//! tunnelled connections (see `relaygate_common::lane`). A lane is accepted
//! only from an agent with a live session, and lives no longer than it.

use std::{collections::HashMap, sync::Arc};

use libp2p::{identity::Keypair, PeerId};
use relaygate_common::{
    lane::{Lane, LaneConfig, LaneTls, Rewind},
    proxy_transport::Diverted,
};
use tokio::sync::{mpsc, Semaphore};

use crate::{
    guard::{Action, Guard},
    metrics::Metrics,
    registry::AgentRegistry,
};

/// Lane handshakes in progress at once; more are refused until one ends.
const MAX_HANDSHAKES: usize = 64;

pub struct Lanes {
    tls: LaneTls,
    cfg: LaneConfig,
    live: std::sync::Mutex<HashMap<PeerId, Arc<Lane>>>,
    registry: Arc<AgentRegistry>,
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    handshakes: Arc<Semaphore>,
}

impl Lanes {
    pub fn new(
        key: &Keypair,
        registry: Arc<AgentRegistry>,
        guard: Arc<Guard>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            tls: LaneTls::new(key)?,
            cfg: LaneConfig::default(),
            live: Default::default(),
            registry,
            guard,
            metrics,
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<Lane>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent's lane, while it is up.
    pub fn get(&self, agent: &PeerId) -> Option<Arc<Lane>> {
        self.live().get(agent).filter(|l| !l.is_closed()).cloned()
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
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                self.metrics.refuse("lane_handshakes_busy");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.admit(d).await;
                drop(permit);
            });
        }
    }

    async fn admit(self: Arc<Self>, d: Diverted) {
        let _ = d.tcp.set_nodelay(true);
        // No buffer under the lane: it writes its records gathered, in one call.
        let io = Rewind::new(d.prefix, d.tcp);
        let (io, peer, keys) = match self.tls.accept(io).await {
            Ok(x) => x,
            Err(e) => {
                self.metrics.bad_input(e.kind());
                tracing::debug!(remote = %d.remote, error = %e, "lane handshake failed");
                return;
            }
        };
        // Only an agent with a session gets a lane, and the lane ends with it.
        let Some(session) = self.registry.cancel_token(&peer) else {
            self.metrics.refuse("lane_without_session");
            tracing::debug!(%peer, remote = %d.remote, "lane from a peer without a session; closed");
            return;
        };
        let lane = Lane::start(io, keys, self.cfg);
        if let Some(old) = self.live().insert(peer, lane.clone()) {
            old.close();
        }
        self.metrics.lanes_active.inc();
        tracing::debug!(%peer, remote = %d.remote, "lane up");
        tokio::select! {
            () = lane.closed() => {}
            () = session.cancelled() => lane.close(),
        }
        {
            let mut live = self.live();
            if live.get(&peer).is_some_and(|l| Arc::ptr_eq(l, &lane)) {
                live.remove(&peer);
            }
        }
        self.metrics.lanes_active.dec();
        tracing::debug!(%peer, "lane down");
    }
}
