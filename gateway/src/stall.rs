//! Circuits held up by a reader that stopped. A circuit pump that cannot pass
//! bytes on stops reading its near side, so up to one QUIC stream window of
//! that peer's bytes waits unread at the gateway; those bytes count against
//! the peer's connection window, which its session, its other circuits and
//! its session lane share. A few such circuits would freeze all of them. So
//! each peer may have only `share` circuits stalled at once (chosen so their
//! windows take at most half its connection window); one more stalling ends
//! the one that has been stalled longest.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

pub struct StallLedger {
    share: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Per peer, its stalled circuits, oldest first.
    by_peer: HashMap<PeerId, Vec<Entry>>,
}

struct Entry {
    id: u64,
    since: Instant,
    end: CancellationToken,
}

impl StallLedger {
    /// `share`: stalled circuits one peer may have at once (at least 1).
    pub fn new(share: usize) -> Arc<Self> {
        Arc::new(Self {
            share: share.max(1),
            inner: Mutex::default(),
        })
    }

    /// The share that keeps stalled stream windows within half of a
    /// connection window.
    pub fn share_for(stream_window: u32, connection_window: u32) -> usize {
        let per = u64::from(stream_window.max(1));
        usize::try_from(u64::from(connection_window) / per / 2)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    pub fn share(&self) -> usize {
        self.share
    }

    /// Records that a circuit cannot pass on what it read from `peer`, until
    /// the returned guard drops. Past the peer's share, the circuit stalled
    /// longest is told to end through its token.
    pub fn stalled(self: &Arc<Self>, peer: PeerId, end: CancellationToken) -> Stall {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        let list = inner.by_peer.entry(peer).or_default();
        list.push(Entry {
            id,
            since: Instant::now(),
            end,
        });
        if list.len() > self.share {
            let oldest = list.remove(0);
            tracing::debug!(
                %peer,
                stalled_for = ?oldest.since.elapsed(),
                "ending the circuit stalled longest: the peer is past its share"
            );
            oldest.end.cancel();
        }
        Stall {
            ledger: Arc::clone(self),
            peer,
            id,
        }
    }

    /// Circuits stalled on `peer` right now.
    pub fn stalled_on(&self, peer: &PeerId) -> usize {
        self.lock().by_peer.get(peer).map_or(0, Vec::len)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stalled circuit direction; dropping it (the write went through, or
/// the circuit ended) takes it off the ledger.
pub struct Stall {
    ledger: Arc<StallLedger>,
    peer: PeerId,
    id: u64,
}

impl Drop for Stall {
    fn drop(&mut self) {
        let mut inner = self.ledger.lock();
        if let Some(list) = inner.by_peer.get_mut(&self.peer) {
            list.retain(|e| e.id != self.id);
            if list.is_empty() {
                inner.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_share_the_oldest_stall_ends_and_guards_clean_up() {
        let ledger = StallLedger::new(2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let tokens: Vec<_> = (0..3).map(|_| CancellationToken::new()).collect();
        let s0 = ledger.stalled(a, tokens[0].clone());
        let s1 = ledger.stalled(a, tokens[1].clone());
        let other = ledger.stalled(b, CancellationToken::new());
        assert!(!tokens[0].is_cancelled());
        let s2 = ledger.stalled(a, tokens[2].clone());
        assert!(tokens[0].is_cancelled(), "the oldest of a's stalls ends");
        assert!(!tokens[1].is_cancelled() && !tokens[2].is_cancelled());
        assert_eq!(ledger.stalled_on(&a), 2);
        assert_eq!(ledger.stalled_on(&b), 1, "another peer's share is its own");
        drop((s0, s1, s2, other));
        assert_eq!(ledger.stalled_on(&a), 0);
        assert!(ledger.lock().by_peer.is_empty());
    }

    #[test]
    fn share_keeps_stalled_windows_within_half_the_connection() {
        assert_eq!(StallLedger::share_for(4 << 20, 16 << 20), 2);
        assert_eq!(StallLedger::share_for(4 << 20, 4 << 20), 1);
        assert_eq!(StallLedger::share_for(1 << 20, 64 << 20), 32);
        assert_eq!(StallLedger::share_for(0, 0), 1);
    }
}
