//! Connection caps and idle timeouts on leased ports.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use relaygate_tests::stack::{
    self, here, metric_sum, round_trip, Agent, Echo, Gateway, GatewaySpec, Transport,
};

fn gateway(kv: &[&str]) -> Gateway {
    Gateway::start(
        &here,
        GatewaySpec {
            extra: stack::settings(kv),
            ..Default::default()
        },
    )
}

/// Sends one byte and reads its echo; false when the connection is gone.
fn ping(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"p").is_ok() && s.read_exact(&mut b).is_ok()
}

#[test]
fn idle_public_connections_are_closed_and_busy_ones_kept() {
    let gw = gateway(&["limits.idle_timeout=2s"]);
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut busy = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    for s in [&mut idle, &mut busy] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(ping(s));
    }
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(500));
        assert!(ping(&mut busy), "a connection moving bytes stays open");
    }
    assert!(
        !ping(&mut idle),
        "a connection idle for 4 s (limit 2 s) was closed"
    );
}

#[test]
fn a_leased_port_holds_at_most_its_connection_cap() {
    let gw = gateway(&["limits.max_connections_per_tunnel=2"]);
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            assert!(ping(&mut s));
            s
        })
        .collect();
    let mut third = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(!ping(&mut third), "the third connection is refused");
    assert!(
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"tunnel_connection_limit\"}"
        ) >= 1.0
    );
    // A place frees up when one closes.
    drop(held.pop());
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        round_trip(port, b"fits again").expect("round trip"),
        b"fits again"
    );
}

fn agent_metrics(agent: &Agent) -> String {
    stack::http_get(agent.admin, "/metrics").1
}

#[test]
fn the_agent_caps_its_connections_and_closes_idle_ones() {
    // The gateway's own idle timeout is off: what closes is the agent's.
    let gw = gateway(&["limits.idle_timeout=0s"]);
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("t")],
        true,
        &stack::settings(&["limits.max_connections=2", "limits.idle_timeout=2s"]),
    );
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let open = || {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    };
    let (mut idle, mut busy) = (open(), open());
    assert!(ping(&mut idle) && ping(&mut busy));
    let mut third = open();
    assert!(
        !ping(&mut third),
        "a third connection is over the agent's cap"
    );
    assert!(
        metric_sum(
            &agent_metrics(&agent),
            "relaygate_agent_refusals_total{reason=\"agent_connection_limit\"}"
        ) >= 1.0
    );
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(500));
        assert!(ping(&mut busy), "a connection moving bytes stays open");
    }
    assert!(!ping(&mut idle), "idle for 4 s (agent limit 2 s): closed");
    // Its slot is free again.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        round_trip(port, b"fits again").expect("round trip"),
        b"fits again"
    );
}

#[test]
fn a_gateway_over_its_memory_limit_refuses_new_work() {
    // One byte: always over, so every new connection is refused.
    let gw = gateway(&["limits.max_memory=1"]);
    assert!(
        stack::eventually(Duration::from_secs(10), || stack::metric(
            &gw.metrics(),
            "relaygate_gateway_memory_overloaded"
        ) == Some(1.0)),
        "the overload is reported"
    );
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    assert!(
        stack::eventually(Duration::from_secs(15), || metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"memory_pressure\"}"
        ) >= 1.0),
        "the agent's connection was refused for memory"
    );
    assert_eq!(
        stack::metric(&gw.metrics(), "relaygate_gateway_sessions_active"),
        Some(0.0)
    );
    drop(agent);
}

/// A connection to 127.0.0.1:`port` from `from`.
fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&std::net::SocketAddr::from((from, 0)).into())
        .expect("bind");
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// One source (127.0.0.2) holds connections open on a leased port up to its
/// share, `limits.max_connections_per_source`; past it its connections are
/// reset and counted, while another source's round trips keep working. On
/// ecf9cf7 one address could take every slot of the tunnel.
#[test]
fn one_source_holds_at_most_its_share_of_a_leased_port() {
    let gw = gateway(&[
        "limits.max_connections_per_source=8",
        "guard.tunnel_connections_per_ip.per_second=0",
    ]);
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    let mut held: Vec<TcpStream> = (0..8).map(|_| connect_from([127, 0, 0, 2], port)).collect();
    for s in &mut held {
        assert!(ping(s), "a connection within the share works");
    }
    let mut extra = connect_from([127, 0, 0, 2], port);
    assert!(
        !ping(&mut extra),
        "the ninth from the same source is refused"
    );
    for i in 0..5 {
        let data = vec![i as u8; 10_000];
        assert_eq!(
            round_trip(port, &data).expect("honest round trip"),
            data,
            "another source is not affected"
        );
    }
    assert!(
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"connections_per_source\"}"
        ) >= 1.0
    );
    // A place given back is a place to take.
    drop(held.pop());
    thread::sleep(Duration::from_millis(200));
    let mut again = connect_from([127, 0, 0, 2], port);
    assert!(ping(&mut again), "a freed place is taken again");
}
