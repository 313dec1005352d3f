//! Abuse control on a live gateway: the blacklist changed at runtime through
//! the admin API (networks and peer ids), per-IP connection rates, and the
//! automatic ban of a peer that keeps sending malformed input.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use relaygate_tests::{
    procs::Proc,
    rawpeer::RawPeer,
    stack::{
        agent_peer_id, eventually, here, metric_sum, round_trip, seed_peer_id, Agent, Echo,
        Gateway, GatewaySpec, Transport,
    },
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    relaygate_tests::stack::http_request(addr, method, path, body)
}

fn dial(gw: &Gateway, seed: u8) -> bool {
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args([
        "dial",
        "--addr",
        &gw.addr(Transport::Tcp),
        "--pings",
        "1",
        "--timeout-secs",
        "5",
        "--seed",
        &seed.to_string(),
    ]);
    let mut p = Proc::spawn("dial", cmd);
    p.wait_exit(Duration::from_secs(15))
        .is_some_and(|s| s.success())
}

#[test]
fn blacklist_changes_at_runtime_for_networks_and_peers() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    assert_eq!(round_trip(port, b"before").expect("round trip"), b"before");

    // Ban a peer id: that peer cannot connect, others can.
    let (code, body) = http(
        gw.admin,
        "POST",
        "/v1/blacklist",
        &format!(
            r#"{{"target":"{}","reason":"test peer","ttl":"1h"}}"#,
            seed_peer_id(5)
        ),
    );
    assert_eq!(code, 201, "{body}");
    assert!(!dial(&gw, 5), "a banned peer id is refused");

    // A ttl too long for the clock is a permanent ban, not a crash (on
    // ecf9cf7 `Instant + ttl` overflowed and panicked the handler).
    let (code, body) = http(
        gw.admin,
        "POST",
        "/v1/blacklist",
        &format!(
            r#"{{"target":"{}","reason":"forever","ttl":"18446744073709551615s"}}"#,
            seed_peer_id(7)
        ),
    );
    assert_eq!(code, 201, "{body}");
    let ban: serde_json::Value = serde_json::from_str(&body).expect("the ban as JSON");
    assert!(ban["expires"].is_null(), "a permanent ban: {body}");
    assert!(!dial(&gw, 7), "the long ban holds");
    assert!(dial(&gw, 6), "another peer still gets in");

    // Ban the loopback network: new public connections and sessions from it are refused.
    let (code, body) = http(
        gw.admin,
        "POST",
        "/v1/blacklist",
        r#"{"target":"127.0.0.0/8","reason":"test net"}"#,
    );
    assert_eq!(code, 201, "{body}");
    assert!(
        round_trip(port, b"during").unwrap_or_default().is_empty(),
        "no byte crosses for a banned network"
    );
    assert!(
        !dial(&gw, 6),
        "a banned network cannot open libp2p connections"
    );
    let (code, list) = http(gw.admin, "GET", "/v1/blacklist", "");
    assert_eq!(code, 200);
    assert!(
        list.contains("127.0.0.0/8") && list.contains("test net"),
        "{list}"
    );
    assert!(list.contains(&seed_peer_id(5)), "{list}");
    assert!(
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"banned\"}"
        ) >= 2.0
    );

    // Bad requests get a clear 4xx, not a crash.
    let (code, _) = http(
        gw.admin,
        "POST",
        "/v1/blacklist",
        r#"{"target":"nonsense"}"#,
    );
    assert!((400..500).contains(&code), "got {code}");
    let (code, _) = http(gw.admin, "DELETE", "/v1/blacklist?target=10.9.9.9", "");
    assert_eq!(code, 404);

    // Lift it: the agent returns and the tunnel works again.
    let (code, _) = http(gw.admin, "DELETE", "/v1/blacklist?target=127.0.0.0/8", "");
    assert_eq!(code, 204);
    assert!(
        eventually(Duration::from_secs(30), || round_trip(port, b"after")
            .unwrap_or_default()
            == b"after"),
        "the tunnel works again once the ban is lifted"
    );
}

#[test]
fn connection_rate_per_ip_is_capped() {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec![
                "--set".into(),
                "guard.connections_per_ip.per_second=1".into(),
                "--set".into(),
                "guard.connections_per_ip.burst=2".into(),
            ],
            ..Default::default()
        },
    );
    let results: Vec<bool> = (10..16).map(|seed| dial(&gw, seed)).collect();
    assert!(
        results.iter().any(|ok| *ok),
        "some dials get in: {results:?}"
    );
    assert!(results.iter().any(|ok| !*ok), "a burst is cut: {results:?}");
    assert!(
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"rate_limited_connection\"}"
        ) >= 1.0
    );
}

