//! Many UDP flows at once, one socket per source address, each sending
//! numbered rounds to an echo service and checking every echo byte for byte
//! (retransmitting, since UDP may drop): what a gateway's flow table must
//! carry without mixing flows up.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{task::JoinSet, time::timeout_at};

use super::{bind_udp, percentile};

/// How long a flow waits for an echo before it sends the datagram again.
const RESEND_AFTER: Duration = Duration::from_millis(300);
/// Flow reports list at most this many failures.
const MAX_ERRORS: usize = 10;

/// What [`flows`] saw. RTTs run from a round's first send to its echo, so
/// a retransmitted round counts its wait in full.
#[derive(Clone, Debug, Default)]
pub struct FlowsReport {
    pub flows_ok: usize,
    pub flows_failed: usize,
    /// Every datagram sent, retransmissions included.
    pub datagrams_sent: u64,
    /// Rounds whose echo came back byte-exact.
    pub datagrams_echoed: u64,
    pub retransmits: u64,
    /// Echoes of an earlier round again (after a retransmission): harmless.
    pub duplicates: u64,
    /// Datagrams that came back but matched no round of the flow: corruption.
    pub mismatches: u64,
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    pub elapsed_ms: u64,
    /// The first few failures, "source: why".
    pub errors: Vec<String>,
}

impl FlowsReport {
    pub fn to_json(&self) -> Value {
        json!({
            "flows_ok": self.flows_ok, "flows_failed": self.flows_failed,
            "datagrams_sent": self.datagrams_sent, "datagrams_echoed": self.datagrams_echoed,
            "retransmits": self.retransmits, "duplicates": self.duplicates,
            "mismatches": self.mismatches, "rtt_p50_us": self.rtt_p50_us,
            "rtt_p99_us": self.rtt_p99_us, "elapsed_ms": self.elapsed_ms, "errors": self.errors,
        })
    }
}

#[derive(Default)]
struct Flow {
    sent: u64,
    retransmits: u64,
    echoed: u64,
    duplicates: u64,
    mismatches: u64,
    rtts: Vec<u64>,
}

/// The payload of round `round` of flow `flow`: both as big-endian u32s,
/// then bytes from a generator seeded with them. At least 8 bytes.
fn flow_payload(flow: u32, round: u32, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(8));
    p.extend_from_slice(&flow.to_be_bytes());
    p.extend_from_slice(&round.to_be_bytes());
    let mut x = (u64::from(flow) << 32 | u64::from(round)) ^ 0x9e37_79b9_7f4a_7c15;
    while p.len() < len {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        let take = (len - p.len()).min(8);
        p.extend_from_slice(&bytes[..take]);
    }
    p
}

/// One flow: `rounds` datagrams in turn, each resent every 300 ms until its
/// byte-exact echo arrives or `timeout` passes since its first send.
async fn one_flow(
    id: u32,
    source: SocketAddr,
    target: SocketAddr,
    rounds: usize,
    payload: usize,
    timeout: Duration,
    f: &mut Flow,
) -> Result<(), String> {
    let sock = bind_udp(source).map_err(|e| format!("bind: {e}"))?;
    sock.connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut buf = vec![0u8; 65_536];
    for round in 0..rounds as u32 {
        let want = flow_payload(id, round, payload);
        let first = Instant::now();
        let deadline = first + timeout;
        let (mut last_error, mut attempts) = (None, 0);
        'round: loop {
            if Instant::now() >= deadline {
                let why = last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                return Err(format!("round {round}: no echo within {timeout:?}{why}"));
            }
            if attempts > 0 {
                f.retransmits += 1;
            }
            attempts += 1;
            match sock.send(&want).await {
                Ok(_) => f.sent += 1,
                Err(e) => last_error = Some(e), // e.g. ICMP unreachable; retry
            }
            let resend_at = (Instant::now() + RESEND_AFTER).min(deadline);
            loop {
                let n = match timeout_at(resend_at.into(), sock.recv(&mut buf)).await {
                    Err(_) => continue 'round,
                    Ok(Err(e)) => {
                        last_error = Some(e);
                        tokio::time::sleep_until(resend_at.into()).await;
                        continue 'round;
                    }
                    Ok(Ok(n)) => n,
                };
                let got = &buf[..n];
                if got == want.as_slice() {
                    f.echoed += 1;
                    f.rtts.push(first.elapsed().as_micros() as u64);
                    break 'round;
                }
                let earlier = got.len() >= 8 && got[..4] == id.to_be_bytes() && {
                    let r = u32::from_be_bytes([got[4], got[5], got[6], got[7]]);
                    r < round && got == flow_payload(id, r, payload).as_slice()
                };
                if earlier {
                    f.duplicates += 1;
                } else {
                    f.mismatches += 1;
                }
            }
        }
    }
    match f.mismatches {
        0 => Ok(()),
        n => Err(format!("{n} echoes matched no datagram sent")),
    }
}

