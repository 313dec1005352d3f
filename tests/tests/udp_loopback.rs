//! UDP tunnels on loopback: real gateway and agent processes, a real UDP
//! echo behind the agent, real sockets on the leased port. A thousand flows
//! at once, each from its own address; flows expire after their idle
//! timeout; the agent's loss and return end and restore flows; the agent
//! advertises `/udp/<port>/quic-v1`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use relaygate_tests::{
    stack::{self, eventually, here, http_get, metric, Agent, Gateway, GatewaySpec, Transport},
    udpkit,
};

const LEASE: Duration = Duration::from_secs(20);

fn gateway(kv: &[&str]) -> Gateway {
    Gateway::start(
        &here,
        GatewaySpec {
            extra: stack::settings(kv),
            ..Default::default()
        },
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `n` distinct loopback sources, 127.1.x.y, so per-source shares hold.
fn sources(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1);
            SocketAddr::new(IpAddr::V4(ip), 0)
        })
        .collect()
}

/// Waits for the agent's datagram channel to be up at the gateway.
fn wait_channel(gw: &Gateway) {
    assert!(
        eventually(Duration::from_secs(10), || gauge(
            &gw.metrics(),
            "relaygate_gateway_udp_channels_active"
        ) == 1.0),
        "the agent's datagram channel comes up"
    );
}

/// Flows the gateway holds, proved or not.
fn open_flows(m: &str) -> f64 {
    gauge(m, "relaygate_gateway_udp_flows_unvalidated")
        + gauge(m, "relaygate_gateway_udp_flows_validated")
}

fn gauge(body: &str, name: &str) -> f64 {
    metric(body, name).unwrap_or(0.0)
}

#[test]
fn a_thousand_flows_at_once_each_echoed_byte_exact_from_its_own_address() {
    let rt = rt();
    let (echo_addr, echo) = rt
        .block_on(udpkit::echo_server("127.0.0.1:0".parse().expect("addr")))
        .expect("echo");
    // Plain UDP never proves its address the QUIC way, so every flow here
    // stays unvalidated: room for all of them (the default, 512, bounds
    // what a spoofed flood holds).
    let gw = gateway(&["udp.max_unvalidated_per_tunnel=1000"]);
    let tunnel = format!("u=127.0.0.1:{},proto=both", echo_addr.port());
    let agent = Agent::start(&here, &gw, Transport::Quic, &[tunnel], true, &[]);
    let port = agent.wait_leased("u", LEASE).expect("lease");
    // The agent advertises the QUIC address beside the TCP one.
    let (_, adv) = http_get(agent.admin, "/v1/advertise");
    assert!(
        adv.contains(&format!("/udp/{port}/quic-v1")),
        "advertised: {adv}"
    );
    assert!(adv.contains(&format!("/tcp/{port}")), "advertised: {adv}");
    assert!(
        eventually(Duration::from_secs(10), || gauge(
            &gw.metrics(),
            "relaygate_gateway_udp_channels_active"
        ) == 1.0),
        "the agent's datagram channel comes up"
    );

    let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let srcs = sources(1000);
    let report = rt.block_on(udpkit::flows(
        target,
        &srcs,
        3,
        200,
        Duration::from_secs(20),
    ));
    assert_eq!(
        report.flows_ok,
        1000,
        "every flow echoed: {:?}",
        report.to_json()
    );
    assert_eq!(report.mismatches, 0, "no corrupt datagram");
    // The echo saw each flow from the agent's socket of its own: 1000 peers.
    assert!(
        echo.peers().len() >= 1000,
        "the node saw {} flows",
        echo.peers().len()
    );
    let m = gw.metrics();
    let open = gauge(&m, "relaygate_gateway_udp_flows_unvalidated")
        + gauge(&m, "relaygate_gateway_udp_flows_validated");
    assert_eq!(open, 1000.0, "the gateway holds the 1000 flows");
    assert!(
        eventually(Duration::from_secs(5), || gauge(
            &stack::http_get(agent.admin, "/metrics").1,
            "relaygate_agent_udp_flows_active"
        ) == 1000.0),
        "the agent holds the 1000 flows"
    );
    // Non-QUIC UDP never proves its address: held to 1x, so never more out than in.
    let m = gw.metrics();
    let inb = metric(
        &m,
        "relaygate_gateway_udp_unvalidated_bytes_total{direction=\"inbound\"}",
    )
    .unwrap_or(0.0);
    let out = metric(
        &m,
        "relaygate_gateway_udp_unvalidated_bytes_total{direction=\"outbound\"}",
    )
    .unwrap_or(0.0);
    assert!(
        inb > 0.0 && out <= inb,
        "no amplification: {out} out for {inb} in"
    );
    // proto=both: the same port number takes TCP too.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[test]
fn flows_expire_after_their_idle_timeout_and_the_next_datagram_opens_a_new_one() {
    let rt = rt();
    let (echo_addr, _echo) = rt
        .block_on(udpkit::echo_server("127.0.0.1:0".parse().expect("addr")))
        .expect("echo");
    let gw = gateway(&["udp.idle_timeout=1s", "udp.handshake_timeout=1s"]);
    let tunnel = format!("u=127.0.0.1:{},proto=udp", echo_addr.port());
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[tunnel], true, &[]);
    let port = agent.wait_leased("u", LEASE).expect("lease");
    // proto=udp: no TCP listener on the port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_channel(&gw);
    let srcs = sources(20);
    let r = rt.block_on(udpkit::flows(target, &srcs, 1, 64, Duration::from_secs(10)));
    assert_eq!(r.flows_ok, 20, "{:?}", r.to_json());
    // Each flow's first datagram (the one OPEN carries) reached the node:
    // none waited for a retransmission, none was dropped at the new socket.
    assert_eq!(r.retransmits, 0, "{:?}", r.to_json());
    assert_eq!(
        metric(
            &http_get(agent.admin, "/metrics").1,
            "relaygate_agent_udp_dropped_total{reason=\"socket_full\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    let flows = open_flows;
    assert_eq!(flows(&gw.metrics()), 20.0);
    assert!(
        eventually(Duration::from_secs(4), || flows(&gw.metrics()) == 0.0
            && gauge(
                &http_get(agent.admin, "/metrics").1,
                "relaygate_agent_udp_flows_active"
            ) == 0.0),
        "both sides let idle flows go within 3 s of a 1 s timeout"
    );
    assert!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_udp_flows_closed_total{reason=\"idle\"}"
        )
        .unwrap_or(0.0)
            >= 20.0
    );
    let r = rt.block_on(udpkit::flows(
        target,
        &srcs[..1],
        1,
        64,
        Duration::from_secs(10),
    ));
    assert_eq!(r.flows_ok, 1, "a new datagram opens a new flow");
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_udp_flows_opened_total"),
        Some(21.0)
    );
}

