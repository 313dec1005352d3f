//! The lane's stream multiplexer: many byte streams over one ordered,
//! encrypted connection, with half-close, resets and per-stream credit.
//!
//! Opening a stream costs no round trip (its `Open` frame travels ahead of its
//! first data). A stream holds no buffer while idle: received data waits in
//! its queue as the `Bytes` it arrived in, bounded by the stream's credit and
//! by the lane's total ([`LaneConfig::max_buffered`]).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::{mpsc, Semaphore},
};
use tokio_util::sync::{CancellationToken, PollSender};

use super::{
    frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD},
    gather::write_all_vectored,
    seal::{LaneKeys, Opener, Sealer, PAYLOAD_OFFSET, RECORD_HEADER, TAG_LEN},
    LaneError,
};

/// Tuning of one lane; both ends use the same values.
#[derive(Clone, Copy, Debug)]
pub struct LaneConfig {
    /// Bytes a stream may have in flight before its receiver returns credit.
    pub window: u32,
    /// Bytes received on all streams and not yet read by their consumers; past
    /// it the lane stops reading from the connection.
    pub max_buffered: usize,
    /// Streams open at once; the peer's opens past it are reset.
    pub max_streams: usize,
    /// Frames queued for the writer (data frames are at most 64 KiB each).
    pub send_queue: usize,
    /// A ping goes out after this much silence; three times it without a
    /// frame from the peer ends the lane.
    pub keep_alive: Duration,
}

impl Default for LaneConfig {
    fn default() -> Self {
        Self {
            window: 1 << 20,
            max_buffered: 64 << 20,
            max_streams: 65_536,
            send_queue: 256,
            keep_alive: Duration::from_secs(10),
        }
    }
}

/// Which side of the lane this is. The listener (the gateway) opens streams,
/// with even ids; the dialer (the agent) accepts them. A dialer's open is a
/// protocol violation: a gateway never serves streams, so it must not hold them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that dialled (the agent).
    Dialer,
    /// The side that accepted (the gateway).
    Listener,
}

/// What the writer sends, in order.
enum Out {
    /// A data frame with its record's room: see [`LaneStream::frame_buffer`].
    Data(BytesMut),
    Control([u8; HEADER_LEN]),
}

enum Inbound {
    Data(Bytes),
    Fin,
    Reset,
}

/// What a stream's consumer gets from [`LaneStream::recv`].
#[derive(Debug)]
pub enum Recv {
    Data(Bytes),
    /// The peer half-closed the stream.
    End,
    /// The peer reset the stream, or the lane is gone.
    Reset,
}

#[derive(Default)]
struct CreditState {
    available: u64,
    waker: Option<Waker>,
    closed: bool,
}

/// Send credit of one stream, topped up by the peer's `Credit` frames.
#[derive(Default)]
struct SendCredit(Mutex<CreditState>);

