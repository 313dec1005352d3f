//! The lane's data path: a public or target TCP connection spliced with one
//! lane stream. EOF becomes the stream's end and the stream's end a TCP
//! half-close; a reset on either side resets the other. No buffer is held
//! while the connection is idle: one is taken when the socket is readable.

use std::{io, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::AsyncWriteExt, net::TcpStream};

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
        answer(&mut lr).await?;
        let mut total = 0u64;
        loop {
            match lr.recv().await {
                Recv::Data(b) => {
                    tw.write_all(&b).await?;
                    activity.touch();
                    from_lane.inc_by(b.len() as u64);
                    total += b.len() as u64;
                }
                Recv::End => {
                    tw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                Recv::Reset => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "reset by the other end of the tunnel",
                    ))
                }
            }
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(down, up) } => r.map(|(a_to_b, b_to_a)| Moved { a_to_b, b_to_a }),
        () = activity.idle(idle) => Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
    }
}
