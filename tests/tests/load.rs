//! Load: 10,000 concurrent tunnelled connections through one gateway and one
//! agent, 200 agents on one gateway, and a soak that opens and closes
//! connections without pause and checks that descriptors and memory come back
//! to their baseline. Each test prints the figures RELIABILITY.md records.
//!
//! The soak runs 60 s by default; `SOAK_SECS=3600` makes it an hour:
//!   SOAK_SECS=3600 cargo test -p relaygate-tests --test load soak -- --nocapture

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use relaygate_tests::{
    load::{self, ProcStats},
    procs::{free_tcp_port, Proc},
    stack::{self, eventually, here, metric, Agent, Gateway, GatewaySpec, Transport},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The load tests measure processes; running them one at a time keeps the
/// figures their own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

/// The echo target in its own process: this one holds the client ends, and
/// each process stays under the open-files hard limit (20,000 here, and only
/// a process with CAP_SYS_RESOURCE may raise it).
fn echo_process() -> (Proc, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args(["tcp-echo", "--listen", &addr.to_string()]);
    let p = Proc::spawn("echo", cmd);
    p.wait_for(|l| l.contains("listening"), Duration::from_secs(10))
        .expect("echo listening");
    (p, addr)
}

fn stats(pid: u32) -> ProcStats {
    ProcStats::of(pid).expect("read /proc")
}

/// A gateway whose per-IP caps and rates allow one loopback client to be everyone.
fn open_gateway(extra: &[&str], port_range: Option<&str>) -> Gateway {
    let mut kv = vec![
        "limits.max_connections_per_tunnel=20000",
        "limits.max_connections_per_source=20000",
        "limits.max_connections_per_ip=1000",
        "guard.tunnel_connections_per_ip.per_second=0",
        "guard.connections_per_ip.per_second=0",
        "relay.max_reservations_per_ip=1000",
    ];
    kv.extend_from_slice(extra);
    Gateway::start(
        &here,
        GatewaySpec {
            extra: stack::settings(&kv),
            port_range: port_range.map(str::to_string),
            ..Default::default()
        },
    )
}

#[test]
fn ten_thousand_connections_through_one_gateway_and_one_agent() {
    const N: usize = 10_000;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Each connection costs this process one descriptor (the client end).
    if !load::require_nofile(
        N as u64 + 1_000,
        "ten_thousand_connections_through_one_gateway_and_one_agent",
    ) {
        return;
    }
    let rt = runtime();
    let (_echo, echo) = echo_process();
    let gw = open_gateway(&[], None);
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("t={echo}")],
        true,
        &stack::settings(&[
            "limits.max_connections=20000",
            "session.max_inbound_streams=16384",
        ]),
    );
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    let (g0, a0) = (stats(gw.proc.pid()), stats(agent.proc.pid()));

    let t = Instant::now();
    let held = rt
        .block_on(load::open_many(public, N, 256))
        .expect("every connection opens and echoes");
    let open_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let (g1, a1) = (stats(gw.proc.pid()), stats(agent.proc.pid()));
    let active = metric(
        &gw.metrics(),
        "relaygate_gateway_connections_active{side=\"Public\"}",
    );
    assert_eq!(active, Some(N as f64), "the gateway holds all of them");
    assert!(g1.fds >= g0.fds + N, "one descriptor per public connection");
    assert!(a1.fds >= a0.fds + N, "one descriptor per target connection");

    // All of them still carry bytes while all are open.
    let (ok, held) = rt.block_on(load::ping_all(held, 256));
    assert_eq!(ok, N, "every held connection still echoes");
    let g2 = stats(gw.proc.pid());
    drop(held);

    let back = eventually(Duration::from_secs(30), || {
        stats(gw.proc.pid()).fds <= g0.fds + 8 && stats(agent.proc.pid()).fds <= a0.fds + 8
    });
    let (g3, a3) = (stats(gw.proc.pid()), stats(agent.proc.pid()));
    println!(
        "LOAD {N} connections opened in {open_secs:.1} s ({:.0}/s)\n  gateway before {}\n  gateway holding {}  ({:.1} KiB/conn)\n  gateway after a ping on each {}\n  gateway after close {}\n  agent before {}\n  agent holding {}  ({:.1} KiB/conn)\n  agent after close {}",
        N as f64 / open_secs,
        g0.describe(),
        g1.describe(),
        (g1.rss_kib as f64 - g0.rss_kib as f64) / N as f64,
        g2.describe(),
        g3.describe(),
        a0.describe(),
        a1.describe(),
        (a1.rss_kib as f64 - a0.rss_kib as f64) / N as f64,
        a3.describe(),
    );
    assert!(
        back,
        "descriptors return to their baseline once the connections close"
    );
}

