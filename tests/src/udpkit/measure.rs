//! Measurements against a UDP echo service, for the benchmark: ping-pong
//! latency, and the rate at which a paced (or unpaced) stream of datagrams
//! comes back.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde_json::{json, Value};
use tokio::time::{sleep, timeout, timeout_at};

use super::{any_addr, bind_udp, percentile};

/// How long [`rtt`] waits for each echo before counting it lost.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`throughput`] keeps counting echoes after its last send.
const DRAIN: Duration = Duration::from_millis(500);

/// What [`rtt`] measured, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct RttReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl RttReport {
    pub fn to_json(&self) -> Value {
        json!({
            "sent": self.sent, "received": self.received, "lost": self.lost,
            "min_us": self.min_us, "p50_us": self.p50_us, "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }
}

/// What [`throughput`] measured.
#[derive(Clone, Debug, Default)]
pub struct ThroughputReport {
    pub payload: usize,
    /// Seconds from the first send to the last echo (or the last send).
    pub secs: f64,
    pub sent: u64,
    /// Sends the kernel refused (a full buffer, ICMP unreachable).
    pub send_errors: u64,
    pub echoed: u64,
    pub echoed_bytes: u64,
    /// Echoed payload bytes per second, in MB (10^6 bytes).
    pub mb_per_s: f64,
    /// Datagrams sent and not echoed, in percent of those sent.
    pub loss_pct: f64,
}

impl ThroughputReport {
    pub fn to_json(&self) -> Value {
        json!({
            "payload": self.payload, "secs": self.secs, "sent": self.sent,
            "send_errors": self.send_errors, "echoed": self.echoed,
            "echoed_bytes": self.echoed_bytes, "mb_per_s": self.mb_per_s,
            "loss_pct": self.loss_pct,
        })
    }
}

/// Ping-pong: sends `count` datagrams of `payload` bytes (at least 8, a
/// sequence number first) one after another to the echo service at
/// `target`, each after the previous one's echo or a 1 s timeout (lost).
pub async fn rtt(target: SocketAddr, count: usize, payload: usize) -> io::Result<RttReport> {
    let sock = bind_udp(any_addr(target))?;
    sock.connect(target).await?;
    let mut ping = vec![0u8; payload.max(8)];
    rand::rng().fill(&mut ping[8..]);
    let mut buf = vec![0u8; 65_536];
    let mut samples = Vec::with_capacity(count);
    let mut report = RttReport::default();
    for seq in 0..count as u64 {
        ping[..8].copy_from_slice(&seq.to_be_bytes());
        let start = Instant::now();
        report.sent += 1;
        if sock.send(&ping).await.is_err() {
            continue; // counted lost below
        }
        let deadline = start + PING_TIMEOUT;
        // Skip late echoes of earlier pings until this one's comes.
        while let Ok(got) = timeout_at(deadline.into(), sock.recv(&mut buf)).await {
            match got {
                Ok(n) if buf[..n] == ping[..] => {
                    samples.push(start.elapsed().as_micros() as u64);
                    break;
                }
                Ok(_) => {}
                // ICMP unreachable: nothing listens, so this one is lost.
                Err(_) => break,
            }
        }
    }
    samples.sort_unstable();
    report.received = samples.len() as u64;
    report.lost = report.sent - report.received;
    report.min_us = samples.first().copied().unwrap_or(0);
    report.max_us = samples.last().copied().unwrap_or(0);
    report.p50_us = percentile(&samples, 50.0);
    report.p99_us = percentile(&samples, 99.0);
    Ok(report)
}

/// Sends datagrams of `payload` bytes (at least 8, a sequence number first)
/// to the echo service at `target` for `secs` seconds, at `rate_pps` a
/// second or as fast as the socket takes them, while a second task counts
/// the echoes (until 500 ms after the last send, or all came back).
pub async fn throughput(
    target: SocketAddr,
    secs: f64,
    payload: usize,
    rate_pps: Option<u64>,
) -> io::Result<ThroughputReport> {
    if !secs.is_finite() || secs < 0.0 || rate_pps == Some(0) {
        let why = "secs must be a non-negative number and rate_pps positive";
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    let sock = Arc::new(bind_udp(any_addr(target))?);
    sock.connect(target).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let receiver = tokio::spawn({
        let (sock, sent, done) = (sock.clone(), sent.clone(), done.clone());
        async move {
            let (mut echoed, mut bytes, mut last) = (0u64, 0u64, None);
            let mut buf = vec![0u8; 65_536];
            let mut done_at = None;
            loop {
                if done_at.is_none() && done.load(Ordering::Acquire) {
                    done_at = Some(Instant::now());
                }
                if done_at.is_some_and(|t: Instant| {
                    echoed >= sent.load(Ordering::Acquire) || t.elapsed() >= DRAIN
                }) {
                    break;
                }
                if let Ok(Ok(n)) = timeout(Duration::from_millis(50), sock.recv(&mut buf)).await {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0xff; 8]));
                    if n >= 8 && seq < sent.load(Ordering::Acquire) {
                        echoed += 1;
                        bytes += n as u64;
                        last = Some(Instant::now());
                    }
                }
            }
            (echoed, bytes, last)
        }
    });
    let mut datagram = vec![0u8; payload.max(8)];
    rand::rng().fill(&mut datagram[8..]);
    let (length, mut seq, mut send_errors) = (Duration::from_secs_f64(secs), 0u64, 0u64);
    while start.elapsed() < length {
        if let Some(pps) = rate_pps {
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64 + 1;
            if seq >= due {
                sleep(Duration::from_secs_f64(1.0 / pps as f64).min(Duration::from_millis(1)))
                    .await;
                continue;
            }
        }
        datagram[..8].copy_from_slice(&seq.to_be_bytes());
        // Publish the number before sending, so its echo is never too early.
        sent.store(seq + 1, Ordering::Release);
        match sock.send(&datagram).await {
            Ok(_) => seq += 1,
            Err(_) => {
                sent.store(seq, Ordering::Release);
                send_errors += 1;
                sleep(Duration::from_millis(1)).await;
            }
        }
        if seq % 64 == 0 {
            tokio::task::yield_now().await; // let the receiver (and an echo server) run
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    let (echoed, echoed_bytes, last) = receiver.await.map_err(io::Error::other)?;
    let secs = last.map_or(send_secs, |t| (t - start).as_secs_f64().max(send_secs));
    Ok(ThroughputReport {
        payload: datagram.len(),
        secs,
        sent: seq,
        send_errors,
        echoed,
        echoed_bytes,
        mb_per_s: if secs > 0.0 {
            echoed_bytes as f64 / secs / 1e6
        } else {
            0.0
        },
        loss_pct: if seq > 0 {
            (seq - echoed.min(seq)) as f64 * 100.0 / seq as f64
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udpkit::echo_server;

    #[tokio::test]
    async fn rtt_against_an_echo_server() {
        let (addr, _echo) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let r = rtt(addr, 200, 64).await.unwrap();
        assert_eq!((r.sent, r.received, r.lost), (200, 200, 0), "{r:?}");
        assert!(r.min_us > 0 && r.min_us <= r.p50_us, "{r:?}");
        assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us, "{r:?}");
        assert!(r.p50_us < 20_000, "loopback ping-pong under 20 ms: {r:?}");
    }

    #[tokio::test]
    async fn rtt_counts_losses_when_nothing_answers() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = rtt(silent.local_addr().unwrap(), 2, 64).await.unwrap();
        assert_eq!((r.sent, r.received, r.lost), (2, 0, 2), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_throughput_comes_back_whole() {
        let (addr, echo) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let r = throughput(addr, 1.0, 1200, Some(5_000)).await.unwrap();
        assert!((4_000..=5_100).contains(&r.sent), "{r:?}");
        assert!(r.loss_pct < 5.0 && r.echoed <= r.sent, "{r:?}");
        assert_eq!(r.echoed_bytes, r.echoed * 1200);
        assert!(r.mb_per_s > 4.0 && r.mb_per_s < 6.5, "about 6 MB/s: {r:?}");
        assert!(echo.datagrams() >= r.echoed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unpaced_throughput_is_sane() {
        let (addr, _echo) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let r = throughput(addr, 0.5, 1200, None).await.unwrap();
        assert!(r.sent > 1000 && r.echoed > 0 && r.echoed <= r.sent, "{r:?}");
        assert!(
            r.mb_per_s > 0.0 && (0.0..=100.0).contains(&r.loss_pct),
            "{r:?}"
        );
        assert!(r.secs >= 0.5 && r.secs < 2.0, "{r:?}");
    }
}
