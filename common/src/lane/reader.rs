//! The lane's reader: reads records, opens them in place and hands their
//! frames to their streams. It never waits for a stream's consumer: a stream
//! can hold no more than its window, and data past it is a protocol
//! violation, so one stalled consumer costs its own window and nothing else.

use std::{pin::Pin, sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::mpsc,
    time::Instant,
};

use super::{
    flow::LaneFlow,
    frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD},
    mux::{Role, Shared},
    seal::{Opener, RECORD_HEADER},
    socket::RttProbe,
    stream::{Inbound, LaneStream},
    LaneError,
};

/// How often the connection's round-trip time is read.
const RTT_SAMPLE: Duration = Duration::from_millis(200);

/// Reads records and routes their frames until the connection ends. Payloads
/// are split off one large read buffer, so a data frame reaches its stream
/// without a copy.
pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    mut open: Opener,
    shared: &Arc<Shared>,
    accept: mpsc::Sender<LaneStream>,
    mut probe: Option<RttProbe>,
) -> Result<(), LaneError> {
    const READ: usize = 256 * 1024;
    let mut buf = BytesMut::with_capacity(READ);
    // Any record counts as life; the peer pings every `keep_alive`.
    let mut silence = Silence::new(shared.cfg.keep_alive * 3);
    let mut sampled: Option<Instant> = None;
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
        route(record.freeze().slice(plain), shared, &accept)?;
        if let Some(p) = probe.as_mut() {
            if sampled.is_none_or(|at| silence.last.duration_since(at) >= RTT_SAMPLE) {
                sampled = Some(silence.last);
                if let Some(rtt) = p() {
                    shared.rtt.set(rtt);
                }
            }
        }
    }
}

/// Hands the frames of one opened record to their streams.
fn route(
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
                let mut streams = shared.streams();
                let Some(slot) = streams.get_mut(&h.stream) else {
                    // Reset or closed here already; the data is moot.
                    continue;
                };
                if u64::from(h.len) > slot.peer_credit {
                    return Err(LaneError::Protocol("data beyond the stream's credit"));
                }
                slot.peer_credit -= u64::from(h.len);
                let _ = slot.tx.send(Inbound::Data(payload));
            }
            Kind::Open => {
                // Only the opener opens streams (even ids from the listener,
                // odd from the dialer); the other side serves them.
                if shared.role == shared.cfg.opener {
                    return Err(LaneError::Protocol(
                        "this side of the lane takes no streams",
                    ));
                }
                let odd = shared.cfg.opener == Role::Dialer;
                if (h.stream % 2 == 1) != odd || shared.streams().contains_key(&h.stream) {
                    return Err(LaneError::Protocol("open with a wrong or used stream id"));
                }
                if shared.streams().len() >= shared.cfg.max_streams {
                    if !shared.refuse(h.stream) {
                        return Err(LaneError::Protocol(
                            "opens past the stream limit faster than they can be refused",
                        ));
                    }
                    continue;
                }
                let flow = shared.cfg.flow;
                let send = match flow {
                    LaneFlow::Tuned => h.len,
                    LaneFlow::Fixed => flow.accept_window(),
                };
                // The opener counts on this window: it is given even past the budget.
                let window = flow.accept_window();
                let recv = shared.budget.take(window, window);
                let stream = shared.slot(h.stream, send, recv);
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
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Silence {
    fn new(limit: Duration) -> Self {
        let now = Instant::now();
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
            if due <= Instant::now() {
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
            // Bytes that are there count before the timer: a reader that was
            // busy when the limit passed has not heard silence.
            biased;
            r = r.read_buf(buf) => r,
            () = silence.expired() => return Err(LaneError::Silent),
        };
        match read {
            Ok(0) if buf.is_empty() => return Err(LaneError::Ended),
            Ok(0) => return Err(LaneError::Protocol("connection ended inside a frame")),
            Ok(_) => silence.last = Instant::now(),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
