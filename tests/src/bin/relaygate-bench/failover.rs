//! A fleet of three gateways on a real etcd (issue #16), on loopback
//! addresses 127.0.0.1-3: what a forwarded connection costs against one
//! landing on the gateway that holds the agent, and what a SIGKILLed
//! gateway costs the connections through the two others.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use relaygate_tests::{
    etcd::{self, Etcd},
    fleetkit::{fleet, on_etcd_with, range},
    stack::{eventually, here, http_get, settings, Agent, Gateway, Transport},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{measure, Args, Figures};

const HOSTS: [[u8; 4]; 3] = [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]];
const T: Duration = Duration::from_secs(30);

pub struct FleetFigures {
    /// Through the gateway that holds the agent's one session, then through
    /// another that forwards to it (`gateway.max_sessions = 1`).
    pub direct: Vec<Figures>,
    pub forwarded: Vec<Figures>,
    pub failover: Failover,
}

#[derive(Default)]
pub struct Failover {
    /// 16 KiB round trips on long connections through the two survivors.
    pub round_trips: u64,
    pub failed_round_trips: u64,
    /// New connections (connect, 1-byte echo, close) through the survivors
    /// from the kill on, one every 20 ms to each.
    pub new_connections: u64,
    pub failed_new_connections: u64,
    /// The longest time without a successful new connection through a
    /// survivor, from the kill on.
    pub longest_gap: Duration,
    /// From the SIGKILL until the dead gateway left the fleet's view.
    pub left_view: Duration,
    /// From the restarted gateway being up until it served the port again.
    pub serving_again: Duration,
}

