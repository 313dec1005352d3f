//! Circuits held up by a reader that stopped. A circuit pump that cannot pass
//! bytes on stops reading its near side, so up to one QUIC stream window of
//! that peer's bytes waits unread at the gateway; those bytes count against
//! the peer's connection window, which its session, its other circuits and
//! its session lane share. A few such circuits would freeze all of them. So
//! each peer may have only `share` circuits stalled at once (chosen so their
//! windows take at most half its connection window); one more stalling ends
//! the one that has been stalled longest. The same holds for a tunnel's
//! session streams (the data path of agents without a lane), whose public
//! client stops reading. [`StallWriter`] reports a write that waits.

use std::{
    collections::HashMap,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A write pending this long means the far reader has stopped, for now.
pub const STALL_GRACE: Duration = Duration::from_millis(500);

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
    #[cfg(test)]
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

/// A writer toward a reader that may stop. A write that waits
/// [`STALL_GRACE`] puts it on the ledger under `peer` (whose bytes it holds);
/// it fails with `TimedOut` once the write has waited `timeout` (zero:
/// never) or when the ledger ends it to keep `peer` within its share.
pub struct StallWriter<W> {
    inner: W,
    ledger: Arc<StallLedger>,
    peer: PeerId,
    timeout: Duration,
    phase: Phase,
    /// One timer for the writer's life, moved rather than made again: a bulk
    /// transfer toward a slower reader waits on many writes.
    clock: Option<Pin<Box<Sleep>>>,
    /// Counts the writes this writer ended.
    ended: Option<Counter>,
}

enum Phase {
    /// The last write went through.
    Writing,
    /// A write is waiting, for less than the grace so far.
    Waiting,
    /// On the ledger; the clock runs to the timeout, if there is one.
    Stalled {
        _on_ledger: Stall,
        ended: Pin<Box<WaitForCancellationFutureOwned>>,
    },
}

impl<W> StallWriter<W> {
    pub fn new(inner: W, ledger: Arc<StallLedger>, peer: PeerId, timeout: Duration) -> Self {
        Self {
            inner,
            ledger,
            peer,
            timeout,
            phase: Phase::Writing,
            clock: None,
            ended: None,
        }
    }

    /// Counts each write this writer ends in `c`.
    pub fn counting(mut self, c: Counter) -> Self {
        self.ended = Some(c);
        self
    }

    fn end(&mut self, why: &str) -> io::Error {
        self.phase = Phase::Writing;
        if let Some(c) = &self.ended {
            c.inc();
        }
        io::Error::new(io::ErrorKind::TimedOut, format!("stalled: {why}"))
    }

    /// Sets the clock to ring `after` from now.
    fn arm(&mut self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        match &mut self.clock {
            Some(c) => c.as_mut().reset(at),
            None => self.clock = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Passes a finished poll through; on a pending one, keeps the clock.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.phase = Phase::Writing;
            return polled;
        }
        if matches!(self.phase, Phase::Writing) {
            self.arm(STALL_GRACE);
            self.phase = Phase::Waiting;
        }
        loop {
            // Past the grace the clock only runs toward a timeout.
            let timed = match &mut self.phase {
                Phase::Stalled { ended, .. } => {
                    if ended.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(self.end("its peer has too many stalled")));
                    }
                    !self.timeout.is_zero()
                }
                _ => true,
            };
            let Some(clock) = self.clock.as_mut().filter(|_| timed) else {
                return Poll::Pending;
            };
            if clock.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if matches!(self.phase, Phase::Stalled { .. }) {
                return Poll::Ready(Err(self.end("its reader stopped")));
            }
            let token = CancellationToken::new();
            self.phase = Phase::Stalled {
                _on_ledger: self.ledger.stalled(self.peer, token.clone()),
                ended: Box::pin(token.cancelled_owned()),
            };
            if !self.timeout.is_zero() {
                self.arm(self.timeout.saturating_sub(STALL_GRACE));
            }
        }
    }
}

impl<W: Unpin> StallWriter<W> {
    /// Polls the inner writer with `f` and watches the outcome.
    fn poll_inner<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut W>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.get_mut();
        let polled = f(Pin::new(&mut this.inner), cx);
        this.watch(cx, polled)
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_inner(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_inner(cx, |w, cx| w.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_inner(cx, |w, cx| w.poll_shutdown(cx))
    }
}

impl<W: futures::AsyncWrite + Unpin> futures::AsyncWrite for StallWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_inner(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_inner(cx, |w, cx| w.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_inner(cx, |w, cx| w.poll_close(cx))
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

    #[tokio::test]
    async fn a_writer_whose_reader_stops_is_put_on_the_ledger_then_ended() {
        use tokio::io::AsyncWriteExt;
        let ledger = StallLedger::new(1);
        let peer = PeerId::random();
        let (near, mut far) = tokio::io::duplex(1024);
        let mut w = StallWriter::new(near, ledger.clone(), peer, Duration::from_millis(1500));
        w.write_all(&[0u8; 1024]).await.unwrap();
        assert_eq!(
            ledger.stalled_on(&peer),
            0,
            "a write that completes is no stall"
        );
        let started = Instant::now();
        let write = tokio::spawn(async move { w.write_all(&[0u8; 1024]).await });
        tokio::time::sleep(STALL_GRACE + Duration::from_millis(300)).await;
        assert_eq!(
            ledger.stalled_on(&peer),
            1,
            "on the ledger once the grace is over"
        );
        let err = write.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(1400));
        assert_eq!(ledger.stalled_on(&peer), 0, "off the ledger once ended");
        let mut got = vec![0u8; 1024];
        tokio::io::AsyncReadExt::read_exact(&mut far, &mut got)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_ledger_ends_the_oldest_writer_past_the_share() {
        use tokio::io::AsyncWriteExt;
        let ledger = StallLedger::new(1);
        let peer = PeerId::random();
        let mut keep = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..2 {
            let (near, far) = tokio::io::duplex(16);
            keep.push(far);
            let mut w = StallWriter::new(near, ledger.clone(), peer, Duration::ZERO);
            writes.push(tokio::spawn(async move { w.write_all(&[0u8; 64]).await }));
            tokio::time::sleep(STALL_GRACE + Duration::from_millis(200)).await;
        }
        let first = writes.remove(0);
        let err = tokio::time::timeout(Duration::from_secs(2), first)
            .await
            .expect("ended at once")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            !writes[0].is_finished(),
            "the newer stall stays (no timeout)"
        );
        assert_eq!(ledger.stalled_on(&peer), 1);
    }
}