#[test]
fn repeated_malformed_input_earns_a_temporary_ban() {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), "guard.violations_before_ban=3".into()],
            ..Default::default()
        },
    );
    let raw = RawPeer::connect(&gw.addr(Transport::Tcp)).expect("raw peer");
    for _ in 0..3 {
        let _ = raw.exchange(
            "/libp2p/circuit/relay/0.2.0/hop",
            &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff],
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || metric_sum(
            &gw.metrics(),
            "relaygate_gateway_bans_added_total{reason=\"automatic\"}"
        ) == 1.0),
        "the third violation banned the peer"
    );
    let (_, list) = http(gw.admin, "GET", "/v1/blacklist", "");
    assert!(
        list.contains("automatic") && list.contains("protocol violations"),
        "{list}"
    );
    // Its connection was closed, and it cannot open streams any more.
    assert!(
        eventually(Duration::from_secs(10), || raw
            .exchange("/libp2p/circuit/relay/0.2.0/hop", &[0x00])
            .is_err()),
        "the banned peer is disconnected"
    );
}

#[test]
fn guessing_the_join_token_earns_a_ban() {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), "guard.violations_before_ban=3".into()],
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("t")],
        false,
        &["--set".into(), "gateway.token=not-the-token".into()],
    );
    assert!(
        eventually(Duration::from_secs(30), || metric_sum(
            &gw.metrics(),
            "relaygate_gateway_bans_added_total{reason=\"automatic\"}"
        ) == 1.0),
        "the third refused token banned the peer"
    );
    let (_, list) = http(gw.admin, "GET", "/v1/blacklist", "");
    let me = agent_peer_id(agent.dir.path());
    assert!(
        list.contains(&me) && list.contains("not_admitted"),
        "{list}"
    );
}

/// A twin that keeps retrying with the identity of a connected peer (a
/// rolling restart's second pod) is refused by the per-peer cap, and those
/// refusals do not count against its address: a new peer from the same
/// address still gets in. Before, each refused twin kept one count of the
/// per-IP cap until the gateway restarted.
#[test]
fn a_twin_refused_per_peer_does_not_use_up_its_address() {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec![
                "--set".into(),
                "limits.max_connections_per_peer=1".into(),
                "--set".into(),
                "limits.max_connections_per_ip=4".into(),
                "--set".into(),
                "guard.connections_per_ip.per_second=0".into(),
            ],
            ..Default::default()
        },
    );
    // The original holds its one connection for the whole test.
    let mut holder = std::process::Command::new(LAB_NODE);
    holder.args([
        "dial",
        "--addr",
        &gw.addr(Transport::Tcp),
        "--pings",
        "100000",
        "--timeout-secs",
        "120",
        "--seed",
        "40",
    ]);
    let holder = Proc::spawn("holder", holder);
    holder
        .wait_for(|l| l.contains(r#""event":"ping""#), Duration::from_secs(15))
        .expect("the original is connected");
    // Ten twins, each past the per-peer cap (and together past the per-IP one).
    for _ in 0..10 {
        assert!(!dial(&gw, 40), "a twin of a connected peer is refused");
    }
    assert!(
        dial(&gw, 41),
        "a new peer from the same address gets in: {}",
        gw.metrics()
            .lines()
            .filter(|l| l.contains("refusals_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"connections_per_ip\"}"
        ),
        0.0,
        "no refusal for the address"
    );
    drop(holder);
}

/// A page in a local browser whose name was rebound to 127.0.0.1 reaches
/// the open (loopback, no token) admin API with its own name in Host: it is
/// refused, and its ban of everyone never lands. On ecf9cf7 it was served.
#[test]
fn the_open_admin_api_refuses_rebound_names() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let send = |host: &str| {
        let mut s = TcpStream::connect(gw.admin).expect("connect");
        let body = r#"{"target":"0.0.0.0/0","reason":"rebinding"}"#;
        let req = format!(
            "POST /v1/blacklist HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let answer = send("rebind.example:9600");
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    let (code, list) = http(gw.admin, "GET", "/v1/blacklist", "");
    assert_eq!(code, 200);
    assert!(!list.contains("0.0.0.0/0"), "no ban landed: {list}");
    assert!(
        send(&format!("localhost:{}", gw.admin.port())).starts_with("HTTP/1.1 201"),
        "a local name is served"
    );
}