#[test]
fn two_hundred_agents_on_one_gateway() {
    const AGENTS: usize = 200;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !load::require_nofile(4_096, "two_hundred_agents_on_one_gateway") {
        return;
    }
    let rt = runtime();
    let (_echo, echo) = echo_process();
    // Outside the ephemeral range, so no client socket holds one of them.
    let gw = open_gateway(&[], Some("21000-21499"));
    let g0 = stats(gw.proc.pid());
    let t = Instant::now();
    // All 200 run on this 2-core machine (in production each has its own):
    // started in waves, so start-up work does not starve the sessions.
    let mut agents: Vec<Agent> = Vec::with_capacity(AGENTS);
    let mut ports: Vec<u16> = Vec::with_capacity(AGENTS);
    for _ in 0..AGENTS / 25 {
        let wave: Vec<Agent> = (0..25)
            .map(|_| {
                Agent::start(
                    &here,
                    &gw,
                    Transport::Quic,
                    &[format!("t={echo}")],
                    true,
                    &stack::settings(&["gateway.dial_timeout=20s"]),
                )
            })
            .collect();
        for a in &wave {
            ports.push(a.wait_leased("t", Duration::from_secs(120)).expect("lease"));
        }
        agents.extend(wave);
    }
    let up_secs = t.elapsed().as_secs_f64();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), AGENTS, "every agent has its own port");
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_sessions_active"),
        Some(AGENTS as f64)
    );
    // Every agent keeps its four lanes (the gateway once took 64 in all).
    let lanes = (4 * AGENTS) as f64;
    assert!(
        eventually(Duration::from_secs(60), || metric(
            &gw.metrics(),
            "relaygate_gateway_lanes_active"
        ) == Some(lanes)),
        "lanes up: {:?} of {lanes}",
        metric(&gw.metrics(), "relaygate_gateway_lanes_active")
    );

    // A connection through every agent at once.
    let ok = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for p in ports.clone() {
            set.spawn(async move {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p)).await?;
                let msg = format!("through {p}");
                s.write_all(msg.as_bytes()).await?;
                s.shutdown().await?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await?;
                Ok::<bool, std::io::Error>(back == msg.as_bytes())
            });
        }
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            ok += usize::from(matches!(r, Ok(Ok(true))));
        }
        ok
    });
    assert_eq!(
        ok, AGENTS,
        "every agent's port carries a byte-exact round trip"
    );
    assert_eq!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_tunnel_paths_total{path=\"lane\"}"
        ),
        Some(AGENTS as f64),
        "every connection took a lane"
    );
    std::thread::sleep(Duration::from_secs(2));
    let g1 = stats(gw.proc.pid());
    let agent_rss: u64 = agents.iter().map(|a| stats(a.proc.pid()).rss_kib).sum();
    println!(
        "LOAD {AGENTS} agents up with leases in {up_secs:.1} s\n  gateway before {}\n  gateway with {AGENTS} sessions {}  ({:.0} KiB/session)\n  agents: {:.1} MiB RSS each on average",
        g0.describe(),
        g1.describe(),
        (g1.rss_kib as f64 - g0.rss_kib as f64) / AGENTS as f64,
        agent_rss as f64 / 1024.0 / AGENTS as f64,
    );
    drop(agents);
    assert!(
        eventually(Duration::from_secs(30), || metric(
            &gw.metrics(),
            "relaygate_gateway_sessions_active"
        ) == Some(0.0)),
        "sessions end when their agents go"
    );
    assert!(
        eventually(Duration::from_secs(30), || stats(gw.proc.pid()).fds
            <= g0.fds + 8),
        "the gateway's descriptors return to their baseline: {}",
        stats(gw.proc.pid()).describe()
    );
}

