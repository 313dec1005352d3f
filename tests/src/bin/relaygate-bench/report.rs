//! The report: the tables of BENCHMARKS.md and the machine they were taken on.

use crate::{failover::FleetFigures, wan::WanFigures, Args, Crowd, Figures, Memory, Transport};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The report's sections after the loopback table.
pub struct Sections<'a> {
    pub memory: &'a [Memory],
    pub crowd: &'a Option<Crowd>,
    pub caps: &'a crate::caps::CapsFigures,
    pub udp: &'a crate::udp::UdpFigures,
    pub fleet: Option<&'a FleetFigures>,
    pub wan: &'a [WanFigures],
}

pub fn render(
    a: &Args,
    t: Transport,
    [direct, chain, tunnel]: [&[Figures]; 3],
    parts: Sections<'_>,
) -> String {
    let Sections {
        memory,
        crowd,
        caps,
        udp,
        fleet,
        wan,
    } = parts;
    let pick = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let raw = |v: &[Figures], f: fn(&Figures) -> f64| {
        v.iter()
            .map(|x| format!("{:.2}", f(x)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = rows();
    let mut s = String::new();
    s.push_str("# relaygate benchmarks\n\n");
    let args: Vec<String> = std::env::args().skip(1).collect();
    s.push_str(&format!(
        "Command: `cargo run{} -p relaygate-tests --bin relaygate-bench{}{}`\n\n",
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        },
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    ));
    s.push_str(&format!("Machine: {}\n\n", machine()));
    s.push_str(&format!(
        "Session transport agent <-> gateway: {:?}; tunnelled connections travel on the {} \
         (both encrypted and authenticated). Medians of {} run(s), {} s per figure; \
         load generator in the benchmark process, sink and echo targets in a process of their own, on loopback.\n\n",
        t,
        if a.data_path == "lane" {
            format!(
                "agent's {} lane(s) (TLS 1.3 handshake, AES-128-GCM records)",
                a.lanes
            )
        } else {
            "session's streams".to_string()
        },
        a.runs,
        a.seconds
    ));
    s.push_str(
        "| figure | direct loopback | through gateway+agent | ratio | two plain TCP relays (floor) | floor's ratio |\n|---|---|---|---|---|---|\n",
    );
    for (name, f, higher_better) in rows {
        let (d, c, x) = (pick(direct, f), pick(chain, f), pick(tunnel, f));
        let ratio = |v: f64| {
            if higher_better {
                format!("{:.0}% of direct", v / d * 100.0)
            } else {
                format!("{:.2}× direct", v / d)
            }
        };
        s.push_str(&format!(
            "| {name} | {d:.2} | {x:.2} | {} | {c:.2} | {} |\n",
            ratio(x),
            ratio(c)
        ));
    }
    s.push_str(
        "\nThe floor: two plain TCP forwarders in a row, each its own process (tokio, 64 KiB copies, no \
         encryption, no multiplexing), in the places of gateway and agent. No relay of two processes \
         does better on this machine; the gap between it and gateway+agent is what encryption and \
         the lane cost.\n",
    );
    if !memory.is_empty() {
        s.push_str("\n| idle tunnelled connections held | gateway KiB/conn | agent KiB/conn | gateway RSS MiB | agent RSS MiB |\n|---|---|---|---|---|\n");
    }
    for m in memory {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            m.held, m.gw_kib_per_conn, m.agent_kib_per_conn, m.gw_total_mib, m.agent_total_mib
        ));
    }
    if let Some(crowd) = crowd {
        s.push_str(&format!(
            "\n| agents, one stream each | one agent alone, Gbit/s | together, Gbit/s | together / one |\n|---|---|---|---|\n| {} | {:.2} | {:.2} | {:.0}% |\n",
            crowd.agents,
            crowd.one_gbit,
            crowd.together_gbit,
            crowd.together_gbit / crowd.one_gbit * 100.0
        ));
    }
    s.push_str(&crate::caps::section(caps, a.seconds));
    s.push_str(&crate::udp::section(udp));
    match fleet {
        Some(f) => s.push_str(&fleet_section(a, f)),
        None if a.skip_fleet => {}
        None => s.push_str("\n## A fleet of three gateways\n\nSkipped: etcd is not installed (`apt-get install etcd-server`).\n"),
    }
    if !wan.is_empty() {
        s.push_str(&format!(
            "\n## Over a WAN\n\nThe WAN lab (tests/src/netlab/wan.rs): the gateway and the load generator on one host, \
             the agent and the sink on another, a router between them whose userspace delay line delays \
             (and drops) every packet; jumbo frames, 64 MiB TCP buffers on both hosts. Direct: one TCP \
             connection per stream from the load generator to the sink over the same path. Medians of {} run(s), \
             {} s per figure.\n\n",
            a.runs, a.seconds
        ));
        s.push_str(&wan_table(wan));
    }
    s.push_str("\nRaw values per run (direct | gateway+agent | two plain relays):\n\n");
    for (name, f, _) in rows {
        s.push_str(&format!(
            "- {name}: {} | {} | {}\n",
            raw(direct, f),
            raw(tunnel, f),
            raw(chain, f)
        ));
    }
    s
}

