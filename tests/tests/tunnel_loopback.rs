//! End to end on loopback, with real processes: gateway, agent(s), and an
//! in-test target. Every test owns its ports and temp dirs, so they run in parallel.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rand::RngCore;
use relaygate_tests::stack::{
    eventually, here, http_get, metric, metric_sum, round_trip, Agent, Echo, Gateway, GatewaySpec,
    Transport,
};

const LEASE: Duration = Duration::from_secs(20);

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

#[test]
fn one_mib_round_trips_byte_exact_over_quic_and_tcp() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    for t in [Transport::Quic, Transport::Tcp] {
        let agent = Agent::start(&here, &gw, t, &[echo.tunnel("node")], true, &[]);
        let port = agent.wait_leased("node", LEASE).expect("lease");
        let data = random(1 << 20);
        let back = round_trip(port, &data).expect("round trip");
        assert_eq!(back.len(), data.len(), "{t:?}: length");
        assert!(back == data, "{t:?}: bytes differ");
        drop(agent);
    }
    let m = gw.metrics();
    assert!(
        metric_sum(&m, "relaygate_gateway_tunnel_bytes_total{") >= 4.0 * (1 << 20) as f64,
        "{m}"
    );
}

#[test]
fn fifty_concurrent_connections() {
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
    let handles: Vec<_> = (0..50)
        .map(|i| {
            thread::spawn(move || {
                let data = random(64 * 1024 + i);
                let back = round_trip(port, &data).expect("round trip");
                back == data
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .filter(|_| true)
        .map(|h| h.join().unwrap_or(false))
        .filter(|b| *b)
        .count();
    assert_eq!(ok, 50);
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 50);
}

#[test]
fn half_close_propagates_both_ways() {
    // A target that reads to EOF before answering, and one that closes its
    // write side first and keeps reading.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // 1st connection: client half-closes first
        let (mut c, _) = l.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.write_all(format!("got {}", got.len()).as_bytes())
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // 2nd connection: target half-closes first
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        tx.send(got.len()).unwrap();
    });
    let gw = Gateway::start(&here, GatewaySpec::default());
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[format!("hc={target}")],
        true,
        &[],
    );
    let port = agent.wait_leased("hc", LEASE).expect("lease");

    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(
        reply, "got 1000",
        "client's FIN reached the target, and the reply came back after it"
    );

    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = Vec::new();
    s.read_to_end(&mut hello).unwrap();
    assert_eq!(hello, b"hello", "target's FIN reached the client");
    s.write_all(&[1u8; 500]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        500,
        "client could still send after the target's FIN"
    );
}

#[test]
fn target_down_closes_public_connection_within_a_second() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // nothing listens here any more
    let gw = Gateway::start(&here, GatewaySpec::default());
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("down={closed}")],
        true,
        &[],
    );
    let port = agent.wait_leased("down", LEASE).expect("lease");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    let took = started.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "connection must close, got {r:?}"
    );
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    assert!(eventually(Duration::from_secs(2), || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"target_refused\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    }));
}

#[test]
fn gateway_crash_and_restart_gives_the_same_port_back() {
    let mut gw = Gateway::start(&here, GatewaySpec::default());
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
    assert_eq!(round_trip(port, b"before").unwrap(), b"before");
    let seen = agent.lease_count("node");
    gw.crash_and_restart(&here);
    let again = agent
        .wait_leased_again("node", seen, Duration::from_secs(30))
        .expect("agent came back");
    assert_eq!(again, port, "lease survived the gateway crash");
    assert!(eventually(Duration::from_secs(5), || round_trip(
        port, b"after"
    )
    .ok()
    .as_deref()
        == Some(b"after")));
}

#[test]
fn agent_killed_ports_refuse_then_work_when_it_returns() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let mut agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
    assert_eq!(round_trip(port, b"x").unwrap(), b"x");
    agent.proc.kill_hard();
    // TCP: the kernel resets the session at once; the port closes within the detection time.
    assert!(
        eventually(Duration::from_secs(8), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "public port still accepts after the agent died"
    );
    let dir = std::mem::replace(&mut agent.dir, tempfile::tempdir().unwrap());
    let back = Agent::start_in(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
        dir,
    );
    assert_eq!(
        back.wait_leased("node", LEASE).unwrap(),
        port,
        "same identity, same port"
    );
    assert_eq!(round_trip(port, b"again").unwrap(), b"again");
}

#[test]
fn agent_without_token_or_allow_list_is_refused_with_reason() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &["node=127.0.0.1:9".to_string()],
        false,
        &[],
    );
    let line = agent
        .proc
        .wait_for(|l| l.contains("not admitted"), Duration::from_secs(15))
        .expect("refusal in agent log");
    assert!(line.contains("join token"), "{line}");
    agent
        .proc
        .wait_for(|l| l.contains("fix:"), Duration::from_secs(5))
        .expect("what to do next");
    assert!(eventually(Duration::from_secs(3), || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"not_admitted\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    }));
    let (status, body) = http_get(agent.admin, "/health/ready");
    assert_eq!(status, 503, "{body}");
    let st = std::process::Command::new(relaygate_tests::procs::workspace_bin("relaygate-agent"))
        .args(["--admin-listen", &agent.admin.to_string(), "health"])
        .status()
        .unwrap();
    assert!(!st.success(), "health must fail while not admitted");
}

#[test]
fn allow_listed_agent_needs_no_token() {
    let echo = Echo::start();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(relaygate_tests::procs::workspace_bin("relaygate-agent"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("peer-id")
        .output()
        .unwrap();
    let peer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(peer.starts_with("12D3"), "{peer}");
    let spec = GatewaySpec {
        extra: vec![
            "--allow-peer".into(),
            peer,
            "--set".into(),
            "admission.tokens=false".into(),
        ],
        ..Default::default()
    };
    let gw = Gateway::start(&here, spec);
    let agent = Agent::start_in(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        false,
        &[],
        dir,
    );
    let port = agent
        .wait_leased("node", LEASE)
        .expect("allow-listed agent leased");
    assert_eq!(round_trip(port, b"ok").unwrap(), b"ok");
}

#[test]
fn held_port_and_disallowed_port_are_refused() {
    let p = relaygate_tests::procs::free_tcp_port();
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            port_range: Some(format!("{p}-{}", p + 5)),
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let a = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("{}@{p}", echo.tunnel("node"))],
        true,
        &[],
    );
    assert_eq!(a.wait_leased("node", LEASE).unwrap(), p);
    let b = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[
            format!("{}@{p}", echo.tunnel("node")),
            format!("{}@80", echo.tunnel("web")),
        ],
        true,
        &[],
    );
    b.proc
        .wait_for(|l| l.contains("port_held"), LEASE)
        .expect("held port refused");
    b.proc
        .wait_for(|l| l.contains("port_not_allowed"), LEASE)
        .expect("port outside the set refused");
    assert_eq!(round_trip(p, b"still mine").unwrap(), b"still mine");
    let (status, body) = http_get(b.admin, "/health/ready");
    assert_eq!(status, 503);
    assert!(body.contains("no lease"), "{body}");
}

