//! One relayed circuit's bytes: copy both ways between the source's hop stream
//! and the destination's stop stream, count them per direction as they pass,
//! and end the circuit on its Limit (duration or bytes per direction), after
//! `circuit_idle_timeout` without a byte, or on the first error. Half-close
//! crosses: an end of stream on one side closes the other's write half. A
//! direction whose reader stopped is put on the [`StallLedger`] and ends after
//! `circuit_stall_timeout`, or sooner when its peer has too many stalled.

use std::{io, num::NonZeroU32, sync::Arc, time::Duration};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use relaygate_common::idle::Activity;

use crate::stall::{StallLedger, StallWriter};

const BUF: usize = 16 * 1024;

/// What bounds one circuit.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The Limit's duration, if any.
    pub deadline: Option<Duration>,
    /// The Limit's bytes per direction, if any.
    pub data: Option<u64>,
    pub idle: Duration,
    /// Bytes per second per direction; 0 is uncapped.
    pub rate: u64,
    /// A write that waits this long ends the circuit; zero never.
    pub stall: Duration,
}

/// The two ends, for the stall ledger: a direction that cannot write holds
/// bytes of the peer it reads from.
pub struct Ends {
    pub src: PeerId,
    pub dst: PeerId,
    pub ledger: Arc<StallLedger>,
}

/// One direction's bounds, counter and stall report.
struct Direction<'a> {
    chunk: usize,
    counter: &'a Counter,
    data_limit: Option<u64>,
    rate: Option<DefaultDirectRateLimiter>,
    activity: &'a Activity,
}

/// Why a circuit ended (the `reason` label of `relay_circuits_closed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    Idle,
    LimitDuration,
    LimitData,
    Reset,
    /// The far side stopped reading (`circuit_stall_timeout`, or its peer
    /// had too many circuits stalled).
    Stalled,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::LimitDuration => "limit_duration",
            End::LimitData => "limit_data",
            End::Reset => "reset",
            End::Stalled => "stalled",
        }
    }
}

/// Relays until both directions end or a bound is hit.
pub async fn relay<A, B>(
    src: A,
    dst: B,
    bounds: Bounds,
    src_to_dst: Counter,
    dst_to_src: Counter,
    ends: Ends,
) -> End
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (sr, sw) = src.split();
    let (dr, dw) = dst.split();
    let activity = Activity::new();
    let limiter = |rate: u64| {
        let per_sec = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX))?;
        Some(RateLimiter::direct(Quota::per_second(per_sec)))
    };
    // A rate below the buffer size reads smaller chunks, so every chunk fits the bucket.
    let chunk = match bounds.rate {
        0 => BUF,
        r => BUF.min(usize::try_from(r).unwrap_or(BUF)),
    };
    let direction = |counter| Direction {
        chunk,
        counter,
        data_limit: bounds.data,
        rate: limiter(bounds.rate),
        activity: &activity,
    };
    let (up, down) = (direction(&src_to_dst), direction(&dst_to_src));
    // A writer holds the bytes of the peer its direction reads from.
    let (dw, sw) = (
        StallWriter::new(dw, ends.ledger.clone(), ends.src, bounds.stall),
        StallWriter::new(sw, ends.ledger.clone(), ends.dst, bounds.stall),
    );
    let both = async { futures::try_join!(pump(sr, dw, &up), pump(dr, sw, &down)) };
    let deadline = async {
        match bounds.deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => End::LimitData,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => End::Stalled,
            Err(_) => End::Reset,
        },
        _ = deadline => End::LimitDuration,
        _ = activity.idle(bounds.idle) => End::Idle,
    }
}