/// Runs one flow per entry of `sources` at once (each its own socket bound
/// there; port 0 picks one, and distinct loopback IPs like 127.1.0.x work),
/// each sending `rounds` datagrams of `payload` bytes (at least 8), unique per
/// flow and round, to the echo service at `target` and checking each echo
/// byte for byte. A datagram is resent every 300 ms until its echo arrives;
/// a flow fails when one waits longer than `timeout` or anything else came
/// back. Raises the open-files limit to fit the sockets when it can.
pub async fn flows(
    target: SocketAddr,
    sources: &[SocketAddr],
    rounds: usize,
    payload: usize,
    timeout: Duration,
) -> FlowsReport {
    let _ = crate::load::raise_nofile(sources.len() as u64 + 256);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (id, &source) in sources.iter().enumerate() {
        set.spawn(async move {
            let mut f = Flow::default();
            let r = one_flow(id as u32, source, target, rounds, payload, timeout, &mut f).await;
            (source, f, r)
        });
    }
    let mut report = FlowsReport::default();
    let mut rtts = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (source, f, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                report.flows_failed += 1;
                report.errors.push(format!("a flow task died: {e}"));
                continue;
            }
        };
        report.datagrams_sent += f.sent;
        report.datagrams_echoed += f.echoed;
        report.retransmits += f.retransmits;
        report.duplicates += f.duplicates;
        report.mismatches += f.mismatches;
        rtts.extend(f.rtts);
        match result {
            Ok(()) => report.flows_ok += 1,
            Err(why) => {
                report.flows_failed += 1;
                if report.errors.len() < MAX_ERRORS {
                    report.errors.push(format!("{source}: {why}"));
                }
            }
        }
    }
    rtts.sort_unstable();
    report.rtt_p50_us = percentile(&rtts, 50.0);
    report.rtt_p99_us = percentile(&rtts, 99.0);
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udpkit::{any_port, echo_server, ipv4_range};
    use std::net::{IpAddr, Ipv4Addr};

    fn loopback_sources(n: usize) -> Vec<SocketAddr> {
        let range = ipv4_range(&format!(
            "127.1.0.1-{}",
            Ipv4Addr::from(0x7f01_0000 + n as u32)
        ));
        range
            .unwrap()
            .into_iter()
            .map(|ip| any_port(ip.into()))
            .collect()
    }

    #[tokio::test]
    async fn fifty_flows_from_fifty_addresses_come_back_exact() {
        let (addr, echo) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let sources = loopback_sources(50);
        let r = flows(addr, &sources, 3, 200, Duration::from_secs(10)).await;
        assert_eq!(
            (r.flows_ok, r.flows_failed, r.mismatches),
            (50, 0, 0),
            "{r:?}"
        );
        assert_eq!(r.datagrams_echoed, 150);
        assert!(r.rtt_p50_us > 0 && r.rtt_p50_us <= r.rtt_p99_us, "{r:?}");
        let mut ips: Vec<IpAddr> = echo.peers().iter().map(|p| p.ip()).collect();
        ips.sort();
        let want: Vec<IpAddr> = sources.iter().map(|s| s.ip()).collect();
        assert_eq!(ips, want, "one peer per source address");
        assert!(echo.datagrams() >= 150);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_flows_at_once() {
        if !crate::load::require_nofile(2300, "udpkit::a_thousand_flows_at_once") {
            return;
        }
        let (addr, mut echo) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let sources = loopback_sources(1000);
        let r = flows(addr, &sources, 3, 200, Duration::from_secs(20)).await;
        assert_eq!((r.flows_ok, r.mismatches), (1000, 0), "{r:?}");
        assert_eq!(echo.new_peers().await.len(), 1000);
    }

    #[tokio::test]
    async fn a_flow_without_an_echo_fails_in_time() {
        // A bound socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = silent.local_addr().unwrap();
        let r = flows(
            target,
            &loopback_sources(2),
            1,
            16,
            Duration::from_millis(700),
        )
        .await;
        assert_eq!((r.flows_ok, r.flows_failed), (0, 2), "{r:?}");
        assert!(r.datagrams_sent >= 4, "resent every 300 ms: {r:?}");
        assert!(r.elapsed_ms < 2000 && r.errors.len() == 2, "{r:?}");
    }

    #[test]
    fn payloads_differ_per_flow_and_round() {
        let a = flow_payload(1, 0, 200);
        assert_eq!(a.len(), 200);
        assert_eq!(a, flow_payload(1, 0, 200));
        assert_ne!(a, flow_payload(1, 1, 200));
        assert_ne!(a, flow_payload(2, 0, 200));
        assert_eq!(flow_payload(1, 0, 3).len(), 8);
    }
}