/// The figures, or why they were not taken (no etcd on this machine).
pub fn run(a: &Args, transport: Transport, d: Duration) -> anyhow::Result<Option<FleetFigures>> {
    if etcd::binary().is_none() {
        eprintln!("!!! etcd is not installed (apt-get install etcd-server): the fleet figures are skipped !!!");
        return Ok(None);
    }
    let rt = crate::roles::runtime()?;
    let targets = crate::roles::spawn_targets(&[])?;
    let (sink, echo) = (targets.sink, targets.echo);
    let etcd = Etcd::start();
    let r = range();
    let mut more: Vec<String> = crate::GATEWAY_SETTINGS
        .iter()
        .map(|s| s.to_string())
        .collect();
    more.push("store.etcd.member_ttl=3s".into());
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let mut gws: Vec<Gateway> = HOSTS
        .iter()
        .map(|h| on_etcd_with(&etcd, &ip(h), &r, &more))
        .collect();
    anyhow::ensure!(
        eventually(T, || gws.iter().all(|g| fleet(g).len() == 3)),
        "the three gateways did not see each other"
    );

    // One session, on gateway 1: gateway 2 forwards to it.
    let one = agent(
        &gws[0],
        transport,
        a,
        sink,
        echo,
        &["gateway.max_sessions=1"],
    )?;
    let (sink_port, echo_port) = (leased(&one, "sink")?, leased(&one, "echo")?);
    let at = |h: [u8; 4], port| SocketAddr::from((h, port));
    let mut direct = Vec::new();
    let mut forwarded = Vec::new();
    for run in 0..a.runs {
        eprintln!("fleet run {}/{}", run + 1, a.runs);
        direct.push(rt.block_on(measure(at(HOSTS[0], sink_port), at(HOSTS[0], echo_port), d))?);
        forwarded.push(rt.block_on(measure(
            at(HOSTS[1], sink_port),
            at(HOSTS[1], echo_port),
            d,
        ))?);
    }
    drop(one);

    // Sessions with all three; gateway 2 is SIGKILLed under load.
    let all = agent(&gws[0], transport, a, sink, echo, &[])?;
    let port = leased(&all, "echo")?;
    anyhow::ensure!(
        eventually(T, || sessions(&all) == 3),
        "the agent did not hold all three gateways"
    );
    let mut f = rt.block_on(kill_under_load(&mut gws, port))?;
    // Restarted on its data (same identity): how soon it serves the port again.
    gws[1].crash_and_restart(&here);
    let up = Instant::now();
    let back = rt.block_on(async {
        while up.elapsed() < T {
            if echo_once(at(HOSTS[1], port)).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    anyhow::ensure!(back, "the restarted gateway did not serve the port again");
    f.serving_again = up.elapsed();
    Ok(Some(FleetFigures {
        direct,
        forwarded,
        failover: f,
    }))
}

async fn kill_under_load(gws: &mut [Gateway], port: u16) -> anyhow::Result<Failover> {
    let survivors = [HOSTS[0], HOSTS[2]].map(|h| SocketAddr::from((h, port)));
    let stop = Arc::new(AtomicBool::new(false));
    let (rounds, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for s in survivors {
        for _ in 0..4 {
            let (stop, rounds, failed) = (stop.clone(), rounds.clone(), failed.clone());
            tasks.push(tokio::spawn(keep_echoing(s, stop, rounds, failed)));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    gws[1].proc.kill_hard();
    // New connections through each survivor, every 20 ms, from the kill on.
    let oks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (news, failed_news) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for s in survivors {
        let (stop, oks, news, failed_news) =
            (stop.clone(), oks.clone(), news.clone(), failed_news.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                news.fetch_add(1, Ordering::Relaxed);
                if echo_once(s).await {
                    oks.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now());
                } else {
                    failed_news.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Until the dead one leaves the fleet's view, and a second more.
    let gw1 = gws[0].admin;
    let dead = gws[1].peer_id.clone();
    let left = loop {
        let view = tokio::task::spawn_blocking(move || http_get(gw1, "/v1/fleet").1).await?;
        if !view.contains(&dead) {
            break killed.elapsed();
        }
        anyhow::ensure!(killed.elapsed() < T, "the dead gateway never left the view");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let ended = Instant::now();
    for t in tasks {
        t.await?;
    }
    let mut times = oks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    times.sort();
    let mut gap = Duration::ZERO;
    let mut last = killed;
    for t in times.iter().chain(std::iter::once(&ended)) {
        gap = gap.max(t.saturating_duration_since(last));
        last = *t;
    }
    Ok(Failover {
        round_trips: rounds.load(Ordering::Relaxed),
        failed_round_trips: failed.load(Ordering::Relaxed),
        new_connections: news.load(Ordering::Relaxed),
        failed_new_connections: failed_news.load(Ordering::Relaxed),
        // Both survivors' new connections together: the gap of the slower one shows.
        longest_gap: gap,
        left_view: left,
        serving_again: Duration::ZERO,
    })
}

/// 16 KiB round trips on one connection until `stop`; a failure is counted
/// and the connection made again.
async fn keep_echoing(
    at: SocketAddr,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let chunk = vec![0x5au8; 16 * 1024];
    let mut back = vec![0u8; chunk.len()];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(at).await else {
            failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let round = async {
                s.write_all(&chunk).await?;
                s.read_exact(&mut back).await?;
                anyhow::ensure!(back == chunk, "bytes changed");
                Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(5), round).await {
                Ok(Ok(())) => {
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

async fn echo_once(at: SocketAddr) -> bool {
    let once = async {
        let mut s = TcpStream::connect(at).await?;
        s.write_all(b"n").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::Ok(b == *b"n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), once).await,
        Ok(Ok(true))
    )
}

fn agent(
    gw: &Gateway,
    transport: Transport,
    a: &Args,
    sink: SocketAddr,
    echo: SocketAddr,
    more: &[&str],
) -> anyhow::Result<Agent> {
    let mut set = vec![
        "log.level=info".to_string(),
        "limits.max_connections=20000".into(),
        format!("session.data_path={}", a.data_path),
        format!("session.lanes={}", a.lanes),
    ];
    set.extend(more.iter().map(|s| s.to_string()));
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let agent = Agent::start(
        &here,
        gw,
        transport,
        &[format!("sink={sink}"), format!("echo={echo}")],
        true,
        &settings(&set),
    );
    crate::wait_lanes(&agent, &a.data_path, a.lanes)?;
    Ok(agent)
}

fn leased(agent: &Agent, tunnel: &str) -> anyhow::Result<u16> {
    agent.wait_leased(tunnel, T).map_err(anyhow::Error::msg)
}

fn sessions(agent: &Agent) -> usize {
    let body = http_get(agent.admin, "/v1/advertise").1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["sessions"].as_array().map_or(0, |a| a.len())
}

fn ip(h: &[u8; 4]) -> String {
    std::net::Ipv4Addr::from(*h).to_string()
}