/// Copies one direction; EOF closes the other side's write half.
async fn pump<R, W>(mut r: R, mut w: W, d: &Direction<'_>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; d.chunk];
    let mut moved: u64 = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.close().await?;
            return Ok(());
        }
        moved += n as u64;
        if d.data_limit.is_some_and(|max| moved > max) {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "circuit data limit",
            ));
        }
        if let Some(l) = &d.rate {
            let n32 = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX));
            if let Some(n32) = n32 {
                // Never fails: the chunk is no larger than the bucket.
                let _ = l.until_n_ready(n32).await;
            }
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        d.counter.inc_by(n as u64);
        d.activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    fn bounds() -> Bounds {
        Bounds {
            deadline: None,
            data: None,
            idle: Duration::from_secs(5),
            rate: 0,
            stall: Duration::from_secs(30),
        }
    }

    fn ends() -> Ends {
        Ends {
            src: PeerId::random(),
            dst: PeerId::random(),
            ledger: StallLedger::new(1),
        }
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (a_far, a_near) = tokio::io::duplex(64 * 1024);
        let (b_near, b_far) = tokio::io::duplex(64 * 1024);
        let (c1, c2) = (Counter::default(), Counter::default());
        let task = tokio::spawn(relay(
            a_near.compat(),
            b_near.compat(),
            bounds(),
            c1.clone(),
            c2.clone(),
            ends(),
        ));
        let (mut a, mut b) = (a_far.compat(), b_far.compat());
        a.write_all(b"hello").await.unwrap();
        a.close().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        b.write_all(b"back").await.unwrap();
        b.close().await.unwrap();
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        assert_eq!(task.await.unwrap(), End::Closed);
        assert_eq!((c1.get(), c2.get()), (5, 4));
    }

    #[tokio::test]
    async fn data_limit_and_idle_end_the_circuit() {
        let (a_far, a_near) = tokio::io::duplex(64 * 1024);
        let (b_near, _b_far) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(relay(
            a_near.compat(),
            b_near.compat(),
            Bounds {
                data: Some(10),
                ..bounds()
            },
            Counter::default(),
            Counter::default(),
            ends(),
        ));
        let mut a = a_far.compat();
        a.write_all(&[0u8; 11]).await.unwrap();
        assert_eq!(task.await.unwrap(), End::LimitData);

        let (_x, x_near) = tokio::io::duplex(1024);
        let (y_near, _y) = tokio::io::duplex(1024);
        let idle = relay(
            x_near.compat(),
            y_near.compat(),
            Bounds {
                idle: Duration::from_millis(50),
                ..bounds()
            },
            Counter::default(),
            Counter::default(),
            ends(),
        )
        .await;
        assert_eq!(idle, End::Idle);
    }

    #[tokio::test]
    async fn rate_cap_paces_each_direction() {
        let (a_far, a_near) = tokio::io::duplex(256 * 1024);
        let (b_near, b_far) = tokio::io::duplex(256 * 1024);
        let started = Instant::now();
        let task = tokio::spawn(relay(
            a_near.compat(),
            b_near.compat(),
            Bounds {
                rate: 64 * 1024,
                ..bounds()
            },
            Counter::default(),
            Counter::default(),
            ends(),
        ));
        let (mut a, mut b) = (a_far.compat(), b_far.compat());
        // One second's bucket passes at once; the second 64 KiB waits for it to refill.
        a.write_all(&vec![7u8; 128 * 1024]).await.unwrap();
        a.close().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 128 * 1024);
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "128 KiB at 64 KiB/s took {:?}",
            started.elapsed()
        );
        b.close().await.unwrap();
        assert_eq!(task.await.unwrap(), End::Closed);
    }

    #[tokio::test]
    async fn a_reader_that_stops_ends_its_circuit() {
        let (a_far, a_near) = tokio::io::duplex(64 * 1024);
        let (b_near, _b_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(
            a_near.compat(),
            b_near.compat(),
            Bounds {
                stall: Duration::from_millis(1500),
                ..bounds()
            },
            Counter::default(),
            Counter::default(),
            ends(),
        ));
        let mut a = a_far.compat();
        a.write_all(&[1u8; 32 * 1024]).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert_eq!(end.unwrap().unwrap(), End::Stalled);
    }

    #[tokio::test]
    async fn a_stall_past_the_peers_share_ends_the_oldest_at_once() {
        let ledger = StallLedger::new(1);
        let src = PeerId::random();
        let mut circuits = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..2 {
            let (a_far, a_near) = tokio::io::duplex(64 * 1024);
            let (b_near, b_far) = tokio::io::duplex(1024);
            let started = Instant::now();
            circuits.push((
                started,
                tokio::spawn(relay(
                    a_near.compat(),
                    b_near.compat(),
                    bounds(),
                    Counter::default(),
                    Counter::default(),
                    Ends {
                        src,
                        dst: PeerId::random(),
                        ledger: ledger.clone(),
                    },
                )),
            ));
            let mut a = a_far.compat();
            a.write_all(&[1u8; 32 * 1024]).await.unwrap();
            keep.push((a, b_far));
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let (started, first) = circuits.remove(0);
        let end = tokio::time::timeout(Duration::from_secs(5), first).await;
        assert_eq!(end.unwrap().unwrap(), End::Stalled);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "well before the 30 s timeout"
        );
        assert_eq!(ledger.stalled_on(&src), 1, "the second stays, stalled");
        assert!(!circuits[0].1.is_finished());
    }
}
