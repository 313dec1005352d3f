//! The lane: tunnelled connections travel on one TLS connection per agent
//! beside its session, on the gateway's libp2p TCP port. Real processes on
//! loopback.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use libp2p::identity::Keypair;
use rand::RngCore;
use relaygate_common::lane::LaneTls;
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

/// Until both ends of the lane are up. The agent's handshake ends a moment
/// before the gateway's; until then connections travel on the session.
fn wait_lane(gw: &Gateway, agent: &Agent) {
    agent
        .proc
        .wait_for(|l| l.contains("lane up"), LEASE)
        .expect("lane up");
    assert!(
        eventually(LEASE, || metric(
            &gw.metrics(),
            "relaygate_gateway_lanes_active"
        ) == Some(1.0)),
        "the gateway never took the lane"
    );
}

#[test]
fn tunnelled_connections_take_the_lane_with_quic_and_tcp_sessions() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    for t in [Transport::Quic, Transport::Tcp] {
        let agent = Agent::start(&here, &gw, t, &[echo.tunnel("node")], true, &[]);
        let port = agent.wait_leased("node", LEASE).expect("lease");
        wait_lane(&gw, &agent);
        let handles: Vec<_> = (0..16)
            .map(|i| {
                thread::spawn(move || {
                    let data = random((256 << 10) + i * 4099);
                    round_trip(port, &data).map(|back| back == data)
                })
            })
            .collect();
        for h in handles {
            assert!(
                matches!(h.join(), Ok(Ok(true))),
                "{t:?}: a round trip failed or differed"
            );
        }
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
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: settings(&["session.data_path=session"]),
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
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
fn lanes_from_strangers_and_garbage_are_refused_and_counted() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
    wait_lane(&gw, &agent);

    // A valid libp2p identity with no session: the handshake completes (it
    // proves who it is), then the gateway closes the connection.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let gateway_peer = gw.peer_id.parse().expect("gateway peer id");
    let closed = rt.block_on(async {
        let tls = LaneTls::new(&Keypair::generate_ed25519()).expect("tls");
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.tcp))
            .await
            .expect("connect");
        let (mut s, _keys) = tls.connect(tcp, gateway_peer).await.expect("handshake");
        let mut buf = [0u8; 16];
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
    });
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "stranger's lane not closed: {closed:?}"
    );

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
    // The member's lane is untouched.
    let data = random(300_000);
    assert!(round_trip(port, &data).expect("round trip") == data);
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_lanes_active"),
        Some(1.0)
    );
}
