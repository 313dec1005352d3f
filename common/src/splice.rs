//! The data path's inner loop: copy bytes both ways between two connections,
//! propagate half-close (EOF becomes shutdown of the other side's write half),
//! and stop both directions on the first error so the caller can reset.
//!
//! On a tunnel stream the bytes travel in frames, `u8 kind | u16 length (BE) |
//! payload`, kind `DATA`, `END` (the sender's side half-closed) or `RESET`
//! (its connection was reset). libp2p's muxers report a reset stream as a plain
//! end of stream, so without frames a reset would arrive as a graceful close.

use std::io;

use prometheus_client::metrics::counter::Counter;

use crate::meter::Tally;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-direction buffer. Large enough for loopback throughput, small enough
/// that thousands of active connections stay cheap.
const BUF: usize = 16 * 1024;

/// Per-direction buffer of a raw copy (`raw_counted`): a lane frame's worth.
const RAW_BUF: usize = 64 * 1024;

/// Largest payload of one frame.
pub const MAX_FRAME: usize = BUF;
/// How long to wait for the stream's own end after an `END` frame.
const END_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
const DATA: u8 = 0;
const END: u8 = 1;
const RESET: u8 = 2;

/// Bytes moved in each direction by a finished splice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Splices a raw connection with a framed tunnel stream, both ways.
/// `Err` means a reset or a broken stream: the caller resets its raw socket.
pub async fn splice_framed<S, R>(
    stream: &mut S,
    raw: &mut R,
    from_stream: &Counter,
    to_stream: &Counter,
) -> io::Result<Moved>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    let (sr, sw) = tokio::io::split(stream);
    let (rr, rw) = tokio::io::split(raw);
    let (x, y) = tokio::try_join!(
        frames_to_raw(sr, rw, Tally::new(from_stream)),
        raw_to_frames(rr, sw, Tally::new(to_stream))
    )?;
    Ok(Moved {
        a_to_b: x,
        b_to_a: y,
    })
}

/// [`splice_framed`] that gives up with `TimedOut` once nothing has moved
/// for `idle` (never when zero).
pub async fn splice_framed_idle<S, R>(
    stream: &mut S,
    raw: &mut R,
    from_stream: &Counter,
    to_stream: &Counter,
    idle: std::time::Duration,
) -> io::Result<Moved>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    let activity = crate::idle::Activity::new();
    let mut raw = crate::idle::Watched::new(raw, activity.clone());
    tokio::select! {
        r = splice_framed(stream, &mut raw, from_stream, to_stream) => r,
        () = activity.idle(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
    }
}

/// Reads a raw connection and writes it as frames. EOF sends `END`, a read
/// error sends `RESET`; both then close the stream's write half.
pub async fn raw_to_frames<R, W>(mut r: R, mut w: W, tally: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 3 + BUF];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf[3..]).await {
            Ok(0) => {
                w.write_all(&[END, 0, 0]).await?;
                w.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => {
                buf[0] = DATA;
                buf[1..3].copy_from_slice(&(n as u16).to_be_bytes());
                tally.pass(n).await;
                w.write_all(&buf[..3 + n]).await?;
                w.flush().await?;
                total += n as u64;
            }
            Err(e) => {
                let _ = w.write_all(&[RESET, 0, 0]).await;
                let _ = w.shutdown().await;
                return Err(e);
            }
        }
    }
}

/// Copies a raw connection to another in chunks of up to `RAW_BUF`,
/// counting the bytes; EOF shuts the writer down. For a stream that carries
/// its own end and reset (a lane stream), where frames would be overhead.
pub async fn raw_counted<R, W>(mut r: R, mut w: W, tally: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RAW_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        tally.pass(n).await;
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        total += n as u64;
    }
}

/// Writes `bytes` as data frames (bytes read before the splice started).
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    for chunk in bytes.chunks(MAX_FRAME) {
        w.write_all(&[DATA]).await?;
        w.write_all(&(chunk.len() as u16).to_be_bytes()).await?;
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// Reads frames and writes their payload to a raw connection. `END` shuts the
/// raw write half down; `RESET`, a malformed frame, or a stream that ends
/// without `END` is an error, so the caller resets the raw connection.
pub async fn frames_to_raw<R, W>(mut r: R, mut w: W, tally: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let mut head = [0u8; 3];
        if let Err(e) = r.read_exact(&mut head).await {
            let aborted = e.kind() == io::ErrorKind::UnexpectedEof;
            return Err(if aborted {
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "tunnel stream ended without an end frame",
                )
            } else {
                e
            });
        }
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        match head[0] {
            DATA if len <= MAX_FRAME => {
                r.read_exact(&mut buf[..len]).await?;
                tally.pass(len).await;
                w.write_all(&buf[..len]).await?;
                w.flush().await?;
                total += len as u64;
            }
            END => {
                w.shutdown().await?;
                // The sender closes its half right after END: read that close,
                // so the muxer sees the stream consumed and frees it at once
                // (quinn otherwise keeps a stopped stream's receive state).
                let _ = tokio::time::timeout(END_GRACE, r.read(&mut buf[..1])).await;
                return Ok(total);
            }
            RESET => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "reset by the other end of the tunnel",
                ))
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed tunnel frame",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn half_close_travels_both_ways_through_two_framed_splices() {
        // client <-> tcp <-> [splice_framed | stream | splice_framed] <-> tcp <-> server
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
        let (mut s1, mut s2) = tokio::io::duplex(64 * 1024);
        let (c1, c2, c3, c4) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        let (k1, k2) = (c1.clone(), c2.clone());
        let near = tokio::spawn(async move {
            let (mut a, _) = l1.accept().await.unwrap();
            splice_framed(&mut s1, &mut a, &k1, &k2).await.unwrap()
        });
        let far = tokio::spawn(async move {
            let mut b = TcpStream::connect(a2).await.unwrap();
            splice_framed(&mut s2, &mut b, &c3, &c4).await.unwrap()
        });
        let mut client = TcpStream::connect(a1).await.unwrap();
        let (mut server, _) = l2.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // the server may still answer after the client's half-close
        server.write_all(b"pong!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong!");
        assert_eq!(
            near.await.unwrap(),
            Moved {
                a_to_b: 5,
                b_to_a: 4
            }
        );
        assert_eq!(
            far.await.unwrap(),
            Moved {
                a_to_b: 4,
                b_to_a: 5
            }
        );
        assert_eq!((c1.get(), c2.get()), (5, 4));
    }

    #[tokio::test]
    async fn frames_carry_data_end_and_reset() {
        let c = Counter::default();
        let mut framed = Vec::new();
        write_frames(&mut framed, b"pre").await.unwrap();
        raw_to_frames(&b"hello world"[..], &mut framed, Tally::new(&c))
            .await
            .unwrap();
        let mut out = Vec::new();
        let n = frames_to_raw(&framed[..], &mut out, Tally::new(&c))
            .await
            .unwrap();
        assert_eq!((n, out.as_slice()), (14, &b"prehello world"[..]));
        // a stream that just stops is a reset, not a clean end
        let cut = &framed[..framed.len() - 3];
        assert!(frames_to_raw(cut, &mut Vec::new(), Tally::new(&c))
            .await
            .is_err());
        let e = frames_to_raw(&[RESET, 0, 0][..], &mut Vec::new(), Tally::new(&c))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e = frames_to_raw(&[DATA, 0xff, 0xff][..], &mut Vec::new(), Tally::new(&c))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "oversized frame");
        let e = frames_to_raw(&[9, 0, 0][..], &mut Vec::new(), Tally::new(&c))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "unknown kind");
    }
}
