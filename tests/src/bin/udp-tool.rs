//! udp-tool: UDP probes for the loopback tests, the labs and the benchmark,
//! over `relaygate_tests::udpkit`. Every event or result is one JSON object
//! per line on stdout.
//!
//!   udp-tool echo --listen 0.0.0.0:9905
//!   udp-tool flows --target IP:PORT [--sources 127.1.0.1-127.1.3.232] [--source IP]...
//!                  [--per-source 1] [--rounds 3] [--payload 200] [--timeout-secs 10]
//!   udp-tool rtt --target IP:PORT [--count 100] [--payload 64]
//!   udp-tool throughput --target IP:PORT [--secs 5] [--payload 1200] [--rate-pps N]
//!   udp-tool flood --target IP:PORT --from 198.51.100.0/24 [--pps 20000] [--secs 5] [--size 1200]
//!
//! `echo` prints `listening`, then `peer` the first time each peer address
//! sends, and runs until killed. `flows` (alias `load`) prints the flows
//! report and exits 1 if any flow failed. `flood` needs CAP_NET_RAW and
//! prints `{"sent":N}`.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use relaygate_tests::udpkit::{self, Ipv4Net};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "UDP echo, flows, latency, throughput and spoofed floods; JSON lines out")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every datagram to its sender and report each new peer, until killed.
    Echo {
        #[arg(long, default_value = "0.0.0.0:9905")]
        listen: SocketAddr,
    },
    /// One flow per source address at once, each echo checked byte for byte.
    #[command(alias = "load")]
    Flows {
        #[arg(long)]
        target: SocketAddr,
        /// An IPv4 range "a-b" (inclusive) or one address; repeatable.
        #[arg(long, value_parser = parse_range)]
        sources: Vec<Vec<IpAddr>>,
        /// One source address (IPv4 or IPv6); repeatable. With no sources at
        /// all, one flow leaves from the wildcard address.
        #[arg(long)]
        source: Vec<IpAddr>,
        /// Flows per source address (each its own socket and port).
        #[arg(long, default_value_t = 1)]
        per_source: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Bytes per datagram (at least 8).
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// How long one datagram may wait for its echo (resent every 300 ms).
        #[arg(long, default_value_t = 10.0)]
        timeout_secs: f64,
    },
    /// Ping-pong latency: one datagram at a time, 1 s timeout each.
    Rtt {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// Send for `secs` (paced, or as fast as possible) and count the echoes.
    Throughput {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        #[arg(long, default_value_t = 1200)]
        payload: usize,
        /// Datagrams per second (unpaced without).
        #[arg(long)]
        rate_pps: Option<u64>,
    },
    /// Datagrams from forged random sources in `--from`, through a raw socket.
    Flood {
        #[arg(long)]
        target: SocketAddr,
        /// Source prefix, e.g. 198.51.100.0/24.
        #[arg(long)]
        from: Ipv4Net,
        #[arg(long, default_value_t = 20_000)]
        pps: u64,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// UDP payload bytes (a random QUIC v1 Initial-shaped long header).
        #[arg(long, default_value_t = 1200)]
        size: usize,
    },
}

fn parse_range(s: &str) -> Result<Vec<IpAddr>, String> {
    Ok(udpkit::ipv4_range(s)?.into_iter().map(IpAddr::V4).collect())
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn positive_secs(secs: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs).with_context(|| format!("{flag} {secs}: not a duration"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Echo { listen } => {
            let (addr, mut echo) = udpkit::echo_server(listen)
                .await
                .with_context(|| format!("bind {listen}"))?;
            emit(json!({"event": "listening", "addr": addr.to_string()}));
            loop {
                for peer in echo.new_peers().await {
                    emit(json!({"event": "peer", "addr": peer.to_string()}));
                }
            }
        }
        Cmd::Flows {
            target,
            sources,
            source,
            per_source,
            rounds,
            payload,
            timeout_secs,
        } => {
            let timeout = positive_secs(timeout_secs, "--timeout-secs")?;
            let mut ips: Vec<IpAddr> = sources.into_iter().flatten().chain(source).collect();
            if ips.is_empty() {
                ips.push(udpkit::any_addr(target).ip());
            }
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .flat_map(|&ip| std::iter::repeat_n(udpkit::any_port(ip), per_source))
                .collect();
            let report = udpkit::flows(target, &addrs, rounds, payload, timeout).await;
            emit(report.to_json());
            if report.flows_failed > 0 || report.flows_ok == 0 {
                std::process::exit(1); // the report says why
            }
        }
        Cmd::Rtt {
            target,
            count,
            payload,
        } => {
            let report = udpkit::rtt(target, count, payload).await.context("rtt")?;
            emit(report.to_json());
        }
        Cmd::Throughput {
            target,
            secs,
            payload,
            rate_pps,
        } => {
            let report = udpkit::throughput(target, secs, payload, rate_pps)
                .await
                .context("throughput")?;
            emit(report.to_json());
        }
        Cmd::Flood {
            target,
            from,
            pps,
            secs,
            size,
        } => {
            let SocketAddr::V4(target) = target else {
                bail!("--target {target}: the flood is IPv4 only");
            };
            let sent = tokio::task::spawn_blocking(move || {
                udpkit::spoofed_flood(target, from, pps, secs, size)
            })
            .await?
            .context("flood")?;
            emit(json!({"sent": sent}));
        }
    }
    Ok(())
}
