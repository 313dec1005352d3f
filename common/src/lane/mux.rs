//! The lane's stream multiplexer: many byte streams over one ordered,
//! encrypted connection, with half-close, resets and per-stream credit.
//!
//! Opening a stream costs no round trip (its `Open` frame travels ahead of its
//! first data). A stream holds no buffer while idle: received data waits in
//! its queue as the `Bytes` it arrived in, bounded by the stream's window
//! (see `flow`). The reader (`reader`) never waits for a stream's consumer,
//! and the writer (`writer`) sends a stream's frames in the order they were
//! made; only credit and keep-alives, which concern no frame of the stream
//! they name, may overtake.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::{
    flow::{Budget, LaneFlow, Rtt, SendCredit, MAX_WINDOW, MIN_WINDOW, OPEN_WINDOW},
    frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD},
    reader::read_loop,
    seal::LaneKeys,
    socket::RttProbe,
    stream::{Inbound, LaneStream},
    writer::{write_loop, Batcher},
    LaneError,
};
use bytes::BytesMut;

/// Tuning of one lane.
#[derive(Clone, Copy, Debug)]
pub struct LaneConfig {
    /// The largest receive window one stream grows to.
    pub max_window: u32,
    /// The window a stream this side opens starts with, budget allowing.
    pub open_window: u32,
    /// Streams open at once; the peer's opens past it are reset.
    pub max_streams: usize,
    /// Frames queued for the writer (data frames are at most 64 KiB each).
    pub send_queue: usize,
    /// A ping goes out after this much silence; three times it without a
    /// frame from the peer ends the lane.
    pub keep_alive: Duration,
    /// What the peer speaks.
    pub flow: LaneFlow,
    /// The side that opens streams: the listener (a gateway) on an agent's
    /// lane, the dialler on a lane between two gateways of a fleet. Both
    /// ends must agree; an open from the other side ends the lane.
    pub opener: Role,
}

impl Default for LaneConfig {
    fn default() -> Self {
        Self {
            max_window: MAX_WINDOW,
            open_window: OPEN_WINDOW,
            max_streams: 65_536,
            send_queue: 32,
            keep_alive: Duration::from_secs(10),
            flow: LaneFlow::Tuned,
            opener: Role::Listener,
        }
    }
}

/// What a lane shares with the rest of its agent's lanes, and how it learns
/// its round-trip time.
pub struct LaneLink {
    /// The agent's receive budget, shared by all its lanes.
    pub budget: Arc<Budget>,
    /// Reads the connection's round-trip time (see `socket::prepare`).
    pub rtt: Option<RttProbe>,
}

impl LaneLink {
    /// A lane of its own, with `budget` bytes of windows and no RTT probe.
    pub fn alone(budget: u64) -> Self {
        Self {
            budget: Budget::new(budget, None),
            rtt: None,
        }
    }
}

/// Which side of the lane this is. On an agent's lane the listener (the
/// gateway) opens streams, with even ids, and the dialer (the agent) accepts
/// them: a dialer's open is a protocol violation, since a gateway serves no
/// agent's streams. On a lane between gateways (`LaneConfig::opener`) the
/// dialer opens them, with odd ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that dialled (the agent).
    Dialer,
    /// The side that accepted (the gateway).
    Listener,
}

/// What the writer sends, in order.
pub(super) enum Out {
    /// A data frame with its record's room: see [`LaneStream::frame_buffer`].
    Data(BytesMut),
    Control([u8; HEADER_LEN]),
}

/// A stream as the lane's reader sees it.
pub(super) struct Slot {
    pub(super) tx: mpsc::UnboundedSender<Inbound>,
    /// Bytes the peer may still send before we return credit.
    pub(super) peer_credit: u64,
    pub(super) credit: Arc<SendCredit>,
}

pub(super) struct Shared {
    pub(super) role: Role,
    pub(super) cfg: LaneConfig,
    /// Data, opens, fins and resets, in the order they were made.
    pub(super) ordered: mpsc::Sender<Out>,
    /// Credit and pings: they concern no queued frame, so they may overtake.
    /// Unbounded, yet bounded by the peer: a credit answers at least a
    /// quarter window of its data, which it sends only within our credit.
    pub(super) urgent: mpsc::UnboundedSender<[u8; HEADER_LEN]>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    pub(super) budget: Arc<Budget>,
    pub(super) rtt: Rtt,
    pub(super) closed: CancellationToken,
}

impl Shared {
    pub(super) fn streams(&self) -> MutexGuard<'_, HashMap<u32, Slot>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Credit for the peer: may overtake queued frames.
    pub(super) fn credit(&self, stream: u32, n: u32) {
        let _ = self
            .urgent
            .send(Header::new(stream, Kind::Credit, n).encode());
    }

    /// A reset for a stream the peer opened past our limit. It goes on the
    /// bounded queue: a peer that keeps opening past the limit while not
    /// reading our refusals would otherwise grow this side's memory without
    /// end. False when the queue is full: the caller ends the lane.
    pub(super) fn refuse(&self, stream: u32) -> bool {
        let frame = Out::Control(Header::new(stream, Kind::Reset, 0).encode());
        !matches!(
            self.ordered.try_send(frame),
            Err(mpsc::error::TrySendError::Full(_))
        )
    }

