//! PROXY protocol both ways on loopback: the agent tells a PROXY-reading target
//! who really connected; the gateway believes PROXY headers only from trusted
//! balancers, and refuses them from anyone else.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use relaygate_common::proxy::{self, ProxyVersion};
use relaygate_tests::stack::{
    eventually, here, http_get, metric, Agent, Gateway, GatewaySpec, Transport,
};

/// What the target learnt: the header's source and the first payload bytes.
type Seen = (Option<SocketAddr>, Vec<u8>);

/// A target that reads a PROXY header, reports its source and the first payload bytes, then echoes.
fn proxy_target() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                // collect until the header and 4 payload bytes are in
                let (header, rest) = loop {
                    let n = c.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Ok((Some(h), rest)) = rt.block_on(proxy::read_header(&mut &buf[..])) {
                        if rest.len() >= 4 {
                            break (h, rest);
                        }
                    }
                };
                let _ = tx.send((header.source, rest.clone()));
                let _ = c.write_all(&rest);
            });
        }
    });
    (addr, rx)
}

fn agent_with(gw: &Gateway, tunnel: String) -> (Agent, u16) {
    let agent = Agent::start(&here, gw, Transport::Quic, &[tunnel], true, &[]);
    let port = agent
        .wait_leased("node", Duration::from_secs(20))
        .expect("lease");
    (agent, port)
}

#[test]
fn agent_sends_proxy_v1_and_v2_with_the_real_source() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    for mode in ["proxy-v1", "proxy-v2"] {
        let (target, rx) = proxy_target();
        let (_agent, port) = agent_with(&gw, format!("node={target},deliver={mode}"));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"ping").unwrap();
        let (source, first) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("target got a connection");
        assert_eq!(
            source,
            Some(me),
            "{mode}: target learns the client's address"
        );
        assert_eq!(first, b"ping");
        let mut back = [0u8; 4];
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }
}

#[test]
fn gateway_believes_proxy_headers_only_from_trusted_balancers() {
    // Loopback is the trusted balancer here; it must send a header.
    let spec = GatewaySpec {
        extra: vec![
            "--set".into(),
            "proxy_protocol.trusted=127.0.0.0/8".into(),
            "--set".into(),
            "proxy_protocol.required=true".into(),
        ],
        ..Default::default()
    };
    let gw = Gateway::start(&here, spec);
    let (target, rx) = proxy_target();
    let (_agent, port) = agent_with(&gw, format!("node={target},deliver=proxy-v2"));
    let real: SocketAddr = "203.0.113.77:5555".parse().unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let dest = c.peer_addr().unwrap();
    c.write_all(&proxy::encode(ProxyVersion::V2, real, dest, None))
        .unwrap();
    c.write_all(b"data").unwrap();
    let (source, first) = rx.recv_timeout(Duration::from_secs(10)).expect("delivered");
    assert_eq!(
        source,
        Some(real),
        "the balancer's source is carried to the target"
    );
    assert_eq!(first, b"data");
    let (_, agents) = http_get(gw.admin, "/v1/agents");
    assert!(
        agents.contains("203.0.113.77:5555"),
        "recent sources in /v1/agents: {agents}"
    );

    // same balancer, no header: refused
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"no header here").unwrap();
    let mut b = [0u8; 4];
    assert!(
        matches!(c.read(&mut b), Ok(0) | Err(_)),
        "connection without header must close"
    );
    assert!(eventually(Duration::from_secs(3), || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"proxy_missing\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    }));
}

#[test]
fn proxy_header_from_an_untrusted_address_is_refused_and_counted() {
    let spec = GatewaySpec {
        extra: vec![
            "--set".into(),
            "proxy_protocol.trusted=198.51.100.0/24".into(),
        ],
        ..Default::default()
    };
    let gw = Gateway::start(&here, spec);
    let echo = relaygate_tests::stack::Echo::start();
    let (_agent, port) = agent_with(&gw, echo.tunnel("node"));
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let spoof = proxy::encode(
            version,
            "203.0.113.66:1".parse().unwrap(),
            c.peer_addr().unwrap(),
            None,
        );
        c.write_all(&spoof).unwrap();
        let mut b = [0u8; 64];
        assert!(
            matches!(c.read(&mut b), Ok(0) | Err(_)),
            "{version:?}: spoofed header must be refused"
        );
    }
    assert!(eventually(Duration::from_secs(3), || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"proxy_untrusted\"}",
        )
        .unwrap_or(0.0)
            >= 2.0
    }));
    // honest traffic from the same address still flows
    assert_eq!(
        relaygate_tests::stack::round_trip(port, b"honest").unwrap(),
        b"honest"
    );
}