#[test]
fn admin_api_reports_agents_advertise_and_health() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("advertise");
    let node = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[tunnels]]\nname = \"node\"\ntarget = \"{}\"\nnode_peer_id = \"{node}\"\nadvertise_file = \"{}\"\n",
            echo.addr,
            file.display()
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[],
        true,
        &["--config".into(), cfg.display().to_string()],
    );
    let port = agent.wait_leased("node", LEASE).unwrap();
    let expected = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{node}");
    // The agent writes the file after it logs the lease: wait for it.
    let want = format!("{expected}\n");
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&file).is_ok_and(|f| f == want)
        }),
        "advertise file: {:?}",
        std::fs::read_to_string(&file)
    );
    let (s, body) = http_get(agent.admin, "/v1/advertise");
    assert_eq!(s, 200);
    assert!(body.contains(&expected), "{body}");
    assert_eq!(http_get(agent.admin, "/health/ready").0, 200);
    assert_eq!(round_trip(port, b"count me").unwrap(), b"count me");
    assert!(eventually(Duration::from_secs(3), || {
        let (_, agents) = http_get(gw.admin, "/v1/agents");
        let v: serde_json::Value = serde_json::from_str(&agents).unwrap_or_default();
        v[0]["tunnels"][0]["port"] == port && v[0]["tunnels"][0]["bytes_inbound"] == 8
    }));
    for (bin, admin) in [
        ("relaygate-gateway", gw.admin),
        ("relaygate-agent", agent.admin),
    ] {
        let st = std::process::Command::new(relaygate_tests::procs::workspace_bin(bin))
            .args(["--admin-listen", &admin.to_string(), "health"])
            .status()
            .unwrap();
        assert!(st.success(), "{bin} health");
    }
    assert_eq!(http_get(gw.admin, "/health/live").0, 200);
    assert_eq!(http_get(gw.admin, "/health/ready").0, 200);
    let m = gw.metrics();
    for name in [
        "relaygate_gateway_connections_active",
        "relaygate_gateway_sessions_active",
        "relaygate_gateway_leases",
        "relaygate_gateway_tunnels_active",
        "relaygate_gateway_tunnel_bytes_total",
        "relaygate_gateway_connections_opened_total",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
    assert_eq!(metric(&m, "relaygate_gateway_sessions_active"), Some(1.0));
    let am = http_get(agent.admin, "/metrics").1;
    assert_eq!(metric(&am, "relaygate_agent_sessions_active"), Some(1.0));
}

#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    let mut gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), "shutdown_grace=20s".into()],
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).unwrap();
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    open.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).unwrap();
    gw.proc.signal(libc::SIGTERM);
    gw.proc
        .wait_for(|l| l.contains("draining"), Duration::from_secs(5))
        .expect("drain announced");
    assert!(
        eventually(Duration::from_secs(3), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "new connections refused during drain"
    );
    open.write_all(b"two").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two", "open connection keeps working while draining");
    drop(open);
    let status = gw
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("gateway exited after the drain");
    assert!(status.success(), "{status:?}");
}

/// Target resets the first connection, then reports how the client's reset of the second arrived.
fn resetting_target() -> (std::net::SocketAddr, mpsc::Receiver<&'static str>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut b = [0u8; 4];
        let _ = (&c).read_exact(&mut b);
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c); // RST
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let outcome = loop {
            match c.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                Err(_) => break "timeout",
            }
        };
        tx.send(outcome).unwrap();
    });
    (target, rx)
}

#[test]
fn resets_propagate_both_ways() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    for t in [Transport::Tcp, Transport::Quic] {
        let (target, rx) = resetting_target();
        let agent = Agent::start(&here, &gw, t, &[format!("rst={target}")], true, &[]);
        let port = agent.wait_leased("rst", LEASE).expect("lease");

        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"boom").unwrap();
        let mut b = [0u8; 8];
        let started = Instant::now();
        let r = c.read(&mut b);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{t:?}: the target's reset closes the client at once"
        );
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{t:?}: target's reset must reach the client as a reset, got {r:?}"
        );

        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        (&c).write_all(b"hello").unwrap();
        thread::sleep(Duration::from_millis(300));
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c); // RST from the client
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            seen, "reset",
            "{t:?}: client's reset must reach the target as a reset"
        );
        drop(agent);
    }
}
