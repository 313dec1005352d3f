//! The lane's data path: a public or target TCP connection spliced with one
//! lane stream. EOF becomes the stream's end and the stream's end a TCP
//! half-close; a reset on either side resets the other. No buffer is held
//! while the connection is idle: one is taken when the socket is readable.

use std::{
    io::{self, IoSlice},
    time::Duration,
};

use bytes::{Buf, Bytes};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{LaneReader, LaneStream, Recv, HEADER_LEN, MAX_PAYLOAD};
use crate::{idle::Activity, splice::Moved};

const MIN_READ: usize = 4096;

/// Splices until both directions ended. `Err` means a reset, a broken lane or
/// `idle` without a byte moving (never when zero): the caller resets `tcp`.
/// `first` sees the first bytes read from `tcp` and may refuse them.
/// `answer` reads what precedes the data from the lane (the agent's status
/// byte, at the gateway) while bytes already flow the other way: a client's
/// first bytes travel with the stream's open instead of a round trip later.
pub async fn splice(
    stream: LaneStream,
    tcp: &mut TcpStream,
    from_lane: &Counter,
    to_lane: &Counter,
    idle: Duration,
    first: impl FnOnce(&[u8]) -> io::Result<()>,
    answer: impl AsyncFnOnce(&mut LaneReader) -> io::Result<()>,
) -> io::Result<Moved> {
    let mut first = Some(first);
    let (mut lr, mut lw) = stream.split();
    let (tr, mut tw) = tcp.split();
    let activity = Activity::new();
    let up = async {
        let mut total = 0u64;
        // Sized to what the last read brought: a request-response connection
        // allocates a few KiB per read, a bulk transfer grows to full frames.
        let mut size = MIN_READ;
        loop {
            tr.readable().await?;
            let mut buf = LaneStream::frame_buffer(size);
            match tr.try_read_buf(&mut buf) {
                Ok(0) => {
                    lw.finish().await?;
                    return Ok::<_, io::Error>(total);
                }
                Ok(n) => {
                    if let Some(check) = first.take() {
                        check(&buf[HEADER_LEN..])?;
                    }
                    size = if n == size {
                        (size * 4).min(MAX_PAYLOAD)
                    } else {
                        size.min((n * 2).max(MIN_READ))
                    };
                    activity.touch();
                    to_lane.inc_by(n as u64);
                    total += n as u64;
                    lw.send(buf).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    let down = async {
        // Boxed: it runs once, and its timer would otherwise size every
        // connection's task for its whole life.
        Box::pin(answer(&mut lr)).await?;
        let mut total = 0u64;
        loop {
            let first = match lr.recv().await {
                Recv::Data(b) => b,
                Recv::End => {
                    tw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                Recv::Reset => return Err(reset_by_peer()),
            };
            // Frames that arrived together leave in one write: fewer system
            // calls here and fewer wake-ups for the reader of `tcp`.
            let mut more = Vec::new();
            let mut last = None;
            while last.is_none() && more.len() < MAX_BATCH - 1 {
                match lr.try_recv() {
                    Some(Recv::Data(b)) => more.push(b),
                    Some(Recv::End) => last = Some(Last::End),
                    Some(Recv::Reset) => last = Some(Last::Reset),
                    None => break,
                }
            }
            let n = if more.is_empty() {
                // Not kept across the write: an idle task stays small.
                drop(more);
                tw.write_all(&first).await?;
                first.len() as u64
            } else {
                more.insert(0, first);
                // Boxed: its state would otherwise enlarge every
                // connection's task, idle ones included.
                Box::pin(write_all_vectored(&mut tw, more)).await?
            };
            activity.touch();
            from_lane.inc_by(n);
            total += n;
            match last {
                None => {}
                Some(Last::End) => {
                    tw.shutdown().await?;
                    return Ok(total);
                }
                Some(Last::Reset) => return Err(reset_by_peer()),
            }
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(down, up) } => r.map(|(a_to_b, b_to_a)| Moved { a_to_b, b_to_a }),
        () = activity.idle(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
    }
}

fn reset_by_peer() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "reset by the other end of the tunnel",
    )
}

/// Frames written together at most.
const MAX_BATCH: usize = 16;

/// How a stream's received data ended, seen while gathering a batch.
enum Last {
    End,
    Reset,
}

/// Writes every byte of `bufs`, gathered, and returns how many.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: Vec<Bytes>,
) -> io::Result<u64> {
    let total: usize = bufs.iter().map(Bytes::len).sum();
    let mut done = 0;
    while done < bufs.len() {
        let mut n = {
            let mut slices = [IoSlice::new(&[]); MAX_BATCH];
            for (s, b) in slices.iter_mut().zip(&bufs[done..]) {
                *s = IoSlice::new(b);
            }
            let k = (bufs.len() - done).min(MAX_BATCH);
            w.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let b = &mut bufs[done];
            if n >= b.len() {
                n -= b.len();
                done += 1;
            } else {
                b.advance(n);
                n = 0;
            }
        }
    }
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use super::*;

    /// Takes at most 7 bytes per write, as a full socket buffer might.
    #[derive(Default)]
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = 7;
            for b in bufs {
                let n = b.len().min(left);
                self.0.extend_from_slice(&b[..n]);
                left -= n;
            }
            Poll::Ready(Ok(7 - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_survives_short_writes_in_order() {
        let frames: Vec<Bytes> = (0..20u8)
            .map(|i| Bytes::from(vec![i; 3 + i as usize]))
            .collect();
        let mut w = Trickle::default();
        let n = write_all_vectored(&mut w, frames.clone()).await.unwrap();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(n as usize, want.len());
        assert_eq!(w.0, want);
    }
}