/// Opens, uses and closes connections until `stop`: random sizes, every
/// byte checked, one in eight ended by a reset instead of a close.
async fn churn(addr: SocketAddr, stop: Arc<AtomicBool>, done: Arc<AtomicU64>, bad: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let (size, reset, fill) = {
            let mut r = rand::rng();
            (
                r.random_range(1..32 * 1024),
                r.random_ratio(1, 8),
                r.random::<u8>(),
            )
        };
        let res = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let data = vec![fill; size];
            s.write_all(&data).await?;
            let got = &mut buf[..size];
            tokio::time::timeout(Duration::from_secs(20), s.read_exact(got))
                .await
                .map_err(|_| std::io::Error::other("echo timed out"))??;
            if got.iter().any(|b| *b != fill) {
                return Err(std::io::Error::other("echo differs"));
            }
            if reset {
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        match res {
            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("soak connection failed: {e}");
                bad.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[test]
fn soak_keeps_descriptors_and_memory_at_their_baseline() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !load::require_nofile(4_096, "soak_keeps_descriptors_and_memory_at_their_baseline") {
        return;
    }
    let rt = runtime();
    let (_echo, echo) = echo_process();
    let gw = open_gateway(&[], None);
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("t={echo}")],
        true,
        &[],
    );
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    let (done, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let run = |secs: u64| {
        let stop = Arc::new(AtomicBool::new(false));
        rt.block_on(async {
            let workers: Vec<_> = (0..16)
                .map(|_| tokio::spawn(churn(public, stop.clone(), done.clone(), bad.clone())))
                .collect();
            // A sample every tenth of the run shows a trend, if any.
            let step = Duration::from_secs(secs)
                .div_f64(10.0)
                .max(Duration::from_secs(1));
            let end = tokio::time::Instant::now() + Duration::from_secs(secs);
            while tokio::time::Instant::now() < end {
                tokio::time::sleep(step.min(end - tokio::time::Instant::now())).await;
                println!(
                    "  soak {:>7} connections: gateway {}; agent {}",
                    done.load(Ordering::Relaxed),
                    stats(gw.proc.pid()).describe(),
                    stats(agent.proc.pid()).describe()
                );
            }
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                let _ = w.await;
            }
        });
        // Let the last closes travel through both processes.
        std::thread::sleep(Duration::from_secs(3));
        (stats(gw.proc.pid()), stats(agent.proc.pid()))
    };
    // Warm up: buffers, allocator arenas and metric label sets exist
    // afterwards, and quinn has used each of the agent's 4,096 inbound stream
    // slots once (it keeps about 1 KiB of state per slot it has used).
    let (g0, a0) = run(12);
    let warm = done.load(Ordering::Relaxed);
    let (g1, a1) = run(secs);
    let n = done.load(Ordering::Relaxed) - warm;
    println!(
        "SOAK {secs} s, {n} connections ({:.0}/s), {} failed\n  gateway baseline {}\n  gateway after    {}\n  agent baseline   {}\n  agent after      {}",
        n as f64 / secs as f64,
        bad.load(Ordering::Relaxed),
        g0.describe(),
        g1.describe(),
        a0.describe(),
        a1.describe(),
    );
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "no connection lost a byte or failed"
    );
    assert!(n > 0);
    assert!(g1.fds <= g0.fds + 4, "gateway descriptors back to baseline");
    assert!(a1.fds <= a0.fds + 4, "agent descriptors back to baseline");
    // A leak of even 300 bytes per connection would show over a minute of churn.
    for (who, before, after) in [("gateway", g0, g1), ("agent", a0, a1)] {
        assert!(
            after.rss_kib <= before.rss_kib + 8 * 1024,
            "{who} memory back near its baseline: {} KiB -> {} KiB",
            before.rss_kib,
            after.rss_kib
        );
    }
}
