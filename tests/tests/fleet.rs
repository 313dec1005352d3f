//! A fleet of three gateways on a real etcd (issue #16): an agent given one
//! gateway holds sessions with all three and each serves its port; a
//! SIGKILLed gateway costs the transfers through the others nothing; with
//! one session, every gateway forwards to the one that holds the agent,
//! keeping the client's address, and clients that stop reading on forwarded
//! connections are ended while honest ones go on.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use relaygate_tests::{
    etcd::{require_etcd, Etcd},
    fleetkit::{echo_agent, echo_through, fleet, on_etcd_with, range},
    load::{flood_or_echo, round_trips},
    stack::{agent_peer_id, eventually, here, http_get, metric, Agent, Echo, Gateway, Transport},
};
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(20);
const HOSTS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

fn three_gateways(etcd: &Etcd) -> Vec<Gateway> {
    let r = range();
    let ttl = ["store.etcd.member_ttl=3s"];
    let gws: Vec<Gateway> = HOSTS
        .iter()
        .map(|h| on_etcd_with(etcd, h, &r, &ttl))
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || gws
            .iter()
            .all(|g| fleet(g).len() == 3)),
        "every gateway sees three"
    );
    gws
}

/// Strings at `pick` in each item of the array at `list` of the agent's `/v1/advertise`.
fn advertise_strings(
    agent: &Agent,
    list: impl Fn(&serde_json::Value) -> &serde_json::Value,
    pick: impl Fn(&serde_json::Value) -> Option<&str>,
) -> Vec<String> {
    let body = http_get(agent.admin, "/v1/advertise").1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    list(&v)
        .as_array()
        .map(|a| a.iter().filter_map(|x| pick(x).map(String::from)).collect())
        .unwrap_or_default()
}

/// Gateways the agent has a session with.
fn sessions(agent: &Agent) -> Vec<String> {
    advertise_strings(agent, |v| &v["sessions"], |s| s["gateway"].as_str())
}

/// The first tunnel's advertised addresses.
fn advertised(agent: &Agent) -> Vec<String> {
    advertise_strings(agent, |v| &v["tunnels"][0]["addresses"], |a| a.as_str())
}

/// Round trips on one connection through `host:port` until `stop`;
/// `Err` names the first that failed.
fn keep_echoing(host: &str, port: u16, stop: Arc<AtomicBool>) -> Result<usize, String> {
    let mut s = TcpStream::connect((host, port)).map_err(|e| format!("{host}: connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut n = 0;
    let chunk = vec![0x5au8; 16 * 1024];
    let mut back = vec![0u8; chunk.len()];
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&chunk)
            .map_err(|e| format!("{host}: write after {n}: {e}"))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("{host}: read after {n}: {e}"))?;
        if back != chunk {
            return Err(format!("{host}: bytes changed after {n}"));
        }
        n += 1;
    }
    Ok(n)
}

