//! What a copy loop reports the bytes it moved in one direction to, and what
//! may hold them back: the tunnel's counter, the connection's own count (the
//! admin API's live view), and a pacer (a bandwidth cap). A plain counter
//! costs what it did before: no pacer, no allocation, no extra await.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::metrics::counter::Counter;

/// A wait for a cap.
pub type Wait<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Holds bytes back until a cap lets them pass.
pub trait Pacer: Send + Sync {
    /// `None` when `n` more bytes may pass now; else a wait that resolves
    /// once they may.
    fn pass(&self, n: usize) -> Option<Wait<'_>>;
}

/// One direction's accounting of a copy loop.
#[derive(Clone, Copy)]
pub struct Tally<'a> {
    counter: &'a Counter,
    own: Option<&'a AtomicU64>,
    pacer: Option<&'a dyn Pacer>,
}

impl<'a> Tally<'a> {
    pub fn new(counter: &'a Counter) -> Self {
        Self {
            counter,
            own: None,
            pacer: None,
        }
    }

    /// Also counts into the connection's own total.
    pub fn own(mut self, own: &'a AtomicU64) -> Self {
        self.own = Some(own);
        self
    }

    /// Also waits for `pacer` before bytes go on.
    pub fn paced(mut self, pacer: Option<&'a dyn Pacer>) -> Self {
        self.pacer = pacer;
        self
    }

    /// Waits until `n` bytes read may be written on, then counts them.
    pub async fn pass(&self, n: usize) {
        if let Some(wait) = self.pacer.and_then(|p| p.pass(n)) {
            wait.await;
        }
        self.count(n);
    }

    /// Counts `n` bytes that already went on.
    pub fn count(&self, n: usize) {
        self.counter.inc_by(n as u64);
        if let Some(o) = self.own {
            o.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl<'a> From<&'a Counter> for Tally<'a> {
    fn from(counter: &'a Counter) -> Self {
        Self::new(counter)
    }
}