    /// A reset after whatever this stream already queued (its open, data or
    /// fin): a reset that overtook its own open would leave the peer holding
    /// a stream this side forgot. Called from drops, so it cannot wait: a
    /// full queue hands the reset to a task that can.
    pub(super) fn reset(&self, stream: u32) {
        let frame = Out::Control(Header::new(stream, Kind::Reset, 0).encode());
        match self.ordered.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let ordered = self.ordered.clone();
                    rt.spawn(async move {
                        let _ = ordered.send(frame).await;
                    });
                }
            }
        }
    }

    /// Registers a stream: `send` is what the peer lets us send before its
    /// first credit, `recv` the window we give it (taken from the budget).
    pub(super) fn slot(self: &Arc<Self>, id: u32, send: u32, recv: u32) -> LaneStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(SendCredit::new(send));
        self.streams().insert(
            id,
            Slot {
                tx,
                peer_credit: u64::from(recv),
                credit: credit.clone(),
            },
        );
        LaneStream::new(id, self.clone(), rx, credit, recv)
    }

    /// The lane is gone: wake every stream with a reset.
    pub(super) fn close_all(&self) {
        self.closed.cancel();
        for (_, slot) in self.streams().drain() {
            let _ = slot.tx.send(Inbound::Reset);
            slot.credit.close();
        }
    }
}

/// One lane: the multiplexer over an established, authenticated connection.
pub struct Lane {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<LaneStream>>,
}

impl Lane {
    /// Starts the reader and writer tasks over `io`, sealing and opening
    /// records with `keys`. The lane ends when the connection does, on a
    /// protocol violation, or on [`Lane::close`].
    pub fn start<S>(io: S, keys: LaneKeys, cfg: LaneConfig, link: LaneLink) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let role = keys.role();
        let (seal, open) = keys.split();
        let (r, w) = tokio::io::split(io);
        let (ordered_tx, ordered_rx) = mpsc::channel(cfg.send_queue.max(1));
        let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
        let (accept_tx, accept_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            role,
            cfg,
            ordered: ordered_tx,
            urgent: urgent_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(match role {
                Role::Dialer => 1,
                Role::Listener => 2,
            }),
            budget: link.budget,
            rtt: Rtt::default(),
            closed: CancellationToken::new(),
        });
        let writer_closed = shared.closed.clone();
        let keep_alive = cfg.keep_alive;
        tokio::spawn(async move {
            let r = write_loop(
                Batcher::new(w, seal),
                ordered_rx,
                urgent_rx,
                writer_closed.clone(),
                keep_alive,
            )
            .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "lane writer ended");
            }
            writer_closed.cancel();
        });
        let reader_shared = shared.clone();
        let probe = link.rtt;
        tokio::spawn(async move {
            let closed = reader_shared.closed.clone();
            let r = tokio::select! {
                r = read_loop(r, open, &reader_shared, accept_tx, probe) => r,
                () = closed.cancelled() => Ok(()),
            };
            match &r {
                Ok(()) | Err(LaneError::Ended) => tracing::debug!("lane closed"),
                Err(e) => tracing::info!(error = %e, "lane closed"),
            }
            reader_shared.close_all();
        });
        Arc::new(Self {
            shared,
            incoming: tokio::sync::Mutex::new(accept_rx),
        })
    }

    /// Opens a stream; the peer learns of it with the first frame.
    pub async fn open(&self) -> Result<LaneStream, LaneError> {
        if self.shared.role != self.shared.cfg.opener {
            return Err(LaneError::Protocol(
                "this side of the lane opens no streams",
            ));
        }
        if self.is_closed() {
            return Err(LaneError::Closed);
        }
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed);
        if id >= u32::MAX - 2 {
            // Ids are never reused: a worn-out lane is replaced by a new one.
            self.close();
            return Err(LaneError::Closed);
        }
        let permit = self
            .shared
            .ordered
            .reserve()
            .await
            .map_err(|_| LaneError::Closed)?;
        let cfg = &self.shared.cfg;
        let (window, named) = match cfg.flow {
            // With the budget spent, new streams start small instead of the
            // lane stalling: a stream needs no more to make progress.
            LaneFlow::Tuned => {
                let w = self
                    .shared
                    .budget
                    .take(cfg.open_window.max(MIN_WINDOW), MIN_WINDOW);
                (w, w)
            }
            LaneFlow::Fixed => (
                self.shared.budget.take(cfg.flow.accept_window(), u32::MAX),
                0,
            ),
        };
        let stream = self.shared.slot(id, cfg.flow.accept_window(), window);
        permit.send(Out::Control(Header::new(id, Kind::Open, named).encode()));
        Ok(stream)
    }

    /// The next stream the peer opened; `None` once the lane is closed.
    pub async fn accept(&self) -> Option<LaneStream> {
        let mut rx = self.incoming.lock().await;
        tokio::select! {
            // Streams the peer opened before the lane ended are still served.
            biased;
            s = rx.recv() => s,
            () = self.shared.closed.cancelled() => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Resolves once the lane has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Ends the lane: what is queued is still sent, then every open stream
    /// is reset.
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.shared.streams().len()
    }

    /// Receive window bytes the agent's lanes have committed (all of them,
    /// as the budget is shared).
    pub fn committed(&self) -> u64 {
        self.shared.budget.committed()
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.close();
    }
}

/// A data frame's payload never exceeds a window: at least one byte of
/// credit lets a frame out (see `flow::frame_len`).
const _: () = assert!(MIN_WINDOW as usize <= MAX_PAYLOAD);
