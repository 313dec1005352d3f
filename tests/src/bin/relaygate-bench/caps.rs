//! Bandwidth caps through gateway+agent: one stream under a cap the admin
//! API sets on the agent, against that cap; and what a cap costs a stream
//! it never holds back (every chunk still asks the bucket).

use std::{net::SocketAddr, time::Duration};

use relaygate_tests::stack::http_request;
use tokio::runtime::Runtime;

use crate::load::throughput;

/// Caps measured, bytes per second.
const CAPS: [u64; 4] = [1_000_000, 10_000_000, 100_000_000, 400_000_000];
/// A cap no stream here reaches (the largest a bucket takes, about 34 Gbit/s).
const UNREACHED: u64 = u32::MAX as u64;

pub struct CapsFigures {
    /// (cap, achieved), bytes per second.
    pub rows: Vec<(u64, f64)>,
    pub uncapped_gbit: f64,
    pub unreached_gbit: f64,
}

fn set(admin: SocketAddr, agent: &str, inbound: Option<u64>) -> anyhow::Result<()> {
    let path = format!("/v1/agents/caps?agent={agent}");
    let (status, body) = match inbound {
        Some(rate) => http_request(
            admin,
            "PUT",
            &path,
            &format!(r#"{{"inbound": {rate}, "outbound": 0, "burst": 0}}"#),
        ),
        None => http_request(admin, "DELETE", &path, ""),
    };
    anyhow::ensure!(status == 200, "caps: HTTP {status}: {body}");
    Ok(())
}

pub fn run(
    rt: &Runtime,
    admin: SocketAddr,
    agent: &str,
    sink: SocketAddr,
    d: Duration,
) -> anyhow::Result<CapsFigures> {
    let stream = || rt.block_on(throughput(sink, 1, d));
    let uncapped_gbit = stream()?;
    set(admin, agent, Some(UNREACHED))?;
    let unreached_gbit = stream()?;
    let mut rows = Vec::new();
    for cap in CAPS {
        set(admin, agent, Some(cap))?;
        rows.push((cap, stream()? * 1e9 / 8.0));
    }
    set(admin, agent, None)?;
    Ok(CapsFigures {
        rows,
        uncapped_gbit,
        unreached_gbit,
    })
}

pub fn section(f: &CapsFigures, seconds: f64) -> String {
    let mut s = format!(
        "\n## Bandwidth caps\n\nOne stream through gateway+agent, {seconds} s each, with a cap on the agent \
         set through the admin API (`PUT /v1/agents/caps`, inbound, default burst: a tenth of a second's \
         worth); the burst counts in the figure.\n\n| cap, MB/s | achieved, MB/s | achieved / cap |\n|---|---|---|\n"
    );
    for (cap, got) in &f.rows {
        s.push_str(&format!(
            "| {:.0} | {:.2} | {:.1}% |\n",
            *cap as f64 / 1e6,
            got / 1e6,
            got / *cap as f64 * 100.0
        ));
    }
    s.push_str(&format!(
        "\nA cap the stream never reaches ({:.2} GB/s): {:.2} Gbit/s against {:.2} uncapped ({:.0}%): the cost of asking the bucket for every chunk.\n",
        UNREACHED as f64 / 1e9,
        f.unreached_gbit,
        f.uncapped_gbit,
        f.unreached_gbit / f.uncapped_gbit * 100.0
    ));
    s
}
