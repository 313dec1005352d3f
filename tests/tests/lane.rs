//! The lanes: tunnelled connections travel on a few TLS connections per
//! agent beside its session, on the gateway's libp2p TCP port. Real processes
//! on loopback.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use libp2p::identity::Keypair;
use rand::RngCore;
use relaygate_common::{
    identity::load_or_create,
    lane::{LaneCount, LaneFlow, LaneSlot, LaneTls},
};
use relaygate_tests::stack::{
    eventually, here, http_get, metric, round_trip, settings, Agent, Echo, Gateway, GatewaySpec,
    Transport,
};

const LEASE: Duration = Duration::from_secs(20);

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

fn agent_metric(agent: &Agent, name: &str) -> Option<f64> {
    metric(&http_get(agent.admin, "/metrics").1, name)
}

/// An agent keeps four lanes by default (`session.lanes`).
const DEFAULT_LANES: f64 = 4.0;

/// Until both ends of `n` lanes are up. The agent's handshake ends a moment
/// before the gateway's; until then connections travel on the session.
fn wait_lanes(gw: &Gateway, agent: &Agent, n: f64) {
    assert!(
        eventually(LEASE, || agent_metric(
            agent,
            "relaygate_agent_lanes_active"
        ) == Some(n)
            && metric(&gw.metrics(), "relaygate_gateway_lanes_active")
                == Some(n)),
        "the lanes never came up: agent {:?}, gateway {:?}",
        agent_metric(agent, "relaygate_agent_lanes_active"),
        metric(&gw.metrics(), "relaygate_gateway_lanes_active")
    );
}

/// Dials a lane to the gateway as `key`, in `slot`; returns the connection
/// once the handshake is done (or the handshake's error).
async fn dial_lane(
    gw: &Gateway,
    key: &Keypair,
    slot: LaneSlot,
) -> Result<tokio::net::TcpStream, String> {
    let tls = LaneTls::new(key).map_err(|e| e.to_string())?;
    let gateway_peer = gw.peer_id.parse().map_err(|e| format!("{e}"))?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.tcp))
        .await
        .map_err(|e| e.to_string())?;
    let (s, _keys) = tls
        .connect(tcp, gateway_peer, slot, LaneFlow::Tuned)
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Whether the gateway closes `s` within `within` (without sending anything).
async fn closed_by_gateway(mut s: tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A gateway (with `gateway` settings), an echo target and an agent (with
/// `agent` settings, over a `t` session) tunnelling to it, and the leased port.
fn echo_tunnel(gateway: &[&str], t: Transport, agent: &[&str]) -> (Gateway, Echo, Agent, u16) {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: settings(gateway),
            ..Default::default()
        },
    );
    let (echo, agent, port) = echo_agent(&gw, t, agent);
    (gw, echo, agent, port)
}

/// An echo target and an agent (with `agent` settings, over a `t` session)
/// tunnelling to it through `gw`, and the leased port.
fn echo_agent(gw: &Gateway, t: Transport, agent: &[&str]) -> (Echo, Agent, u16) {
    let echo = Echo::start();
    let agent = Agent::start(&here, gw, t, &[echo.tunnel("node")], true, &settings(agent));
    let port = agent.wait_leased("node", LEASE).expect("lease");
    (echo, agent, port)
}

/// `n` round trips through `port` at once, each of its own size from `base`
/// bytes up; panics unless every one comes back byte-exact.
fn round_trips_at_once(port: u16, n: usize, base: usize, what: &str) {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let data = random(base + i * 4099);
                round_trip(port, &data).map(|back| back == data)
            })
        })
        .collect();
    for h in handles {
        assert!(
            matches!(h.join(), Ok(Ok(true))),
            "{what}: a round trip failed or differed"
        );
    }
}

