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
    assert!(eventually(Duration::from_secs(10), || gauge(
        &gw.metrics(),
        "relaygate_gateway_udp_channels_active"
    ) == 1.0));
    let srcs = sources(20);
    let r = rt.block_on(udpkit::flows(target, &srcs, 1, 64, Duration::from_secs(10)));
    assert_eq!(r.flows_ok, 20, "{:?}", r.to_json());
    let flows = |m: &str| {
        gauge(m, "relaygate_gateway_udp_flows_unvalidated")
            + gauge(m, "relaygate_gateway_udp_flows_validated")
    };
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
    assert!(eventually(Duration::from_secs(10), || gauge(
        &gw.metrics(),
        "relaygate_gateway_udp_channels_active"
    ) == 1.0));
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
    let flows = |m: &str| {
        gauge(m, "relaygate_gateway_udp_flows_unvalidated")
            + gauge(m, "relaygate_gateway_udp_flows_validated")
    };
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
    assert!(eventually(Duration::from_secs(10), || gauge(
        &gw.metrics(),
        "relaygate_gateway_udp_channels_active"
    ) == 1.0));
    let r = rt.block_on(udpkit::flows(
        target,
        &srcs,
        2,
        100,
        Duration::from_secs(10),
    ));
    assert_eq!(r.flows_ok, 10, "flows work again: {:?}", r.to_json());
}