#[test]
fn the_agents_loss_ends_its_flows_and_its_return_restores_them() {
    let rt = rt();
    let (echo_addr, _echo) = rt
        .block_on(udpkit::echo_server("127.0.0.1:0".parse().expect("addr")))
        .expect("echo");
    let gw = gateway(&[]);
    let tunnel = format!("u=127.0.0.1:{},proto=udp", echo_addr.port());
    let mut agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        std::slice::from_ref(&tunnel),
        true,
        &[],
    );
    let port = agent.wait_leased("u", LEASE).expect("lease");
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let srcs = sources(10);
    wait_channel(&gw);
    let r = rt.block_on(udpkit::flows(
        target,
        &srcs,
        2,
        100,
        Duration::from_secs(10),
    ));
    assert_eq!(r.flows_ok, 10, "{:?}", r.to_json());

    // SIGKILL: no goodbye. The session idles out, its flows end.
    agent.proc.kill_hard();
    let dir = agent.dir;
    let flows = open_flows;
    assert!(
        eventually(Duration::from_secs(15), || flows(&gw.metrics()) == 0.0
            && gauge(&gw.metrics(), "relaygate_gateway_udp_channels_active")
                == 0.0),
        "the lost agent's flows and channel end"
    );
    // Meanwhile the port answers nothing: datagrams are dropped, not bounced.
    let r = rt.block_on(udpkit::flows(
        target,
        &srcs[..2],
        1,
        64,
        Duration::from_millis(800),
    ));
    assert_eq!(r.flows_ok, 0, "nothing answers while the agent is away");

    let agent = Agent::start_in(&here, &gw, Transport::Quic, &[tunnel], true, &[], dir);
    assert_eq!(
        agent.wait_leased("u", LEASE).expect("lease"),
        port,
        "same lease"
    );
    wait_channel(&gw);
    let r = rt.block_on(udpkit::flows(
        target,
        &srcs,
        2,
        100,
        Duration::from_secs(10),
    ));
    assert_eq!(r.flows_ok, 10, "flows work again: {:?}", r.to_json());
}