#[test]
fn tunnelled_connections_take_the_lane_with_quic_and_tcp_sessions() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    for t in [Transport::Quic, Transport::Tcp] {
        let agent = Agent::start(&here, &gw, t, &[echo.tunnel("node")], true, &[]);
        let port = agent.wait_leased("node", LEASE).expect("lease");
        wait_lanes(&gw, &agent, DEFAULT_LANES);
        round_trips_at_once(port, 16, 256 << 10, &format!("{t:?}"));
        let on_lane = agent_metric(&agent, "relaygate_agent_tunnel_paths_total{path=\"lane\"}");
        assert!(on_lane >= Some(16.0), "{t:?}: lane carried {on_lane:?}");
        assert_eq!(
            agent_metric(
                &agent,
                "relaygate_agent_tunnel_paths_total{path=\"session\"}"
            ),
            None,
            "{t:?}: nothing on the session once the lane is up"
        );
        drop(agent);
        assert!(
            eventually(Duration::from_secs(10), || metric(
                &gw.metrics(),
                "relaygate_gateway_lanes_active"
            ) == Some(0.0)),
            "{t:?}: the lane ends with the session"
        );
    }
}

#[test]
fn a_gateway_without_lanes_carries_tunnels_on_the_session() {
    let (gw, _echo, agent, port) = echo_tunnel(&["session.data_path=session"], Transport::Tcp, &[]);
    agent
        .proc
        .wait_for(|l| l.contains("offers no lane"), LEASE)
        .expect("agent notices");
    let data = random(1 << 20);
    assert!(round_trip(port, &data).expect("round trip") == data);
    assert_eq!(
        agent_metric(
            &agent,
            "relaygate_agent_tunnel_paths_total{path=\"session\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_lanes_active"),
        Some(0.0)
    );
}

#[test]
fn an_agent_that_cannot_reach_the_lane_port_gets_a_lane_on_its_session() {
    // The gateway names a TCP port for lanes that nothing listens on (a
    // firewall, a balancer that forwards UDP only): the agent's lanes never
    // come up, and its connections ride a lane on one session stream, with
    // the same multiplexer and flow control.
    let closed = relaygate_tests::procs::free_tcp_port();
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--advertise".into(), format!("/ip4/127.0.0.1/tcp/{closed}")],
            ..Default::default()
        },
    );
    let (_echo, agent, port) = echo_agent(&gw, Transport::Quic, &[]);
    agent
        .proc
        .wait_for(|l| l.contains("cannot open the lane"), LEASE)
        .expect("the agent's own lanes fail");
    round_trips_at_once(port, 8, 300_000, "session lane");
    assert!(
        agent
            .proc
            .lines()
            .iter()
            .any(|l| l.contains("session lane up")),
        "the gateway opened a lane on the session"
    );
    assert_eq!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_tunnel_paths_total{path=\"session_lane\"}"
        ),
        Some(8.0),
        "every connection took the session lane"
    );
    assert_eq!(
        agent_metric(
            &agent,
            "relaygate_agent_tunnel_paths_total{path=\"session\"}"
        ),
        None,
        "none travelled as a session stream"
    );
}

#[test]
fn lanes_from_strangers_and_garbage_are_refused_and_counted() {
    let (gw, _echo, agent, port) = echo_tunnel(&[], Transport::Quic, &[]);
    wait_lanes(&gw, &agent, DEFAULT_LANES);

    // A valid libp2p identity with no session: the handshake completes (it
    // proves who it is), then the gateway closes the connection.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let closed = rt.block_on(async {
        let s = dial_lane(&gw, &Keypair::generate_ed25519(), LaneSlot::FIRST)
            .await
            .expect("handshake");
        closed_by_gateway(s, Duration::from_secs(5)).await
    });
    assert!(closed, "stranger's lane not closed");

    // A TLS record header followed by garbage.
    let mut raw = TcpStream::connect(("127.0.0.1", gw.tcp)).expect("connect");
    raw.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8])
        .expect("write");
    raw.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);

    let m = gw.metrics();
    assert!(
        eventually(Duration::from_secs(5), || {
            let m = gw.metrics();
            metric(
                &m,
                "relaygate_gateway_refusals_total{reason=\"lane_without_session\"}",
            ) == Some(1.0)
                && metric(
                    &m,
                    "relaygate_gateway_bad_input_total{reason=\"lane_handshake\"}",
                ) >= Some(1.0)
        }),
        "{m}"
    );
    // The member's lanes are untouched.
    let data = random(300_000);
    assert!(round_trip(port, &data).expect("round trip") == data);
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_lanes_active"),
        Some(DEFAULT_LANES)
    );
}