impl SendCredit {
    fn lock(&self) -> MutexGuard<'_, CreditState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn add(&self, n: u64) {
        let mut s = self.lock();
        s.available = s.available.saturating_add(n);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
    fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
    /// Ready once at least `want` bytes (or any, when `want` is 0) may be sent.
    fn poll_ready(&self, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<u64>> {
        let mut s = self.lock();
        if s.closed {
            return Poll::Ready(Err(reset()));
        }
        if s.available > 0 && s.available >= want {
            return Poll::Ready(Ok(s.available));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
    fn take(&self, n: u64) {
        let mut s = self.lock();
        s.available = s.available.saturating_sub(n);
    }
}

struct Slot {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Bytes the peer may still send before we return credit.
    peer_credit: u64,
    credit: Arc<SendCredit>,
}

struct Shared {
    role: Role,
    cfg: LaneConfig,
    ordered: mpsc::Sender<Out>,
    /// Resets and credit: they may overtake queued data.
    urgent: mpsc::UnboundedSender<[u8; HEADER_LEN]>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    buffered: Arc<Semaphore>,
    closed: CancellationToken,
}

impl Shared {
    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Slot>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self, stream: u32, kind: Kind, len: u32) {
        let _ = self.urgent.send(Header::new(stream, kind, len).encode());
    }

    /// Registers a stream and returns its handle.
    fn slot(self: &Arc<Self>, id: u32) -> LaneStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(SendCredit::default());
        credit.add(u64::from(self.cfg.window));
        self.streams().insert(
            id,
            Slot {
                tx,
                peer_credit: u64::from(self.cfg.window),
                credit: credit.clone(),
            },
        );
        LaneStream::new(id, self.clone(), rx, credit)
    }

    /// The lane is gone: wake every stream with a reset.
    fn close_all(&self) {
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
    pub fn start<S>(io: S, keys: LaneKeys, mut cfg: LaneConfig) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        cfg.window = cfg.window.max(MAX_PAYLOAD as u32);
        let role = keys.role();
        let (seal, open) = keys.split();
        let (r, w) = tokio::io::split(io);
        let (ordered_tx, ordered_rx) = mpsc::channel(cfg.send_queue);
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
            buffered: Arc::new(Semaphore::new(cfg.max_buffered)),
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
        tokio::spawn(async move {
            let closed = reader_shared.closed.clone();
            let r = tokio::select! {
                r = read_loop(r, open, &reader_shared, accept_tx) => r,
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
        let stream = self.shared.slot(id);
        permit.send(Out::Control(Header::new(id, Kind::Open, 0).encode()));
        Ok(stream)
    }

    /// The next stream the peer opened; `None` once the lane is closed.
    pub async fn accept(&self) -> Option<LaneStream> {
        let mut rx = self.incoming.lock().await;
        tokio::select! {
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

    /// Ends the lane: every open stream is reset.
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.shared.streams().len()
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads records, opens them in place and routes their frames. Payloads are
/// split off one large read buffer, so a data frame reaches its stream
/// without a copy.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    mut open: Opener,
    shared: &Arc<Shared>,
    accept: mpsc::Sender<LaneStream>,
) -> Result<(), LaneError> {
    const READ: usize = 256 * 1024;
    let mut buf = BytesMut::with_capacity(READ);
    // Any record counts as life; the peer pings every `keep_alive`.
    let mut silence = Silence::new(shared.cfg.keep_alive * 3);
    loop {
        let Some(len) = Opener::record_len(&buf)? else {
            fill(&mut r, &mut buf, RECORD_HEADER, &mut silence).await?;
            continue;
        };
        if buf.len() < len {
            fill(&mut r, &mut buf, len, &mut silence).await?;
            continue;
        }
        let mut record = buf.split_to(len);
        let plain = open.open(&mut record)?;
        route(record.freeze().slice(plain), shared, &accept).await?;
    }
}

/// Hands the frames of one opened record to their streams.
async fn route(
    mut frames: Bytes,
    shared: &Arc<Shared>,
    accept: &mpsc::Sender<LaneStream>,
) -> Result<(), LaneError> {
    while !frames.is_empty() {
        let h = frames
            .first_chunk::<HEADER_LEN>()
            .ok_or(LaneError::Protocol("a frame split across records"))?;
        let h = Header::decode(h)?;
        frames.advance(HEADER_LEN);
        match h.kind {
            Kind::Ping => {}
            Kind::Data => {
                if frames.len() < h.len as usize {
                    return Err(LaneError::Protocol("a frame split across records"));
                }
                // A full frame stays a slice of the read buffer (a quarter
                // of it at most); a shorter one is copied out, so a consumer
                // that stalls pins at most 4x the bytes it is counted for.
                let payload = if h.len as usize == MAX_PAYLOAD {
                    frames.split_to(MAX_PAYLOAD)
                } else {
                    let p = Bytes::copy_from_slice(&frames[..h.len as usize]);
                    frames.advance(h.len as usize);
                    p
                };
                // Backpressure for the whole lane when consumers fall behind.
                let permits = shared
                    .buffered
                    .clone()
                    .acquire_many_owned(h.len)
                    .await
                    .map_err(|_| LaneError::Closed)?;
                let mut streams = shared.streams();
                let Some(slot) = streams.get_mut(&h.stream) else {
                    // Reset or closed here already; the data is moot.
                    continue;
                };
                if u64::from(h.len) > slot.peer_credit {
                    return Err(LaneError::Protocol("data beyond the stream's credit"));
                }
                slot.peer_credit -= u64::from(h.len);
                if slot.tx.send(Inbound::Data(payload)).is_ok() {
                    // Released by the consumer as it reads.
                    permits.forget();
                }
            }
            Kind::Open => {
                // Only the gateway opens streams (even ids); the agent serves them.
                if shared.role == Role::Listener {
                    return Err(LaneError::Protocol("the gateway's side takes no streams"));
                }
                if h.stream % 2 == 1 || shared.streams().contains_key(&h.stream) {
                    return Err(LaneError::Protocol("open with a wrong or used stream id"));
                }
                if shared.streams().len() >= shared.cfg.max_streams {
                    shared.control(h.stream, Kind::Reset, 0);
                    continue;
                }
                let stream = shared.slot(h.stream);
                // A full accept queue drops the stream, which resets it.
                let _ = accept.try_send(stream);
            }
            Kind::Fin => {
                if let Some(slot) = shared.streams().get(&h.stream) {
                    let _ = slot.tx.send(Inbound::Fin);
                }
            }
            Kind::Reset => {
                if let Some(slot) = shared.streams().remove(&h.stream) {
                    let _ = slot.tx.send(Inbound::Reset);
                    slot.credit.close();
                }
            }
            Kind::Credit => {
                if let Some(slot) = shared.streams().get(&h.stream) {
                    slot.credit.add(u64::from(h.len));
                }
            }
        }
    }
    Ok(())
}

/// Watches for a silent peer with one timer for the lane's life rather than
/// one per read.
struct Silence {
    limit: Duration,
    last: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Silence {
    fn new(limit: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            limit,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    /// Resolves once nothing arrived for `limit`.
    async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last + self.limit;
            if due <= tokio::time::Instant::now() {
                return;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// Reads until `buf` holds at least `want` bytes.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    want: usize,
    silence: &mut Silence,
) -> Result<(), LaneError> {
    while buf.len() < want {
        // Fresh room once the rest of the buffer is taken by frames in use.
        if buf.capacity() - buf.len() < (want - buf.len()).max(16 * 1024) {
            buf.reserve((want - buf.len()).max(256 * 1024));
        }
        let read = tokio::select! {
            r = r.read_buf(buf) => r,
            () = silence.expired() => return Err(LaneError::Silent),
        };
        match read {
            Ok(0) if buf.is_empty() => return Err(LaneError::Ended),
            Ok(0) => return Err(LaneError::Protocol("connection ended inside a frame")),
            Ok(_) => silence.last = tokio::time::Instant::now(),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes queued frames, batching whatever is ready into one flush.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: Batcher<W>,
    mut ordered: mpsc::Receiver<Out>,
    mut urgent: mpsc::UnboundedReceiver<[u8; HEADER_LEN]>,
    closed: CancellationToken,
    keep_alive: Duration,
) -> Result<(), LaneError> {
    const BATCH: usize = 256 * 1024;
    let ping = Header::new(0, Kind::Ping, 0).encode();
    // One timer for the lane's life, not one per batch.
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            () = closed.cancelled() => break,
            Some(h) = urgent.recv() => Out::Control(h),
            m = ordered.recv() => match m {
                Some(o) => o,
                None => break,
            },
            _ = pings.tick() => Out::Control(ping),
        };
        w.put(first)?;
        while w.size() < BATCH {
            let next = match urgent.try_recv() {
                Ok(h) => Out::Control(h),
                Err(_) => match ordered.try_recv() {
                    Ok(o) => o,
                    Err(_) => break,
                },
            };
            w.put(next)?;
        }
        w.flush().await?;
    }
    let _ = w.flush().await;
    let _ = w.io.shutdown().await;
    Ok(())
}

/// Seals frames into records and writes them gathered. A large data frame
/// is sealed in place in its own buffer, as its own record; small frames
/// (opens, statuses, credits, fins, short messages) are gathered into one
/// record, so a batch of them costs one seal and one system call.
struct Batcher<W> {
    io: W,
    seal: Sealer,
    /// Small frames for the next record, after room for its length.
    small: BytesMut,
    /// Sealed records, in order, for the next gathered write.
    sealed: Vec<Bytes>,
    sealed_len: usize,
}

impl<W: AsyncWrite + Unpin> Batcher<W> {
    /// Data frames up to this payload size are gathered.
    const SMALL: usize = 2048;
    /// Frames gathered into one record at most.
    const GATHER: usize = 16 * 1024;

    fn new(io: W, seal: Sealer) -> Self {
        Self {
            io,
            seal,
            small: BytesMut::new(),
            sealed: Vec::new(),
            sealed_len: 0,
        }
    }

    /// Bytes waiting for the next flush.
    fn size(&self) -> usize {
        self.sealed_len + self.small.len()
    }

    fn put(&mut self, out: Out) -> Result<(), LaneError> {
        match out {
            Out::Control(h) => self.gather(&h),
            Out::Data(frame) if frame.len() <= PAYLOAD_OFFSET + Self::SMALL => {
                self.gather(&frame[RECORD_HEADER..])
            }
            Out::Data(mut frame) => {
                self.seal_gathered()?;
                self.seal.seal(&mut frame)?;
                self.push(frame);
                Ok(())
            }
        }
    }

    fn gather(&mut self, frame: &[u8]) -> Result<(), LaneError> {
        if self.small.len() + frame.len() > RECORD_HEADER + Self::GATHER {
            self.seal_gathered()?;
        }
        if self.small.is_empty() {
            // Takes back the room of records already written.
            self.small.reserve(RECORD_HEADER + Self::GATHER + TAG_LEN);
            self.small.resize(RECORD_HEADER, 0);
        }
        self.small.extend_from_slice(frame);
        Ok(())
    }

    fn seal_gathered(&mut self) -> Result<(), LaneError> {
        if self.small.len() > RECORD_HEADER {
            // Sealed before the split, so the tag goes into the room reserved for it.
            self.seal.seal(&mut self.small)?;
            let record = self.small.split();
            self.push(record);
        }
        Ok(())
    }

    fn push(&mut self, record: BytesMut) {
        self.sealed_len += record.len();
        self.sealed.push(record.freeze());
    }

    async fn flush(&mut self) -> Result<(), LaneError> {
        self.seal_gathered()?;
        write_all_vectored(&mut self.io, &mut self.sealed).await?;
        self.sealed_len = 0;
        self.io.flush().await?;
        Ok(())
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "lane stream reset")
}

/// What both halves of a stream share; its drop closes the stream.
struct Core {
    id: u32,
    shared: Arc<Shared>,
    fin_sent: AtomicBool,
    /// The peer finished or reset: nothing more will arrive.
    ended: AtomicBool,
}

impl Drop for Core {
    fn drop(&mut self) {
        let slot = self.shared.streams().remove(&self.id);
        let clean = self.fin_sent.load(Ordering::Relaxed) && self.ended.load(Ordering::Relaxed);
        if slot.is_some() && !clean {
            self.shared.control(self.id, Kind::Reset, 0);
        }
    }
}

/// One stream of a lane. Dropping it before both sides finished resets it.
pub struct LaneStream {
    reader: LaneReader,
    writer: LaneWriter,
}

/// The receiving half of a [`LaneStream`].
pub struct LaneReader {
    core: Arc<Core>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    /// The rest of a data frame a reader did not take whole.
    chunk: Bytes,
    /// Bytes consumed and not yet returned to the peer as credit.
    unacked: u32,
}

/// The sending half of a [`LaneStream`].
pub struct LaneWriter {
    core: Arc<Core>,
    credit: Arc<SendCredit>,
    sender: PollSender<Out>,
}

impl LaneStream {
    fn new(
        id: u32,
        shared: Arc<Shared>,
        rx: mpsc::UnboundedReceiver<Inbound>,
        credit: Arc<SendCredit>,
    ) -> Self {
        let sender = PollSender::new(shared.ordered.clone());
        let core = Arc::new(Core {
            id,
            shared,
            fin_sent: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        Self {
            reader: LaneReader {
                core: core.clone(),
                rx,
                chunk: Bytes::new(),
                unacked: 0,
            },
            writer: LaneWriter {
                core,
                credit,
                sender,
            },
        }
    }

    pub fn id(&self) -> u32 {
        self.reader.core.id
    }

    pub fn split(self) -> (LaneReader, LaneWriter) {
        (self.reader, self.writer)
    }

    pub async fn recv(&mut self) -> Recv {
        self.reader.recv().await
    }

    pub async fn send(&mut self, frame: BytesMut) -> io::Result<()> {
        self.writer.send(frame).await
    }

    pub async fn finish(&mut self) -> io::Result<()> {
        self.writer.finish().await
    }

    /// A buffer for [`LaneWriter::send`]: room for the record's length and
    /// the frame's header, then `capacity` for the payload, and spare room
    /// for the record's tag, so the frame is sealed where it lies.
    pub fn frame_buffer(capacity: usize) -> BytesMut {
        let mut b = BytesMut::with_capacity(PAYLOAD_OFFSET + capacity.min(MAX_PAYLOAD) + TAG_LEN);
        b.resize(PAYLOAD_OFFSET, 0);
        b
    }
}

impl LaneReader {
    /// Hands `n` consumed bytes back: to the lane's buffer budget at once,
    /// to the peer as credit in batches.
    fn consumed(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let shared = &self.core.shared;
        shared.buffered.add_permits(n);
        self.unacked += n as u32;
        if self.unacked >= shared.cfg.window / 4 {
            if let Some(slot) = shared.streams().get_mut(&self.core.id) {
                slot.peer_credit += u64::from(self.unacked);
            }
            shared.control(self.core.id, Kind::Credit, self.unacked);
            self.unacked = 0;
        }
    }

    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Recv> {
        if !self.chunk.is_empty() {
            let b = std::mem::take(&mut self.chunk);
            return Poll::Ready(Recv::Data(b));
        }
        if self.core.ended.load(Ordering::Relaxed) {
            return Poll::Ready(Recv::End);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Inbound::Data(b))) => Poll::Ready(Recv::Data(b)),
            Poll::Ready(Some(Inbound::Fin)) => {
                self.core.ended.store(true, Ordering::Relaxed);
                Poll::Ready(Recv::End)
            }
            Poll::Ready(Some(Inbound::Reset)) | Poll::Ready(None) => {
                self.core.ended.store(true, Ordering::Relaxed);
                Poll::Ready(Recv::Reset)
            }
        }
    }

    /// The next received chunk, whole: no copy and no buffer held while waiting.
    pub async fn recv(&mut self) -> Recv {
        let r = std::future::poll_fn(|cx| self.poll_inbound(cx)).await;
        if let Recv::Data(b) = &r {
            self.consumed(b.len());
        }
        r
    }

    /// What [`LaneReader::recv`] would return now, or `None` if it would wait.
    pub fn try_recv(&mut self) -> Option<Recv> {
        let r = match self.poll_inbound(&mut Context::from_waker(Waker::noop())) {
            Poll::Pending => return None,
            Poll::Ready(r) => r,
        };
        if let Recv::Data(b) = &r {
            self.consumed(b.len());
        }
        Some(r)
    }
}

impl Drop for LaneReader {
    fn drop(&mut self) {
        // Bytes queued and never read go back to the lane's budget.
        let mut unread = self.chunk.len();
        while let Ok(m) = self.rx.try_recv() {
            if let Inbound::Data(b) = m {
                unread += b.len();
            }
        }
        self.core.shared.buffered.add_permits(unread);
    }
}

impl LaneWriter {
    /// Sends a buffer from [`LaneStream::frame_buffer`] holding payload after
    /// the header room, without copying it.
    pub async fn send(&mut self, mut frame: BytesMut) -> io::Result<()> {
        let len = frame.len().saturating_sub(PAYLOAD_OFFSET);
        if len == 0 {
            return Ok(());
        }
        if len > MAX_PAYLOAD || self.core.fin_sent.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad lane send"));
        }
        // A frame is never larger than the window (see `Lane::start`).
        let credit = self.credit.clone();
        std::future::poll_fn(|cx| credit.poll_ready(cx, len as u64)).await?;
        let permit = self
            .core
            .shared
            .ordered
            .reserve()
            .await
            .map_err(|_| reset())?;
        self.credit.take(len as u64);
        let header = Header::new(self.core.id, Kind::Data, len as u32).encode();
        frame[RECORD_HEADER..PAYLOAD_OFFSET].copy_from_slice(&header);
        permit.send(Out::Data(frame));
        Ok(())
    }

    /// Half-closes: the peer reads an end after what was sent.
    pub async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_finish(cx)).await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.core.fin_sent.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        match self.sender.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(reset())),
            Poll::Ready(Ok(())) => {}
        }
        let fin = Header::new(self.core.id, Kind::Fin, 0).encode();
        if self.sender.send_item(Out::Control(fin)).is_err() {
            return Poll::Ready(Err(reset()));
        }
        self.core.fin_sent.store(true, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for LaneReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_inbound(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Recv::End) => Poll::Ready(Ok(())),
            Poll::Ready(Recv::Reset) => Poll::Ready(Err(reset())),
            Poll::Ready(Recv::Data(mut b)) => {
                let n = b.len().min(buf.remaining());
                buf.put_slice(&b.split_to(n));
                this.chunk = b;
                this.consumed(n);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for LaneWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.core.fin_sent.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "lane stream already finished",
            )));
        }
        // Credit first, then a queue slot: a stream waiting for credit must
        // not hold a slot the others need.
        let available = match this.credit.poll_ready(cx, 0) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(n)) => n,
        };
        match this.sender.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(reset())),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.len().min(MAX_PAYLOAD).min(available as usize);
        let mut frame = LaneStream::frame_buffer(n);
        frame[RECORD_HEADER..]
            .copy_from_slice(&Header::new(this.core.id, Kind::Data, n as u32).encode());
        frame.extend_from_slice(&buf[..n]);
        if this.sender.send_item(Out::Data(frame)).is_err() {
            return Poll::Ready(Err(reset()));
        }
        this.credit.take(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The lane's writer flushes whenever its queue runs dry.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_finish(cx)
    }
}

