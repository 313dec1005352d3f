//! Flow control of the lane's streams: how much each side may send, and how
//! much memory a receiver commits to.
//!
//! Every stream has a receive window per direction: bytes its sender may have
//! in flight before the receiver returns them as credit. A window starts
//! small and grows while its stream drains a whole window within about two
//! round trips, the way QUIC stacks tune theirs (chromium's
//! `QuicFlowController`), so one stream fills a long fat pipe and an idle or
//! stalled one never holds more than it was given. What all windows of one
//! agent may add up to is its [`Budget`]: growth past it is refused and new
//! streams start smaller, but the lane's reader never stops reading, so one
//! stalled consumer never holds up another stream.

use std::{
    io,
    sync::{
        atomic::{AtomicI64, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use super::MAX_PAYLOAD;

/// The window a stream's acceptor starts with (its opener may send this much
/// before the first credit): part of the protocol, both ends assume it.
pub const ACCEPT_WINDOW: u32 = 256 * 1024;
/// What a stream's opener starts with when its budget allows; it names its
/// window in the `Open` frame, so this is a local choice.
pub const OPEN_WINDOW: u32 = 256 * 1024;
/// No stream starts below this, even with its budget spent: enough for
/// request-response traffic to keep moving.
pub const MIN_WINDOW: u32 = 16 * 1024;
/// The largest window a stream grows to by default: what one connection
/// needs to fill 150 ms at about 2 Gbit/s (the window also covers the
/// queues along the path, not only its round trip).
pub const MAX_WINDOW: u32 = 64 << 20;
/// Windows of lanes to peers that predate window tuning: fixed at 1 MiB and
/// not named in `Open` (see [`LaneFlow::Fixed`]).
pub const FIXED_WINDOW: u32 = 1 << 20;
/// Round trips shorter than this are taken as this long: a credit also waits
/// on both ends' tasks, which the kernel's round-trip time does not see.
const RTT_FLOOR: Duration = Duration::from_millis(1);
/// Taken while no round-trip time is known (a lane over something other than
/// TCP): windows then grow eagerly, within the budget.
const RTT_UNKNOWN: Duration = Duration::from_millis(100);

/// Which flow control the two ends of a lane speak, agreed in the session's
/// hello and welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneFlow {
    /// Windows fixed at [`FIXED_WINDOW`] both ways, `Open` carries no length:
    /// a peer from before window tuning. Our own windows still grow (extra
    /// credit is credit to any sender).
    Fixed,
    /// The opener names its window in `Open`; the acceptor starts with
    /// [`ACCEPT_WINDOW`]; both grow.
    Tuned,
}

impl LaneFlow {
    /// This build's version number in hello and welcome.
    pub const TUNED_VERSION: u8 = 2;

    /// From the number the peer named (none: [`LaneFlow::Fixed`]).
    pub fn from_version(v: Option<u8>) -> Self {
        match v {
            Some(n) if n >= Self::TUNED_VERSION => LaneFlow::Tuned,
            _ => LaneFlow::Fixed,
        }
    }

    pub(super) fn accept_window(self) -> u32 {
        match self {
            LaneFlow::Fixed => FIXED_WINDOW,
            LaneFlow::Tuned => ACCEPT_WINDOW,
        }
    }
}

/// Receive memory that all lanes of one agent may commit to: the sum of
/// their streams' windows. Shared by an agent's lanes at both ends.
#[derive(Debug)]
pub struct Budget {
    /// Can go below zero by the floors of streams opened with the budget spent.
    available: AtomicI64,
    limit: u64,
    /// The process-wide gauge of committed window bytes, when metered.
    gauge: Option<Gauge>,
}

impl Budget {
    pub fn new(limit: u64, gauge: Option<Gauge>) -> Arc<Self> {
        Arc::new(Self {
            available: AtomicI64::new(i64::try_from(limit).unwrap_or(i64::MAX)),
            limit,
            gauge,
        })
    }

    /// Takes up to `want` bytes, and at least `floor` even past the limit.
    pub(super) fn take(&self, want: u32, floor: u32) -> u32 {
        let mut cur = self.available.load(Ordering::Relaxed);
        loop {
            let free = u32::try_from(cur.max(0)).unwrap_or(u32::MAX);
            let grant = free.min(want).max(floor.min(want));
            if grant == 0 {
                return 0;
            }
            match self.available.compare_exchange_weak(
                cur,
                cur - i64::from(grant),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if let Some(g) = &self.gauge {
                        g.inc_by(i64::from(grant));
                    }
                    return grant;
                }
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn give(&self, n: u32) {
        self.available.fetch_add(i64::from(n), Ordering::Relaxed);
        if let Some(g) = &self.gauge {
            g.dec_by(i64::from(n));
        }
    }

    /// Bytes committed to windows now.
    pub fn committed(&self) -> u64 {
        let avail = self.available.load(Ordering::Relaxed);
        (i128::from(self.limit) - i128::from(avail)).max(0) as u64
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// The lane's smoothed round-trip time, sampled from its TCP connection.
#[derive(Debug, Default)]
pub(super) struct Rtt(AtomicU32);

impl Rtt {
    pub(super) fn set(&self, rtt: Duration) {
        let micros = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1);
        self.0.store(micros, Ordering::Relaxed);
    }

    /// What window growth compares against.
    pub(super) fn get(&self) -> Duration {
        match self.0.load(Ordering::Relaxed) {
            0 => RTT_UNKNOWN,
            us => Duration::from_micros(u64::from(us)).max(RTT_FLOOR),
        }
    }
}

/// The receiving side of one stream: its window, the bytes consumed and not
/// yet returned, and when credit last went out.
#[derive(Debug)]
pub(super) struct RecvWindow {
    size: u32,
    max: u32,
    unacked: u32,
    last_credit: Instant,
}

impl RecvWindow {
    pub(super) fn new(size: u32, max: u32) -> Self {
        Self {
            size,
            max: max.max(size),
            unacked: 0,
            last_credit: Instant::now(),
        }
    }

    pub(super) fn size(&self) -> u32 {
        self.size
    }

    /// `n` more bytes were consumed. Returns the credit to send now, if any:
    /// what was consumed since the last, plus what the window grew by.
    /// Credit goes out once a quarter of the window was consumed; if that
    /// took less than half a round trip, the stream drains its whole window
    /// in under two, so the window is what limits it: it doubles, as far as
    /// `budget` allows.
    pub(super) fn consumed(&mut self, n: u32, rtt: Duration, budget: &Budget) -> Option<u32> {
        self.unacked = self.unacked.saturating_add(n);
        if self.unacked < (self.size / 4).max(1) {
            return None;
        }
        let now = Instant::now();
        let quick = now.duration_since(self.last_credit) < rtt / 2;
        self.last_credit = now;
        let mut credit = std::mem::take(&mut self.unacked);
        if quick && self.size < self.max {
            let grown = budget.take(self.size.min(self.max - self.size), 0);
            self.size += grown;
            credit = credit.saturating_add(grown);
        }
        Some(credit)
    }
}

#[derive(Default)]
struct CreditState {
    available: u64,
    waker: Option<Waker>,
    closed: bool,
}

/// Send credit of one stream, topped up by the peer's `Credit` frames.
#[derive(Default)]
pub(super) struct SendCredit(Mutex<CreditState>);

impl SendCredit {
    pub(super) fn new(initial: u32) -> Self {
        Self(Mutex::new(CreditState {
            available: u64::from(initial),
            ..CreditState::default()
        }))
    }

    fn lock(&self) -> MutexGuard<'_, CreditState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn add(&self, n: u64) {
        let mut s = self.lock();
        s.available = s.available.saturating_add(n);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    pub(super) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Ready with the credit available once there is at least `want` (at
    /// least one byte, when `want` is 0).
    pub(super) fn poll_ready(&self, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<u64>> {
        let mut s = self.lock();
        if s.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "lane stream reset",
            )));
        }
        if s.available > 0 && s.available >= want {
            return Poll::Ready(Ok(s.available));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(super) fn take(&self, n: u64) {
        let mut s = self.lock();
        s.available = s.available.saturating_sub(n);
    }
}

/// Largest frame worth sending with `credit` available.
pub(super) fn frame_len(want: usize, credit: u64) -> usize {
    want.min(MAX_PAYLOAD)
        .min(usize::try_from(credit).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_grants_what_it_has_and_floors_past_it() {
        let b = Budget::new(100_000, None);
        assert_eq!(b.take(60_000, MIN_WINDOW), 60_000);
        assert_eq!(b.take(60_000, MIN_WINDOW), 40_000);
        assert_eq!(
            b.take(60_000, MIN_WINDOW),
            MIN_WINDOW,
            "the floor overdraws"
        );
        assert_eq!(b.take(60_000, 0), 0, "growth stops at the limit");
        assert_eq!(b.committed(), 100_000 + u64::from(MIN_WINDOW));
        b.give(60_000);
        b.give(40_000);
        b.give(MIN_WINDOW);
        assert_eq!(b.committed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_grows_only_while_it_limits_the_stream() {
        let budget = Budget::new(64 << 20, None);
        let rtt = Duration::from_millis(50);
        let mut w = RecvWindow::new(256 * 1024, 4 << 20);
        // A quarter drained in 5 ms: the window is the limit, it doubles.
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(
            w.consumed(64 * 1024, rtt, &budget),
            Some(64 * 1024 + 256 * 1024)
        );
        assert_eq!(w.size(), 512 * 1024);
        // Less than a quarter: no credit yet.
        assert_eq!(w.consumed(1000, rtt, &budget), None);
        // The rest of a quarter, slowly (an application-limited stream): no growth.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            w.consumed(128 * 1024, rtt, &budget),
            Some(128 * 1024 + 1000)
        );
        assert_eq!(w.size(), 512 * 1024);
        // Growth stops at the maximum.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(1)).await;
            w.consumed(w.size(), rtt, &budget);
        }
        assert_eq!(w.size(), 4 << 20);
        assert_eq!(budget.committed(), (4 << 20) - 256 * 1024);
    }
}
