//! The data path's inner loop: copy bytes both ways between two connections,
//! propagate half-close (EOF becomes shutdown of the other side's write half),
//! and stop both directions on the first error so the caller can reset.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-direction buffer. Large enough for loopback throughput, small enough
/// that thousands of active connections stay cheap.
const BUF: usize = 16 * 1024;

/// Bytes moved in each direction by a finished splice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies `a` <-> `b` until both directions reached EOF, or one failed.
/// On error the caller should reset the connections it owns.
pub async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let (x, y) = tokio::try_join!(pump(ar, bw, a_to_b), pump(br, aw, b_to_a))?;
    Ok(Moved {
        a_to_b: x,
        b_to_a: y,
    })
}

/// Copies `r` into `w` until EOF, then shuts `w` down (half-close).
pub async fn pump<R, W>(mut r: R, mut w: W, counter: &Counter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        counter.inc_by(n as u64);
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn half_close_travels_both_ways() {
        // client <-> [a | splice | b] <-> server, all real sockets
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
        let up = Counter::default();
        let down = Counter::default();
        let (u2, d2) = (up.clone(), down.clone());
        let mid = tokio::spawn(async move {
            let (mut a, _) = l1.accept().await.unwrap();
            let mut b = TcpStream::connect(a2).await.unwrap();
            splice(&mut a, &mut b, &u2, &d2).await.unwrap()
        });
        let mut client = TcpStream::connect(a1).await.unwrap();
        let (mut server, _) = l2.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // the server may still answer after the client's half-close
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong");
        let moved = mid.await.unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 4,
                b_to_a: 4
            }
        );
        assert_eq!((up.get(), down.get()), (4, 4));
    }
}
