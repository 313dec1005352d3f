//! relaygate-bench: measures a tunnel through gateway + agent against direct
//! loopback in the same run, and writes BENCHMARKS.md.
//!
//!   cargo run --release -p relaygate-tests --bin relaygate-bench            # full: 3 runs, medians
//!   cargo run -p relaygate-tests --bin relaygate-bench -- --quick --output /tmp/b.md   # CI smoke
//!
//! Figures: throughput with 1 and 8 streams, 64-byte ping-pong RTT p50/p99,
//! new connections per second (connect, 1-byte echo, close), RSS per idle
//! tunnelled connection on the gateway and the agent (RSS at 0, 1,000 and
//! 10,000 held), the throughput of 50 agents pushing one stream each
//! against one agent alone, with etcd installed a fleet of three
//! gateways: a forwarded connection against a direct one, and failover; and
//! UDP tunnels against direct (udp.rs; `--only udp` for those alone).

mod caps;
mod failover;
mod load;
mod report;
mod roles;
mod udp;
mod wan;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use load::{conn_rate, rtt, throughput, throughput_each};
use relaygate_tests::stack::{eventually, here, settings, Agent, Gateway, GatewaySpec, Transport};
use roles::{runtime, serve_relays, serve_targets, spawn_relays, spawn_targets};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Parser)]
struct Args {
    /// Short smoke run (1 run, short durations, 200 idle connections).
    #[arg(long)]
    quick: bool,
    /// Runs to take medians over.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per throughput and connection-rate measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Idle connections held for the memory figures (also measured at 1,000 on
    /// the way when larger; 0 skips them). The idle echo target runs in its own process, so
    /// this one needs only one descriptor per held connection.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Agents that push one stream each at once, against one agent alone (0 skips them).
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Internal: serve as the targets process (sink and echo).
    #[arg(long, hide = true)]
    serve_targets: bool,
    /// Internal: the address the targets listen on.
    #[arg(long, hide = true, default_value = "127.0.0.1")]
    targets_bind: std::net::IpAddr,
    /// Internal: serve as a plain TCP relay to each of these addresses.
    #[arg(long, hide = true, num_args = 1..)]
    serve_relays: Vec<SocketAddr>,
    /// Session transport between agent and gateway.
    #[arg(long, default_value = "quic")]
    transport: String,
    /// Where tunnelled connections travel: `lane` (the default) or `session`
    /// (streams of the libp2p session), as the agent's `session.data_path`.
    #[arg(long, default_value = "lane")]
    data_path: String,
    /// Lanes the agent keeps (its `session.lanes`, 1 to 8; the gateway takes up to 8).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=8))]
    lanes: u8,
    /// Measure only this figure, direct and through the tunnel, for
    /// `--seconds`, print both and exit without a report (for profiling and
    /// for comparing with other tunnels, see `--via`). `udp`: the UDP
    /// section (with `--wan`, its WAN figures too), printed.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Ports for the sink and echo targets (`SINK,ECHO`; default: free ones),
    /// so that another tunnel can be set up to reach them.
    #[arg(long, value_delimiter = ',')]
    targets_ports: Vec<u16>,
    /// With `--only`: measure through these sink and echo addresses
    /// (`SINK,ECHO`: another tunnel's public side, leading to the targets at
    /// `--targets-ports`) instead of through gateway+agent.
    #[arg(long, value_delimiter = ',')]
    via: Vec<SocketAddr>,
    /// With `--rtt` or `--wan`: a shell command that sets up the `--via`
    /// tunnel in each WAN lab (run with RELAYGATE_NEAR_NS, RELAYGATE_FAR_NS,
    /// RELAYGATE_NEAR_IP, RELAYGATE_FAR_IP and RELAYGATE_SINK, the sink as
    /// the far host sees it; killed when the lab goes).
    #[arg(long, requires = "via")]
    via_setup: Option<String>,
    /// Measure over a WAN lab with this round-trip time instead of on
    /// loopback (`50ms`, `0.15s`): 1 and 8 streams through gateway+agent and
    /// direct over the same path. Needs root.
    #[arg(long, value_parser = humantime::parse_duration)]
    rtt: Option<Duration>,
    /// With `--rtt`: the share of packets the lab's router drops, each way.
    #[arg(long, default_value_t = 0.0, requires = "rtt")]
    loss: f64,
    /// After the loopback figures, the WAN table: 0, 50 and 150 ms RTT, each
    /// without and with 1% loss. Needs root.
    #[arg(long)]
    wan: bool,
    /// Leave out the fleet figures (three gateways on etcd: forwarded
    /// against direct, failover).
    #[arg(long)]
    skip_fleet: bool,
    /// Only the fleet figures: print them, write no report.
    #[arg(long, conflicts_with = "skip_fleet")]
    fleet_only: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Only {
    Stream1,
    Streams8,
    Rtt,
    Connections,
    Udp,
}

#[derive(Clone, Debug, Default)]
struct Figures {
    tput1: f64,
    tput8: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
}

#[derive(Clone, Debug, Default)]
struct Memory {
    held: usize,
    gw_kib_per_conn: f64,
    agent_kib_per_conn: f64,
    gw_total_mib: f64,
    agent_total_mib: f64,
}

#[derive(Clone, Debug, Default)]
struct Crowd {
    agents: usize,
    one_gbit: f64,
    together_gbit: f64,
}

/// The benchmark is one client hammering one tunnel: lift the per-IP rate
/// and per-tunnel caps meant for the internet.
const GATEWAY_SETTINGS: &[&str] = &[
    "log.level=info",
    "guard.tunnel_connections_per_ip.per_second=0",
    "guard.connections_per_ip.per_second=0",
    "limits.max_connections_per_tunnel=100000",
    "limits.max_connections_per_source=100000",
    "limits.max_connections_per_ip=1000",
    "relay.max_reservations_per_ip=1000",
    // Held idle connections are what the memory figure measures.
    "limits.idle_timeout=0s",
    // Whatever --lanes asks for.
    "session.lanes=8",
];

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    // Soft limit up to the hard one: 10,000 held connections need as many descriptors.
    let _ = relaygate_tests::load::raise_nofile(u64::MAX);
    let (sink_port, echo_port) = match a.targets_ports[..] {
        [] => (0, 0),
        [s, e] => (s, e),
        _ => anyhow::bail!("--targets-ports takes two ports: SINK,ECHO"),
    };
    if a.serve_targets {
        return serve_targets(a.targets_bind, sink_port, echo_port);
    }
    anyhow::ensure!(
        a.via.is_empty() || a.via.len() == 2,
        "--via takes two addresses: SINK,ECHO"
    );
    if !a.serve_relays.is_empty() {
        return serve_relays(&a.serve_relays);
    }
    if a.quick {
        a.runs = 1;
        a.seconds = 1.0;
        a.idle = 200;
        a.agents = 4;
    }
    let transport = if a.transport == "tcp" {
        Transport::Tcp
    } else {
        Transport::Quic
    };
    if let Some(rtt) = a.rtt {
        // One WAN point: print it, write no report.
        let f = wan::run(&a, transport, &[wan::Point { rtt, loss: a.loss }])?;
        print!("{}", report::wan_table(&f));
        return Ok(());
    }
    if a.fleet_only {
        let f = failover::run(&a, transport, Duration::from_secs_f64(a.seconds))?
            .ok_or_else(|| anyhow::anyhow!("the fleet figures need etcd"))?;
        print!("{}", report::fleet_section(&a, &f));
        return Ok(());
    }
    let rt = runtime()?;
    let targets = spawn_targets(&a.targets_ports)?;
    let (sink, echo) = (targets.sink, targets.echo);
    let udp_targets = udp::Targets::start(targets.udp, &a);