#[test]
fn an_agent_holds_every_gateway_and_a_dead_one_costs_nothing() {
    if !require_etcd("an_agent_holds_every_gateway_and_a_dead_one_costs_nothing") {
        return;
    }
    let etcd = Etcd::start();
    let mut gws = three_gateways(&etcd);
    let echo = Echo::start();
    // Given gateway 1 only.
    let agent = echo_agent(&gws[0], &echo, &[]);
    let port = agent.wait_leased("echo", T).expect("lease");
    assert!(
        eventually(T, || sessions(&agent).len() == 3),
        "a session with every gateway: {:?}",
        sessions(&agent)
    );
    for g in &gws {
        assert!(sessions(&agent).contains(&g.peer_id));
    }
    // One port on each, and an address through each advertised.
    assert!(
        eventually(Duration::from_secs(5), || {
            let a = advertised(&agent);
            HOSTS
                .iter()
                .all(|h| a.contains(&format!("/ip4/{h}/tcp/{port}")))
        }),
        "advertised through every gateway: {:?}",
        advertised(&agent)
    );
    for h in HOSTS {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        assert!(
            echo_through(h, port, &data) == data,
            "byte-exact through {h}"
        );
    }
    // The gateways' forwarders listen nowhere: each serves the port itself.
    for g in &gws {
        assert_eq!(
            metric(
                &g.metrics(),
                "relaygate_gateway_forwarded_connections_total{reason=\"in\"}"
            )
            .unwrap_or(0.0),
            0.0
        );
    }

    // Transfers through gateways 1 and 3 while gateway 2 is SIGKILLed.
    let stop = Arc::new(AtomicBool::new(false));
    let runners: Vec<_> = [HOSTS[0], HOSTS[2]]
        .into_iter()
        .map(|h| {
            let stop = stop.clone();
            std::thread::spawn(move || keep_echoing(h, port, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    gws[1].proc.kill_hard();
    // New connections through the survivors, at once and throughout.
    let mut failed_new = 0;
    while killed.elapsed() < Duration::from_secs(4) {
        for h in [HOSTS[0], HOSTS[2]] {
            if echo_through(h, port, b"new") != b"new" {
                failed_new += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for r in runners {
        let done = r
            .join()
            .expect("runner")
            .expect("a transfer through a survivor failed");
        assert!(done > 10, "transfers moved: {done}");
    }
    assert_eq!(
        failed_new, 0,
        "new connections through the survivors failed"
    );
    assert!(
        eventually(Duration::from_secs(10), || !fleet(&gws[0])
            .iter()
            .any(|(id, _)| *id == gws[1].peer_id)),
        "the dead gateway left the fleet's view"
    );
    eprintln!(
        "gateway 2 left the view {:?} after its SIGKILL",
        killed.elapsed()
    );

    // Restarted: it serves the same port again within 5 s of coming up.
    gws[1].crash_and_restart(&here);
    let up = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || echo_through(
            HOSTS[1], port, b"back"
        ) == b"back"),
        "the restarted gateway serves the port again"
    );
    eprintln!(
        "the restarted gateway served the port {:?} after it came up",
        up.elapsed()
    );
}

#[test]
fn with_one_session_every_gateway_forwards_to_it_keeping_the_source() {
    if !require_etcd("with_one_session_every_gateway_forwards_to_it_keeping_the_source") {
        return;
    }
    let etcd = Etcd::start();
    let gws = three_gateways(&etcd);
    let echo = Echo::start();
    let agent = echo_agent(
        &gws[0],
        &echo,
        &["--set".into(), "gateway.max_sessions=1".into()],
    );
    let port = agent.wait_leased("echo", T).expect("lease");
    let agent_id = agent_peer_id(agent.dir.path());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sessions(&agent),
        vec![gws[0].peer_id.clone()],
        "one session"
    );
    // Every gateway answers on the port, the two without a session by forwarding.
    for (i, h) in HOSTS.iter().enumerate() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
        assert!(
            eventually(Duration::from_secs(10), || echo_through(h, port, &data)
                == data),
            "byte-exact through gateway {} ({h})",
            i + 1
        );
    }
    for g in &gws[1..] {
        let m = g.metrics();
        assert!(
            metric(
                &m,
                "relaygate_gateway_forwarded_connections_total{reason=\"out\"}"
            )
            .unwrap_or(0.0)
                >= 1.0,
            "gateway {} forwarded",
            g.peer_id
        );
        // On its lane to gateway 1, not a libp2p stream.
        assert!(
            metric(
                &m,
                "relaygate_gateway_tunnel_paths_total{path=\"fleet_lane\"}"
            )
            .unwrap_or(0.0)
                >= 1.0,
            "gateway {} forwarded on a lane",
            g.peer_id
        );
    }
    // The client's own address arrives at the gateway holding the agent.
    let client = std::net::SocketAddr::from(([127, 0, 0, 9], 0));
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.bind(&client.into()).expect("bind 127.0.0.9");
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 3], port)).into())
        .expect("connect through gateway 3");
    let mut s: TcpStream = sock.into();
    s.write_all(b"from .9").expect("write");
    let mut back = [0u8; 7];
    s.read_exact(&mut back).expect("read");
    assert_eq!(&back, b"from .9");
    let agents = http_get(gws[0].admin, "/v1/agents").1;
    assert!(
        agents.contains(&agent_id) && agents.contains("127.0.0.9:"),
        "gateway 1 saw the client's address through gateway 3's forward: {agents}"
    );
    assert!(
        metric(
            &gws[0].metrics(),
            "relaygate_gateway_forwarded_connections_total{reason=\"in\"}"
        )
        .unwrap_or(0.0)
            >= 3.0
    );
}

