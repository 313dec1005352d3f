//! The gateways this agent trusts: the one it is configured with, and the
//! others of its fleet, as a trusted gateway names them. Only they may open
//! tunnel streams and lanes on this agent or connect to it unasked; each
//! session's lanes are found here by the gateway's peer id.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use libp2p::PeerId;

use crate::lane::LaneDialer;

#[derive(Default)]
pub struct Gateways {
    inner: RwLock<HashMap<PeerId, Option<Arc<LaneDialer>>>>,
}

impl Gateways {
    pub fn new(seed: PeerId) -> Arc<Self> {
        let g = Self::default();
        g.trust(seed);
        Arc::new(g)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PeerId, Option<Arc<LaneDialer>>>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PeerId, Option<Arc<LaneDialer>>>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.read().contains_key(peer)
    }

    pub fn trust(&self, peer: PeerId) {
        self.write().entry(peer).or_insert(None);
    }

    /// No longer trusted: the gateway left the fleet.
    pub fn forget(&self, peer: &PeerId) {
        self.write().remove(peer);
    }

    /// The lanes of the session with `peer`, once it has one.
    pub fn set_lanes(&self, peer: PeerId, lanes: Arc<LaneDialer>) {
        self.write().insert(peer, Some(lanes));
    }

    pub fn lanes(&self, peer: &PeerId) -> Option<Arc<LaneDialer>> {
        self.read().get(peer).cloned().flatten()
    }

    pub fn all(&self) -> Vec<PeerId> {
        self.read().keys().copied().collect()
    }
}
