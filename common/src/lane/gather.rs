//! Gathered writes: many buffers, one system call, in order.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Frames written together at most.
pub(super) const MAX_BATCH: usize = 16;

/// Writes every byte of `bufs`, gathered, and returns how many; `bufs` is
/// left empty (its room kept for the next batch).
pub(super) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut Vec<Bytes>,
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
    bufs.clear();
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
        let n = write_all_vectored(&mut w, &mut frames.clone())
            .await
            .unwrap();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(n as usize, want.len());
        assert_eq!(w.0, want);
    }
}