#[test]
fn clients_that_stop_reading_on_forwarded_connections_freeze_nobody() {
    if !require_etcd("clients_that_stop_reading_on_forwarded_connections_freeze_nobody") {
        return;
    }
    const STALLED: usize = 40;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let etcd = Etcd::start();
    let r = range();
    // One address makes every client here: let it use whole tunnels.
    let open = [
        "guard.tunnel_connections_per_ip.per_second=0",
        "limits.max_connections_per_source=4096",
        "limits.idle_timeout=0s",
    ];
    let gw1 = on_etcd_with(&etcd, HOSTS[0], &r, &open);
    let gw2 = on_etcd_with(&etcd, HOSTS[1], &r, &open);
    let target = rt.block_on(flood_or_echo());
    let echo = Echo::start();
    // Two agents hold gateway 1 only: gateway 2 forwards everything. Each
    // agent's share of stalls is 2 streams; two agents' shares together
    // would fill the one link between the gateways.
    let one = || vec!["--set".to_string(), "gateway.max_sessions=1".to_string()];
    let agent = Agent::start(
        &here,
        &gw1,
        Transport::Quic,
        &[format!("flood={target}"), echo.tunnel("echo")],
        true,
        &one(),
    );
    let twin = Agent::start(
        &here,
        &gw1,
        Transport::Quic,
        &[format!("flood={target}")],
        true,
        &one(),
    );
    let flood = agent.wait_leased("flood", T).expect("flood lease");
    let other = agent.wait_leased("echo", T).expect("echo lease");
    let flood2 = twin
        .wait_leased("flood", T)
        .expect("second agent's flood lease");
    assert!(
        eventually(T, || echo_through(HOSTS[1], other, b"fwd") == b"fwd"),
        "gateway 2 forwards"
    );
    let (base_same, base_other) = rt.block_on(async {
        (
            round_trips(HOSTS[1], flood, b'E', 50).await,
            round_trips(HOSTS[1], other, b'E', 50).await,
        )
    });
    // Clients of gateway 2 that ask for the floods and never read.
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..STALLED {
            let flood = if i % 2 == 0 { flood } else { flood2 };
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
            let mut s = sock
                .connect(std::net::SocketAddr::from(([127, 0, 0, 2], flood)))
                .await
                .expect("connect");
            s.write_all(b"F").await.expect("write");
            held.push(s);
        }
        held
    });
    let stalled = || {
        gws_sum(
            &[&gw1, &gw2],
            "relaygate_gateway_refusals_total{reason=\"stalled_reader\"}",
        )
    };
    // Every stalled forwarded connection past the share is ended, on the
    // forwarding gateway or the one holding the agent.
    assert!(
        eventually(Duration::from_secs(30), || stalled()
            >= (STALLED - 4) as f64),
        "stalled forwarded connections ended: {}",
        stalled()
    );
    // Honest round trips through the forwarding gateway, on the flooded
    // tunnel and the other: each within a second (asserted as they run).
    let (same, other_t) = rt.block_on(async {
        (
            round_trips(HOSTS[1], flood, b'E', 100).await,
            round_trips(HOSTS[1], other, b'E', 100).await,
        )
    });
    let p99 = |t: &[Duration]| t[t.len() * 99 / 100];
    eprintln!(
        "forwarded: {} of {STALLED} stalled clients ended; round trip p99 same tunnel {:?} -> {:?}, other {:?} -> {:?}",
        stalled(),
        p99(&base_same),
        p99(&same),
        p99(&base_other),
        p99(&other_t)
    );
    drop(held);
}

fn gws_sum(gws: &[&Gateway], name: &str) -> f64 {
    gws.iter()
        .map(|g| metric(&g.metrics(), name).unwrap_or(0.0))
        .sum()
}

#[test]
fn a_gateway_without_lanes_is_forwarded_to_on_libp2p_streams() {
    if !require_etcd("a_gateway_without_lanes_is_forwarded_to_on_libp2p_streams") {
        return;
    }
    let etcd = Etcd::start();
    let r = range();
    // Gateway 1 takes no lanes (its record says so): gateway 2 forwards to
    // it on a libp2p stream instead.
    let gws = [
        on_etcd_with(
            &etcd,
            HOSTS[0],
            &r,
            &["store.etcd.member_ttl=3s", "session.data_path=session"],
        ),
        on_etcd_with(&etcd, HOSTS[1], &r, &["store.etcd.member_ttl=3s"]),
    ];
    assert!(
        eventually(Duration::from_secs(10), || gws
            .iter()
            .all(|g| fleet(g).len() == 2)),
        "both gateways see two"
    );
    let echo = Echo::start();
    let agent = echo_agent(
        &gws[0],
        &echo,
        &["--set".into(), "gateway.max_sessions=1".into()],
    );
    let port = agent.wait_leased("echo", T).expect("lease");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
    assert!(
        eventually(Duration::from_secs(10), || echo_through(
            HOSTS[1], port, &data
        ) == data),
        "byte-exact through gateway 2's forward"
    );
    let m = gws[1].metrics();
    assert!(
        metric(
            &m,
            "relaygate_gateway_tunnel_paths_total{path=\"fleet_stream\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "forwarded on a libp2p stream"
    );
    assert_eq!(
        metric(
            &m,
            "relaygate_gateway_tunnel_paths_total{path=\"fleet_lane\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
}