/// A stand-in load balancer: accepts on loopback, connects to `upstream`,
/// writes a PROXY v2 header naming `claimed` as the source, then splices.
fn balancer(upstream: SocketAddr, claimed: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(mut up) = TcpStream::connect(upstream) else {
                continue;
            };
            let _ = up.write_all(&proxy::encode(ProxyVersion::V2, claimed, upstream, None));
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
            thread::spawn(move || {
                let (mut client, mut up) = (client, up);
                let _ = std::io::copy(&mut up, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn libp2p_listener_takes_the_real_source_from_a_trusted_balancer() {
    let spec = GatewaySpec {
        extra: vec!["--set".into(), "proxy_protocol.trusted=127.0.0.0/8".into()],
        ..Default::default()
    };
    let gw = Gateway::start(&here, spec);
    let claimed: SocketAddr = "203.0.113.88:4444".parse().unwrap();
    let lb = balancer(format!("127.0.0.1:{}", gw.tcp).parse().unwrap(), claimed);
    let echo = relaygate_tests::stack::Echo::start();
    // The agent dials the balancer instead of the gateway.
    let mut via_lb = gw;
    via_lb.tcp = lb.port();
    let agent = Agent::start(
        &here,
        &via_lb,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent
        .wait_leased("node", Duration::from_secs(20))
        .expect("session through the balancer");
    assert_eq!(
        relaygate_tests::stack::round_trip(port, b"via lb").unwrap(),
        b"via lb"
    );
    let (_, agents) = http_get(via_lb.admin, "/v1/agents");
    assert!(
        agents.contains("/ip4/203.0.113.88/tcp/4444"),
        "gateway saw the balancer's claimed source: {agents}"
    );
}

#[test]
fn libp2p_listener_refuses_proxy_headers_from_untrusted_addresses() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let lb = balancer(
        format!("127.0.0.1:{}", gw.tcp).parse().unwrap(),
        "203.0.113.88:4444".parse().unwrap(),
    );
    let mut via_lb = gw;
    via_lb.tcp = lb.port();
    let agent = Agent::start(
        &here,
        &via_lb,
        Transport::Tcp,
        &["node=127.0.0.1:9".to_string()],
        true,
        &[],
    );
    agent
        .proc
        .wait_for(
            |l| l.contains("cannot reach the gateway"),
            Duration::from_secs(20),
        )
        .expect("dial refused");
    assert!(eventually(Duration::from_secs(5), || {
        metric(
            &via_lb.metrics(),
            "relaygate_gateway_refusals_total{reason=\"proxy_untrusted\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    }));
}

/// Issue #15, items 8 and 9. At 4462fed: a signature split over two
/// segments passed the check (it looked at the first read only); behind a
/// trusted balancer the client's own header after the balancer's was not
/// checked at all; and with an optional header, bytes a trusted peer sent
/// before the 500 ms wait ran out (a signature's beginning) were dropped.
#[test]
fn a_clients_own_proxy_header_is_refused_however_it_arrives() {
    let spec = GatewaySpec {
        extra: vec!["--set".into(), "proxy_protocol.trusted=127.0.0.2/32".into()],
        ..Default::default()
    };
    let gw = Gateway::start(&here, spec);
    let (target, rx) = proxy_target();
    let (_agent, port) = agent_with(&gw, format!("node={target},deliver=proxy-v2"));
    let refused = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 64];
        matches!(c.read(&mut b), Ok(0) | Err(_))
    };
    let count = || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"proxy_untrusted\"}",
        )
        .unwrap_or(0.0)
    };

    // A direct client, its signature in two segments.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    let spoof = proxy::encode(
        ProxyVersion::V1,
        "203.0.113.66:1".parse().unwrap(),
        c.peer_addr().unwrap(),
        None,
    );
    c.write_all(&spoof[..3]).unwrap();
    thread::sleep(Duration::from_millis(300));
    c.write_all(&spoof[3..]).unwrap();
    assert!(refused(&mut c), "a split signature is refused");
    assert!(eventually(Duration::from_secs(3), || count() >= 1.0));

    // A client behind the trusted balancer (127.0.0.2), its own v2 header
    // right after the balancer's.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut c: TcpStream = sock.into();
    let dest = c.peer_addr().unwrap();
    let mut bytes = proxy::encode(
        ProxyVersion::V2,
        "203.0.113.77:5555".parse().unwrap(),
        dest,
        None,
    );
    bytes.extend(proxy::encode(
        ProxyVersion::V2,
        "198.51.100.1:1".parse().unwrap(),
        dest,
        None,
    ));
    c.write_all(&bytes).unwrap();
    assert!(
        refused(&mut c),
        "the client's own header behind a balancer is refused"
    );
    assert!(eventually(Duration::from_secs(3), || count() >= 2.0));

    // The balancer connecting directly (optional header), its first bytes
    // slow: a signature's first letter, then after the 500 ms wait the rest
    // of a payload. Every byte reaches the target.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut c: TcpStream = sock.into();
    c.set_nodelay(true).unwrap();
    c.write_all(b"P").unwrap();
    thread::sleep(Duration::from_millis(800));
    c.write_all(b"ING!").unwrap();
    let (_, first) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow peer's bytes are delivered");
    assert_eq!(
        first, b"PING!",
        "nothing read before the wait ran out is lost"
    );
}