impl AsyncRead for LaneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for LaneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [3; 32];

    fn keys(role: Role) -> LaneKeys {
        LaneKeys::from_secret(&SECRET, role)
    }

    fn pair(cfg: LaneConfig) -> (Arc<Lane>, Arc<Lane>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            Lane::start(a, keys(Role::Dialer), cfg),
            Lane::start(b, keys(Role::Listener), cfg),
        )
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_with_half_close() {
        let (agent, gateway) = pair(LaneConfig::default());
        let mut s = gateway.open().await.unwrap();
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut t = agent.accept().await.unwrap();
        let mut got = Vec::new();
        t.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // the other direction still works after the half-close
        t.write_all(b"done").await.unwrap();
        t.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        drop(t);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((agent.streams(), gateway.streams()), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_stream_resets_the_peer() {
        let (agent, gateway) = pair(LaneConfig::default());
        let s = gateway.open().await.unwrap();
        let mut t = agent.accept().await.unwrap();
        drop(s);
        let mut buf = [0u8; 8];
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_slow_reader_stalls_only_its_own_stream() {
        let cfg = LaneConfig {
            window: 64 * 1024,
            ..LaneConfig::default()
        };
        let (agent, gateway) = pair(cfg);
        let mut slow = gateway.open().await.unwrap();
        let mut fast = gateway.open().await.unwrap();
        let _slow_peer = agent.accept().await.unwrap();
        let mut fast_peer = agent.accept().await.unwrap();
        // the slow stream's window fills, and its writer waits
        let blocked = tokio::time::timeout(Duration::from_millis(300), async {
            slow.write_all(&vec![1u8; 256 * 1024]).await
        })
        .await;
        assert!(blocked.is_err(), "a full window must stop the writer");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            fast_peer.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        fast.write_all(&vec![2u8; 1 << 20]).await.unwrap();
        fast.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), 1 << 20);
    }

    #[tokio::test]
    async fn a_closed_lane_resets_its_streams() {
        let (agent, gateway) = pair(LaneConfig::default());
        let mut s = gateway.open().await.unwrap();
        let _t = agent.accept().await.unwrap();
        agent.close();
        let mut buf = [0u8; 4];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            gateway.open().await.is_err() || gateway.is_closed() || {
                tokio::time::sleep(Duration::from_millis(50)).await;
                gateway.is_closed()
            }
        );
    }

    #[tokio::test]
    async fn the_gateway_takes_no_streams_from_an_agent() {
        let (agent, gateway) = pair(LaneConfig::default());
        let _s = agent.open().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), gateway.closed())
            .await
            .expect("an agent's open ends the lane");
    }

    #[tokio::test]
    async fn the_wire_carries_sealed_records_and_a_tampered_one_ends_the_lane() {
        let (a, mut from_gateway) = tokio::io::duplex(1 << 20);
        let (b, mut to_agent) = tokio::io::duplex(1 << 20);
        let gateway = Lane::start(a, keys(Role::Listener), LaneConfig::default());
        let agent = Lane::start(b, keys(Role::Dialer), LaneConfig::default());
        let text = b"a recognisable plaintext; ".repeat(150);
        let mut s = gateway.open().await.unwrap();
        s.write_all(&text).await.unwrap();
        // Its open (gathered into a record), then its data (a record of its own).
        let expected = (RECORD_HEADER + HEADER_LEN + TAG_LEN) * 2 + text.len();
        let mut wire = vec![0u8; expected];
        from_gateway.read_exact(&mut wire).await.unwrap();
        assert!(!wire.windows(16).any(|w| w == &text[..16]));
        to_agent.write_all(&wire).await.unwrap();
        let mut t = agent.accept().await.unwrap();
        let mut got = vec![0u8; text.len()];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(got, text);

        // One flipped bit in the next record ends the lane.
        s.write_all(b"more").await.unwrap();
        let mut wire = vec![0u8; RECORD_HEADER + HEADER_LEN + 4 + TAG_LEN];
        from_gateway.read_exact(&mut wire).await.unwrap();
        wire[RECORD_HEADER + 2] ^= 1;
        to_agent.write_all(&wire).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), agent.closed())
            .await
            .expect("a tampered record ends the lane");
        let e = t.read(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn garbage_ends_the_lane() {
        let (a, mut b) = tokio::io::duplex(4096);
        let lane = Lane::start(a, keys(Role::Listener), LaneConfig::default());
        b.write_all(&[0xff; 9]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), lane.closed())
            .await
            .unwrap();
    }
}