#[test]
fn an_agent_keeps_its_lanes_in_slots_within_the_gateways_limit() {
    let (gw, _echo, agent, port) =
        echo_tunnel(&["session.lanes=2"], Transport::Quic, &["session.lanes=3"]);
    agent
        .proc
        .wait_for(|l| l.contains("the gateway takes fewer lanes"), LEASE)
        .expect("the agent keeps to the gateway's limit");
    wait_lanes(&gw, &agent, 2.0);

    let (key, _) = load_or_create(&agent.dir.path().join("identity.key")).expect("agent key");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let third = LaneCount::new(3)
        .expect("count")
        .slots()
        .nth(2)
        .expect("slot");
    let refused = rt.block_on(async {
        let s = dial_lane(&gw, &key, third).await.expect("handshake");
        closed_by_gateway(s, Duration::from_secs(5)).await
    });
    assert!(refused, "a lane beyond the gateway's limit was kept");
    assert_eq!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"lane_slot_over_limit\"}"
        ),
        Some(1.0)
    );

    // A lane dialled again in its slot replaces the one there: the agent's own
    // slot-0 lane closes, the agent redials it, and that replaces ours.
    let replaced = rt.block_on(async {
        let s = dial_lane(&gw, &key, LaneSlot::FIRST)
            .await
            .expect("handshake");
        closed_by_gateway(s, Duration::from_secs(10)).await
    });
    assert!(replaced, "the agent's redialled lane did not replace ours");
    agent
        .proc
        .wait_for(
            |l| l.contains("lane closed; redialling") && l.contains("slot=0"),
            LEASE,
        )
        .expect("the agent saw its lane replaced");
    wait_lanes(&gw, &agent, 2.0);
    round_trips_at_once(port, 8, 128 << 10, "after the replacement");
    assert_eq!(
        agent_metric(
            &agent,
            "relaygate_agent_tunnel_paths_total{path=\"session\"}"
        ),
        None,
        "all connections took a lane"
    );
}

/// A TCP connection to `to` from `from` that starts a TLS handshake with one
/// byte and goes silent.
fn stalled_handshake(from: std::net::IpAddr, to: u16) -> Option<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&std::net::SocketAddr::new(from, 0).into()).ok()?;
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], to)).into())
        .ok()?;
    (&s).write_all(&[0x16]).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

#[test]
fn stalled_handshakes_from_one_address_leave_agents_their_lanes() {
    // Another address on loopback keeps 200 lane handshakes stalled (every
    // one the gateway times out is opened again) while an agent comes up:
    // that address gets at most half the places (past that, its share), the
    // agent gets all its lanes. Before, 64 stalled handshakes from anywhere
    // held every place, and agents could not dial or redial their lanes.
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: settings(&["guard.connections_per_ip.per_second=0"]),
            ..Default::default()
        },
    );
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, port) = (stop.clone(), gw.tcp);
    let pressure = thread::spawn(move || {
        let mut held = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            // Forget the ones the gateway closed, open new ones up to 200.
            held.retain(|s: &socket2::Socket| {
                let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(s.recv(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            while held.len() < 200 {
                match stalled_handshake(attacker, port) {
                    Some(s) => held.push(s),
                    None => break,
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    thread::sleep(Duration::from_secs(1));
    let (_echo, agent, port) = echo_agent(&gw, Transport::Quic, &[]);
    wait_lanes(&gw, &agent, DEFAULT_LANES);
    let data = random(200_000);
    assert!(round_trip(port, &data).expect("round trip") == data);
    let m = gw.metrics();
    assert!(
        metric(
            &m,
            "relaygate_gateway_refusals_total{reason=\"lane_handshakes_per_source\"}"
        ) >= Some(1.0),
        "the stalling address was held to its share: {m}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = pressure.join();
}
