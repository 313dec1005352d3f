//! One stream of a lane, as its user sees it: a reader that returns credit
//! as it consumes (growing its window, see `flow`), a writer that sends
//! within the peer's credit, and a drop that resets what did not finish.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::PollSender;

use super::{
    flow::{frame_len, RecvWindow, SendCredit},
    frame::{Header, Kind, MAX_PAYLOAD},
    mux::{Out, Shared},
    seal::{PAYLOAD_OFFSET, RECORD_HEADER, TAG_LEN},
};

/// What the reader hands a stream's consumer, in the order it arrived.
pub(super) enum Inbound {
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
    /// The receive window, given back to the budget when the stream goes.
    window: std::sync::atomic::AtomicU32,
}

impl Drop for Core {
    fn drop(&mut self) {
        let slot = self.shared.streams().remove(&self.id);
        let clean = self.fin_sent.load(Ordering::Relaxed) && self.ended.load(Ordering::Relaxed);
        if slot.is_some() && !clean {
            self.shared.reset(self.id);
        }
        self.shared.budget.give(self.window.load(Ordering::Relaxed));
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
    rx: tokio::sync::mpsc::UnboundedReceiver<Inbound>,
    /// The rest of a data frame a reader did not take whole.
    chunk: Bytes,
    window: RecvWindow,
}

/// The sending half of a [`LaneStream`].
pub struct LaneWriter {
    core: Arc<Core>,
    credit: Arc<SendCredit>,
    sender: PollSender<Out>,
}

impl LaneStream {
    pub(super) fn new(
        id: u32,
        shared: Arc<Shared>,
        rx: tokio::sync::mpsc::UnboundedReceiver<Inbound>,
        credit: Arc<SendCredit>,
        window: u32,
    ) -> Self {
        let sender = PollSender::new(shared.ordered.clone());
        let max = shared.cfg.max_window;
        let core = Arc::new(Core {
            id,
            shared,
            fin_sent: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            window: window.into(),
        });
        Self {
            reader: LaneReader {
                core: core.clone(),
                rx,
                chunk: Bytes::new(),
                window: RecvWindow::new(window, max),
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

    /// The receive window this stream has now.
    pub fn window(&self) -> u32 {
        self.reader.window.size()
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
    /// Hands `n` consumed bytes back to the peer as credit, in batches, with
    /// what the window grew by.
    fn consumed(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let shared = &self.core.shared;
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let Some(credit) = self.window.consumed(n, shared.rtt.get(), &shared.budget) else {
            return;
        };
        self.core
            .window
            .store(self.window.size(), Ordering::Relaxed);
        if let Some(slot) = shared.streams().get_mut(&self.core.id) {
            slot.peer_credit += u64::from(credit);
        }
        shared.credit(self.core.id, credit);
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

impl LaneWriter {
    /// Waits until the peer lets this stream send, and returns how many
    /// bytes it may: at least one. A caller that reads its source only then,
    /// and at most that much, never holds a frame it cannot send.
    pub async fn credit(&self) -> io::Result<u64> {
        let credit = self.credit.clone();
        std::future::poll_fn(|cx| credit.poll_ready(cx, 0)).await
    }

    /// Sends a buffer from [`LaneStream::frame_buffer`] holding payload after
    /// the header room, without copying it; waits for credit for all of it.
    pub async fn send(&mut self, mut frame: BytesMut) -> io::Result<()> {
        let len = frame.len().saturating_sub(PAYLOAD_OFFSET);
        if len == 0 {
            return Ok(());
        }
        if len > MAX_PAYLOAD || self.core.fin_sent.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad lane send"));
        }
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
        let n = frame_len(buf.len(), available);
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
