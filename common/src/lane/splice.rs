//! The lane's data path: a public or target TCP connection spliced with one
//! lane stream. EOF becomes the stream's end and the stream's end a TCP
//! half-close; a reset on either side resets the other. No buffer is held
//! while the connection is idle: one is taken when the socket is readable.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bytes::BufMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    gather::{write_all_vectored, MAX_BATCH},
    LaneReader, LaneStream, Recv, MAX_PAYLOAD, PAYLOAD_OFFSET,
};
use crate::{idle::Activity, meter::Tally, splice::Moved};

const MIN_READ: usize = 4096;

/// Splices until both directions ended. `Err` means a reset, a broken lane or
/// `idle` without a byte moving (never when zero): the caller resets `tcp`.
/// On `Ok` the caller drops `tcp` at once: when its reading side ended first,
/// that close is what sends the FIN.
/// `first` sees the bytes read from `tcp` until it returns `Ok(true)` (done
/// watching), and may refuse them with an error.
/// `answer` reads what precedes the data from the lane (the agent's status
/// byte, at the gateway) while bytes already flow the other way: a client's
/// first bytes travel with the stream's open instead of a round trip later.
pub async fn splice(
    stream: LaneStream,
    tcp: &mut TcpStream,
    from_lane: Tally<'_>,
    to_lane: Tally<'_>,
    idle: Duration,
    first: impl FnMut(&[u8]) -> io::Result<bool>,
    answer: impl AsyncFnOnce(&mut LaneReader) -> io::Result<()>,
) -> io::Result<Moved> {
    let mut first = Some(first);
    let (mut lr, mut lw) = stream.split();
    let (tr, mut tw) = tcp.split();
    let activity = Activity::new();
    // Once `tcp`'s reading side has ended too, closing it sends the FIN
    // and a separate shutdown is a system call for nothing.
    let tcp_read_ended = AtomicBool::new(false);
    let up = async {
        let mut total = 0u64;
        // Sized to what the last read brought: a request-response connection
        // allocates a few KiB per read, a bulk transfer grows to full frames.
        let mut size = MIN_READ;
        loop {
            // Read only what the peer lets us send: bytes it cannot take
            // stay in the socket, where TCP pushes back on the client.
            let credit = lw.credit().await?;
            tr.readable().await?;
            let want = size.min(usize::try_from(credit).unwrap_or(usize::MAX));
            let mut buf = LaneStream::frame_buffer(want);
            // Limited: the buffer's spare room past `want` is the tag's.
            match tr.try_read_buf(&mut (&mut buf).limit(want)) {
                Ok(0) => {
                    lw.finish().await?;
                    tcp_read_ended.store(true, Ordering::Relaxed);
                    return Ok::<_, io::Error>(total);
                }
                Ok(n) => {
                    if let Some(check) = &mut first {
                        if check(&buf[PAYLOAD_OFFSET..])? {
                            first = None;
                        }
                    }
                    // A read cut short by credit says nothing of the traffic.
                    size = if n == size {
                        (size * 4).min(MAX_PAYLOAD)
                    } else if n < want {
                        size.min((n * 2).max(MIN_READ))
                    } else {
                        size
                    };
                    activity.touch();
                    // A cap holds the bytes here, and TCP pushes back on the client.
                    to_lane.pass(n).await;
                    // Bytes held by a cap are not an idle connection.
                    activity.touch();
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
                    if !tcp_read_ended.load(Ordering::Relaxed) {
                        tw.shutdown().await?;
                    }
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
            let len = first.len() + more.iter().map(|b| b.len()).sum::<usize>();
            // A cap holds the bytes here; the lane's window then stops the agent.
            from_lane.pass(len).await;
            let n = if more.is_empty() {
                // Not kept across the write: an idle task stays small.
                drop(more);
                tw.write_all(&first).await?;
                first.len() as u64
            } else {
                more.insert(0, first);
                // Boxed: its state would otherwise enlarge every
                // connection's task, idle ones included.
                Box::pin(write_all_vectored(&mut tw, &mut more)).await?
            };
            activity.touch();
            total += n;
            match last {
                None => {}
                Some(Last::End) => {
                    if !tcp_read_ended.load(Ordering::Relaxed) {
                        tw.shutdown().await?;
                    }
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

/// How a stream's received data ended, seen while gathering a batch.
enum Last {
    End,
    Reset,
}
