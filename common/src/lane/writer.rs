//! The lane's writer: seals queued frames into records and writes them,
//! batching whatever is ready into one system call.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::{
    frame::{Header, Kind, HEADER_LEN},
    gather::write_all_vectored,
    mux::Out,
    seal::{Sealer, PAYLOAD_OFFSET, RECORD_HEADER, TAG_LEN},
    LaneError,
};

/// How long a closing lane may take to send what was queued before it.
const DRAIN: Duration = Duration::from_secs(2);

/// Writes queued frames, batching whatever is ready into one flush.
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
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
    // What was queued before the close still goes out (a connection that
    // just finished must not turn into a reset), unless the peer stopped
    // reading.
    let drain = async {
        while let Ok(h) = urgent.try_recv() {
            w.put(Out::Control(h))?;
        }
        ordered.close();
        while let Some(o) = ordered.recv().await {
            w.put(o)?;
            if w.size() >= BATCH {
                w.flush().await?;
            }
        }
        w.flush().await
    };
    let _ = tokio::time::timeout(DRAIN, drain).await;
    let _ = w.io.shutdown().await;
    Ok(())
}

/// Seals frames into records and writes them gathered. A large data frame
/// is sealed in place in its own buffer, as its own record; small frames
/// (opens, statuses, credits, fins, short messages) are gathered into one
/// record, so a batch of them costs one seal and one system call.
pub(super) struct Batcher<W> {
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

    pub(super) fn new(io: W, seal: Sealer) -> Self {
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
