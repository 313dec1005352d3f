//! Who holds each leased port's socket on this gateway: a session of the
//! agent (a local claim), or the fleet's forwarder, which listens on the
//! ports other gateways serve and carries their connections there. A
//! session that leases a port takes it from the forwarder first: the
//! forwarder's listener closes before the session binds.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// How long a session waits for the forwarder to let go of a port.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    local: HashSet<u16>,
    /// Per port: the slot's id, its cancel token, and its closing signal.
    forwarding: HashMap<u16, (u64, CancellationToken, oneshot::Receiver<()>)>,
    /// Listeners told to stop whose sockets may still be open.
    closing: HashMap<u16, oneshot::Receiver<()>>,
    next: u64,
}

pub struct PortTable {
    inner: Mutex<Inner>,
    /// Bumped when a local claim ends: the forwarder may take the port.
    changed: watch::Sender<u64>,
}

impl Default for PortTable {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

/// A session's hold on a port; dropping it (the port's task ended, or was
/// aborted) gives the port back.
pub struct LocalClaim {
    table: Arc<PortTable>,
    port: u16,
}

impl Drop for LocalClaim {
    fn drop(&mut self) {
        self.table.lock().local.remove(&self.port);
        self.table.changed.send_modify(|n| *n += 1);
    }
}

/// The forwarder's hold on a port: cancelled when a session claims it;
/// dropped once its listener is closed.
pub struct ForwardSlot {
    id: u64,
    pub port: u16,
    pub cancel: CancellationToken,
    _closed: oneshot::Sender<()>,
}

impl PortTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes `port` for a session: stops the forwarder's listener on it and
    /// waits until that socket is closed, so the session can bind.
    pub async fn claim(self: &Arc<Self>, port: u16) -> LocalClaim {
        let closed = {
            let mut g = self.lock();
            g.local.insert(port);
            match g.forwarding.remove(&port) {
                Some((_, cancel, closed)) => {
                    cancel.cancel();
                    Some(closed)
                }
                None => g.closing.remove(&port),
            }
        };
        if let Some(closed) = closed {
            let _ = tokio::time::timeout(RELEASE_WAIT, closed).await;
        }
        LocalClaim {
            table: self.clone(),
            port,
        }
    }

    /// A slot for the forwarder to listen on `port`, unless a session holds
    /// it or the forwarder already does.
    pub fn start_forwarding(&self, port: u16) -> Option<ForwardSlot> {
        let mut g = self.lock();
        if g.local.contains(&port) || g.forwarding.contains_key(&port) {
            return None;
        }
        g.closing.remove(&port);
        let cancel = CancellationToken::new();
        let (tx, rx) = oneshot::channel();
        g.next += 1;
        let id = g.next;
        g.forwarding.insert(port, (id, cancel.clone(), rx));
        Some(ForwardSlot {
            id,
            port,
            cancel,
            _closed: tx,
        })
    }

    /// Stops forwarding `port` (no other gateway serves it any more).
    pub fn stop_forwarding(&self, port: u16) {
        let mut g = self.lock();
        if let Some((_, cancel, closed)) = g.forwarding.remove(&port) {
            cancel.cancel();
            // A session claiming the port next waits for the socket to close.
            g.closing.insert(port, closed);
        }
    }

    /// The forwarder's listener on the slot's port ended by itself (its
    /// bind failed): the port is free to try again.
    pub fn forwarding_ended(&self, slot: &ForwardSlot) {
        let mut g = self.lock();
        if g.forwarding.get(&slot.port).is_some_and(|e| e.0 == slot.id) {
            g.forwarding.remove(&slot.port);
        }
    }

    pub fn forwarding(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.lock().forwarding.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