type Row = (&'static str, fn(&Figures) -> f64, bool);

fn rows() -> [Row; 5] {
    [
        ("throughput, 1 stream, Gbit/s", |f| f.tput1, true),
        ("throughput, 8 streams, Gbit/s", |f| f.tput8, true),
        ("64-byte RTT p50, µs", |f| f.p50_us, false),
        ("64-byte RTT p99, µs", |f| f.p99_us, false),
        (
            "new connections/s (connect, 1-byte echo, close)",
            |f| f.conns_per_s,
            true,
        ),
    ]
}

/// Forwarded against direct, then the failover figures.
pub fn fleet_section(a: &Args, f: &FleetFigures) -> String {
    let pick = |v: &[Figures], g: fn(&Figures) -> f64| median(v.iter().map(g).collect());
    let mut s = format!(
        "\n## A fleet of three gateways\n\nThree gateways on 127.0.0.1-3 sharing one etcd (a real `etcd` process). \
         An agent with `gateway.max_sessions = 1` holds gateway 1 only: a connection to gateway 1 goes \
         straight to the agent, one to gateway 2 rides gateway 2's lane to gateway 1 first (one more \
         process and TLS hop on the same two cores). Medians of {} run(s), {} s per figure.\n\n\
         | figure | on the gateway holding the agent | forwarded by another gateway | ratio |\n|---|---|---|---|\n",
        a.runs, a.seconds
    );
    for (name, g, higher_better) in rows() {
        let (d, x) = (pick(&f.direct, g), pick(&f.forwarded, g));
        let ratio = if higher_better {
            format!("{:.0}% of direct", x / d * 100.0)
        } else {
            format!("{:.2}× direct", x / d)
        };
        s.push_str(&format!("| {name} | {d:.2} | {x:.2} | {ratio} |\n"));
    }
    let o = &f.failover;
    s.push_str(&format!(
        "\nFailover: an agent holding all three gateways; 8 connections doing 16 KiB round trips through \
         gateways 1 and 3, and from the kill on a new connection (connect, 1-byte echo, close) every 20 ms \
         through each; gateway 2 is SIGKILLed (etcd member TTL 3 s).\n\n\
         | figure | value |\n|---|---|\n\
         | round trips through the survivors, failed | {} of {} |\n\
         | new connections through the survivors, failed | {} of {} |\n\
         | longest time without a successful new connection through the survivors, from the kill on | {} ms |\n\
         | SIGKILL until the dead gateway left the fleet's view | {:.2} s |\n\
         | restarted gateway up until it served the port again | {:.1} ms |\n",
        o.failed_round_trips,
        o.round_trips,
        o.failed_new_connections,
        o.new_connections,
        o.longest_gap.as_millis(),
        o.left_view.as_secs_f64(),
        o.serving_again.as_secs_f64() * 1000.0,
    ));
    s
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let profile = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    format!(
        "{cpu}, {cores} cores, {mem} GiB RAM, Linux {}, {profile}",
        kernel.trim()
    )
}

/// The WAN table: Gbit/s by round-trip time and loss.
pub fn wan_table(wan: &[WanFigures]) -> String {
    let via = wan.iter().any(|w| w.via.is_some());
    let mut s = String::from(
        "| RTT | loss | 1 stream: direct | gateway+agent | ratio | 8 streams: direct | gateway+agent | ratio |",
    );
    s.push_str(if via { " via, 1 | via, 8 |\n" } else { "\n" });
    s.push_str("|---|---|---|---|---|---|---|---|");
    s.push_str(if via { "---|---|\n" } else { "\n" });
    for w in wan {
        s.push_str(&format!(
            "| {} ms | {}% | {:.2} | {:.2} | {:.0}% | {:.2} | {:.2} | {:.0}% |",
            w.point.rtt.as_millis(),
            w.point.loss * 100.0,
            w.direct[0],
            w.tunnel[0],
            w.tunnel[0] / w.direct[0] * 100.0,
            w.direct[1],
            w.tunnel[1],
            w.tunnel[1] / w.direct[1] * 100.0,
        ));
        match w.via {
            Some(v) => s.push_str(&format!(" {:.2} | {:.2} |\n", v[0], v[1])),
            None if via => s.push_str(" | |\n"),
            None => s.push('\n'),
        }
    }
    s
}