/// A rust-libp2p node listening on QUIC, reached through the UDP tunnel at
/// the gateway's `/udp/<port>/quic-v1/p2p/<node>`: its own identity end to
/// end, pings, identify and a byte-exact stream.
#[test]
fn a_quic_node_is_reached_through_its_udp_tunnel_with_its_own_peer_id() {
    use relaygate_tests::procs::Proc;
    let node_port = relaygate_tests::procs::free_udp_port();
    let lab_node = env!("CARGO_BIN_EXE_lab-node");
    let mut cmd = std::process::Command::new(lab_node);
    cmd.args([
        "listen",
        "--listen",
        &format!("/ip4/127.0.0.1/udp/{node_port}/quic-v1"),
        "--seed",
        "7",
    ]);
    let node = Proc::spawn("node", cmd);
    node.wait_for(|l| l.contains("\"listening\""), Duration::from_secs(20))
        .expect("node up");
    let node_id = stack::seed_peer_id(7);
    let gw = gateway(&[]);
    let tunnel = format!("node=127.0.0.1:{node_port},proto=udp");
    let agent = Agent::start(&here, &gw, Transport::Quic, &[tunnel], true, &[]);
    let port = agent.wait_leased("node", LEASE).expect("lease");
    wait_channel(&gw);
    let mut dial = std::process::Command::new(lab_node);
    dial.args([
        "dial",
        "--addr",
        &format!("/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{node_id}"),
        "--pings",
        "1",
        "--echo-bytes",
        "1000000",
        "--timeout-secs",
        "30",
    ]);
    let mut d = Proc::spawn("dialer", dial);
    let status = d.wait_exit(Duration::from_secs(40));
    let lines = d.lines().join("\n");
    assert!(status.is_some_and(|s| s.success()), "dial failed: {lines}");
    assert!(lines.contains("\"identify\""), "identify: {lines}");
    assert!(lines.contains("\"echo\""), "echo: {lines}");
    // The QUIC handshake proved the remote's address: the flow is validated,
    // and nothing went out to it unvalidated beyond what it sent.
    let m = gw.metrics();
    assert!(
        metric(&m, "relaygate_gateway_udp_flows_opened_total").unwrap_or(0.0) >= 1.0,
        "a flow was opened"
    );
    let inb = metric(
        &m,
        "relaygate_gateway_udp_unvalidated_bytes_total{direction=\"inbound\"}",
    )
    .unwrap_or(0.0);
    let out = metric(
        &m,
        "relaygate_gateway_udp_unvalidated_bytes_total{direction=\"outbound\"}",
    )
    .unwrap_or(0.0);
    assert!(out <= inb, "no amplification: {out} out for {inb} in");
    assert!(
        metric(
            &m,
            "relaygate_gateway_udp_bytes_total{direction=\"outbound\"}"
        )
        .unwrap_or(0.0)
            > 1_000_000.0,
        "the echo came back through the tunnel"
    );
}

/// `bandwidth.*` covers UDP tunnels too: datagrams over a tunnel's cap are
/// dropped (UDP has no back pressure to wait on), so what reaches the node
/// stays within the cap, and the drops are counted.
#[test]
fn a_capped_udp_tunnel_passes_no_more_than_its_cap() {
    let rt = rt();
    let (echo_addr, _echo) = rt
        .block_on(udpkit::echo_server("127.0.0.1:0".parse().expect("addr")))
        .expect("echo");
    // 1 MB/s toward the node, a 64 KiB burst.
    let gw = gateway(&[
        "bandwidth.tunnel.inbound=1000000",
        "bandwidth.tunnel.burst=65536",
    ]);
    let tunnel = format!("u=127.0.0.1:{},proto=udp", echo_addr.port());
    let agent = Agent::start(&here, &gw, Transport::Quic, &[tunnel], true, &[]);
    let port = agent.wait_leased("u", LEASE).expect("lease");
    wait_channel(&gw);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // 3 MB/s offered for 4 s.
    let r = rt
        .block_on(udpkit::throughput(target, 4.0, 1000, Some(3000)))
        .expect("throughput");
    eprintln!("capped UDP tunnel: {}", r.to_json());
    let cap = 1.0;
    assert!(
        r.mb_per_s <= cap * 1.1,
        "{} MB/s echoed through a 1 MB/s cap",
        r.mb_per_s
    );
    assert!(
        r.mb_per_s >= cap * 0.8,
        "{} MB/s echoed: the cap's rate should pass",
        r.mb_per_s
    );
    assert!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_udp_dropped_total{reason=\"bandwidth\"}"
        )
        .unwrap_or(0.0)
            > 1000.0,
        "drops over the cap are counted"
    );
}