    // info level: the tests' per-connection debug logs would distort the figures
    let ports = relaygate_tests::procs::free_tcp_range(100);
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: settings(GATEWAY_SETTINGS),
            port_range: Some(format!("{ports}-{}", ports + 99)),
            ..Default::default()
        },
    );
    let agent = Agent::start(
        &here,
        &gw,
        transport,
        &[
            vec![
                format!("sink={sink}"),
                format!("echo={echo}"),
                format!("idle={echo}"),
            ],
            udp_targets.tunnels(),
        ]
        .concat(),
        true,
        &settings(&[
            "log.level=info",
            "limits.max_connections=20000",
            "limits.idle_timeout=0s",
            "session.max_inbound_streams=16384",
            &format!("session.data_path={}", a.data_path),
            &format!("session.lanes={}", a.lanes),
        ]),
    );
    let sink_port = agent
        .wait_leased("sink", Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    let echo_port = agent
        .wait_leased("echo", Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    let idle_port = agent
        .wait_leased("idle", Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    wait_lanes(&agent, &a.data_path, a.lanes)?;
    let tunnel_sink: SocketAddr = ([127, 0, 0, 1], sink_port).into();
    let tunnel_echo: SocketAddr = ([127, 0, 0, 1], echo_port).into();

    let d = Duration::from_secs_f64(a.seconds);
    if let Some(Only::Udp) = a.only {
        let mut f = udp::run(&rt, &a, &agent, &udp_targets)?;
        f.wan = udp::wan(&a, transport)?;
        let section = udp::section(&f);
        print!("{section}");
        // The report keeps its other sections; this one is replaced.
        let old = std::fs::read_to_string(&a.output).unwrap_or_default();
        std::fs::write(&a.output, udp::splice(&old, &section))?;
        eprintln!("wrote the UDP section into {}", a.output.display());
        return Ok(());
    }
    if let Some(figure) = a.only {
        // For profiling one figure: attach perf to the printed pids.
        eprintln!(
            "gateway pid {}, agent pid {}",
            gw.proc.pid(),
            agent.proc.pid()
        );
        let (through, label) = match a.via[..] {
            [s, e] => ((s, e), "via"),
            _ => ((tunnel_sink, tunnel_echo), "through gateway+agent"),
        };
        let one = |(sink, echo): (SocketAddr, SocketAddr)| {
            rt.block_on(async {
                match figure {
                    Only::Stream1 => throughput(sink, 1, d).await,
                    Only::Streams8 => throughput(sink, 8, d).await,
                    Only::Rtt => rtt(echo, (a.seconds * 5000.0) as usize)
                        .await
                        .map(|(_, p99)| p99),
                    Only::Connections => conn_rate(echo, 4, d).await,
                    Only::Udp => unreachable!("measured above"),
                }
            })
        };
        let direct = one((sink, echo))?;
        let v = one(through)?;
        println!(
            "{figure:?}: direct {direct:.2}, {label} {v:.2}, ratio {:.3}",
            v / direct
        );
        return Ok(());
    }
    // The floor for any relay of two processes on this machine: two plain TCP
    // forwarders in a row (no encryption, no multiplexing), like client ->
    // gateway -> agent -> target.
    let (_agent_side, near) = spawn_relays(&[sink, echo])?;
    let (_gateway_side, far) = spawn_relays(&near)?;
    let (chain_sink, chain_echo) = (far[0], far[1]);
    let mut direct = Vec::new();
    let mut chain = Vec::new();
    let mut tunnel = Vec::new();
    for run in 0..a.runs {
        eprintln!("run {}/{}", run + 1, a.runs);
        direct.push(rt.block_on(measure(sink, echo, d))?);
        chain.push(rt.block_on(measure(chain_sink, chain_echo, d))?);
        tunnel.push(rt.block_on(measure(tunnel_sink, tunnel_echo, d))?);
    }
    let agent_id = relaygate_tests::stack::agent_peer_id(agent.dir.path());
    let caps = caps::run(&rt, gw.admin, &agent_id, tunnel_sink, d)?;
    // 0 skips a part: handy when working on one figure.
    let steps: Vec<usize> = match a.idle {
        0 => vec![],
        n if n > 1000 => vec![1000, n],
        n => vec![n],
    };
    let tunnel_idle: SocketAddr = ([127, 0, 0, 1], idle_port).into();
    let memory = rt.block_on(idle_memory(
        tunnel_idle,
        &steps,
        gw.proc.pid(),
        agent.proc.pid(),
    ))?;
    let crowd = match a.agents {
        0 => None,
        n => Some(rt.block_on(crowd(&gw, transport, &a, sink, tunnel_sink, n, d))?),
    };
    // The CI smoke run takes one WAN point too, so the lab keeps working.
    let points = if a.wan {
        wan::Point::table()
    } else if a.quick && relaygate_tests::netlab::require_root("relaygate-bench --quick WAN point")
    {
        vec![wan::Point {
            rtt: Duration::from_millis(50),
            loss: 0.0,
        }]
    } else {
        vec![]
    };
    let mut udp = udp::run(&rt, &a, &agent, &udp_targets)?;
    drop((gw, agent, udp_targets));
    let fleet = if a.skip_fleet {
        None
    } else {
        failover::run(&a, transport, d)?
    };
    let wan = wan::run(&a, transport, &points)?;
    udp.wan = udp::wan(&a, transport)?;
    let report = report::render(
        &a,
        transport,
        [&direct, &chain, &tunnel],
        report::Sections {
            memory: &memory,
            crowd: &crowd,
            caps: &caps,
            udp: &udp,
            fleet: fleet.as_ref(),
            wan: &wan,
        },
    );
    println!("{report}");
    std::fs::write(&a.output, &report)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

pub(crate) async fn measure(
    sink: SocketAddr,
    echo: SocketAddr,
    d: Duration,
) -> anyhow::Result<Figures> {
    let tput1 = throughput(sink, 1, d).await?;
    let tput8 = throughput(sink, 8, d).await?;
    let (p50_us, p99_us) = rtt(echo, 2000).await?;
    let conns_per_s = conn_rate(echo, 4, d).await?;
    Ok(Figures {
        tput1,
        tput8,
        p50_us,
        p99_us,
        conns_per_s,
    })
}

/// RSS of gateway and agent with 0 idle connections, then with each of
/// `steps` held at once (opened on top of the ones before).
async fn idle_memory(
    echo: SocketAddr,
    steps: &[usize],
    gw: u32,
    agent: u32,
) -> anyhow::Result<Vec<Memory>> {
    // The binaries return freed pages to the kernel after 5 s unused: the
    // throughput figures' buffers must be gone from the baseline.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (g0, a0) = (rss_kib(gw)?, rss_kib(agent)?);
    let mut held = Vec::new();
    let mut out = Vec::new();
    for &n in steps {
        while held.len() < n {
            let mut s = TcpStream::connect(echo).await?;
            // one echo proves the connection reached the target, then it idles
            s.write_all(b"i").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            held.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (g1, a1) = (rss_kib(gw)?, rss_kib(agent)?);
        out.push(Memory {
            held: n,
            gw_kib_per_conn: (g1 as f64 - g0 as f64) / n as f64,
            agent_kib_per_conn: (a1 as f64 - a0 as f64) / n as f64,
            gw_total_mib: g1 as f64 / 1024.0,
            agent_total_mib: a1 as f64 / 1024.0,
        });
    }
    Ok(out)
}

/// Measures only once tunnelled connections take all `lanes`, when they
/// should: the agent logged that many lanes up. From its log, not its admin
/// API, which in the WAN lab is in another namespace.
pub(crate) fn wait_lanes(agent: &Agent, data_path: &str, lanes: u8) -> anyhow::Result<()> {
    if data_path != "lane" {
        return Ok(());
    }
    let up = || {
        agent
            .proc
            .lines()
            .iter()
            .filter(|l| l.contains("lane up"))
            .count()
    };
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || up() >= usize::from(lanes)),
        "the agent's lanes did not come up: {} of {lanes}",
        up()
    );
    Ok(())
}

/// One stream through one agent, then `n` more agents on the same gateway
/// pushing one stream each at once: what they get together.
async fn crowd(
    gw: &Gateway,
    transport: Transport,
    args: &Args,
    sink: SocketAddr,
    one: SocketAddr,
    n: usize,
    d: Duration,
) -> anyhow::Result<Crowd> {
    let one_gbit = throughput(one, 1, d).await?;
    let agents: Vec<Agent> = (0..n)
        .map(|_| {
            Agent::start(
                &here,
                gw,
                transport,
                &[format!("sink={sink}")],
                true,
                &settings(&[
                    "log.level=info",
                    &format!("session.data_path={}", args.data_path),
                    &format!("session.lanes={}", args.lanes),
                ]),
            )
        })
        .collect();
    let mut ports = Vec::with_capacity(n);
    for a in &agents {
        ports.push(
            a.wait_leased("sink", Duration::from_secs(120))
                .map_err(anyhow::Error::msg)?,
        );
        wait_lanes(a, &args.data_path, args.lanes)?;
    }
    let sinks: Vec<SocketAddr> = ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let together_gbit = throughput_each(&sinks, d).await?;
    Ok(Crowd {
        agents: n,
        one_gbit,
        together_gbit,
    })
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    Ok(relaygate_tests::load::ProcStats::of(pid)?.rss_kib)
}
