//! Services between agents across real NATs: agent A (offering an echo
//! service) and agent B (`connect`) each sit behind their own nftables router;
//! the gateway is on the internet segment. B's connections ride the gateway's
//! relay first; DCUtR then punches a direct connection when both NATs keep
//! ports (masquerade), and never through a symmetric one (random,fully-random).

use std::{path::Path, time::Duration};

use relaygate_tests::{
    netlab::{require_root, Host, Lab, Nat},
    procs::Proc,
    stack::{agent_peer_id, eventually, metric_sum, Agent, Gateway, GatewaySpec, Transport},
};
use serde_json::Value;

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const ECHO_PORT: u16 = 7000;
const VISIT_PORT: u16 = 7100;

/// GET from an admin API that listens on loopback inside `host`'s namespace.
fn ns_get(host: &Host, admin: std::net::SocketAddr, path: &str) -> String {
    let out = host
        .cmd(LAB_NODE)
        .args(["http-get", "--addr", &admin.to_string(), "--path", path])
        .output()
        .expect("run http-get");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The hole-punch record B keeps about A, once it has a result.
fn punch_record(host: &Host, admin: std::net::SocketAddr, peer: &str) -> Option<Value> {
    let peers: Value = serde_json::from_str(&ns_get(host, admin, "/v1/peers")).ok()?;
    peers
        .as_array()?
        .iter()
        .find(|p| p["peer"] == peer)
        .cloned()
}

fn stream(host: &Host, seconds: u64) -> Proc {
    let mut cmd = host.cmd(LAB_NODE);
    cmd.args([
        "tcp-stream",
        "--addr",
        &format!("127.0.0.1:{VISIT_PORT}"),
        "--seconds",
        &seconds.to_string(),
        "--kib-per-sec",
        "4096",
    ]);
    Proc::spawn("stream", cmd)
}

fn stream_ok(p: &mut Proc) -> u64 {
    let done = p
        .wait_for(|l| l.contains("stream_done"), Duration::from_secs(40))
        .expect("stream finished");
    let v: Value = serde_json::from_str(done.trim()).expect("json");
    assert_eq!(v["ok"], true, "byte-exact echo: {done}");
    v["received"].as_u64().unwrap_or(0)
}

struct Setup {
    _lab: Lab,
    gw: Gateway,
    gw_host: Host,
    a_host: Host,
    b_host: Host,
    a: Agent,
    b: Agent,
    a_id: String,
    _echo: Proc,
}

fn setup(tag: &str, t: Transport, nat_b: Nat) -> Setup {
    let lab = Lab::new(tag).expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let lan_a = lab.lan("a", Nat::Masquerade, 1);
    let lan_b = lab.lan("b", nat_b, 2);
    let a_host = lab.lan_host(&lan_a, "a", 10);
    let b_host = lab.lan_host(&lan_b, "b", 10);
    let launch_gw = |b: &Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            // Lab addresses are documentation ranges, not "global" ones.
            extra: vec!["--set".into(), "autonat.only_global_ips=false".into()],
            ..Default::default()
        },
    );
    let mut echo = a_host.cmd(LAB_NODE);
    echo.args(["tcp-echo", "--listen", &format!("127.0.0.1:{ECHO_PORT}")]);
    let echo = Proc::spawn("echo", echo);
    echo.wait_for(|l| l.contains("listening"), Duration::from_secs(10))
        .expect("echo up");

    // Hole punching over the session's transport only, so each test shows one.
    let punch = match t {
        Transport::Tcp => "relay.punch_listen=/ip4/0.0.0.0/tcp/0",
        Transport::Quic => "relay.punch_listen=/ip4/0.0.0.0/udp/0/quic-v1",
    };
    let b_dir = tempfile::tempdir().expect("tempdir");
    let b_id = agent_peer_id(b_dir.path());
    let launch_a = |b: &Path| a_host.cmd(b);
    let a = Agent::start(
        &launch_a,
        &gw,
        t,
        &[],
        true,
        &[
            "--set".into(),
            punch.into(),
            "--service".into(),
            format!("echo=127.0.0.1:{ECHO_PORT},allow={b_id}"),
        ],
    );
    a.proc
        .wait_for(
            |l| l.contains("relay reservation active"),
            Duration::from_secs(30),
        )
        .expect("A reserved on the relay");
    let a_id = agent_peer_id(a.dir.path());
    let launch_b = |b: &Path| b_host.cmd(b);
    let b = Agent::start_in(
        &launch_b,
        &gw,
        t,
        &[],
        true,
        &[
            "--set".into(),
            punch.into(),
            "connect".into(),
            a_id.clone(),
            "echo".into(),
            "--listen".into(),
            format!("127.0.0.1:{VISIT_PORT}"),
        ],
        b_dir,
    );
    b.proc
        .wait_for(|l| l.contains("visitor port open"), Duration::from_secs(30))
        .expect("B's visitor port");
    b.proc
        .wait_for(
            |l| l.contains("relay reservation active"),
            Duration::from_secs(30),
        )
        .expect("B's session up");
    Setup {
        _lab: lab,
        gw,
        gw_host,
        a_host,
        b_host,
        a,
        b,
        a_id,
        _echo: echo,
    }
}

fn relayed_bytes(s: &Setup) -> f64 {
    metric_sum(
        &ns_get(&s.gw_host, s.gw.admin, "/metrics"),
        "relaygate_gateway_relay_bytes_total",
    )
}

fn punch_through(tag: &str, t: Transport) {
    let s = setup(tag, t, Nat::Masquerade);
    // The first connection opens the relayed connection; its stream is chosen
    // before any direct connection can exist, so it runs over the relay.
    let mut first = stream(&s.b_host, 4);
    let mut record = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            record = punch_record(&s.b_host, s.b.admin, &s.a_id)
                .filter(|r| r["holepunch"]["result"].is_string());
            record.is_some()
        }),
        "B recorded a hole punch result"
    );
    let record = record.unwrap_or_default();
    let hp = &record["holepunch"];
    println!("hole punch {t:?}: {hp}");
    assert_eq!(hp["result"], "success", "hole punch succeeded: {record}");
    let expected = match t {
        Transport::Tcp => "tcp",
        Transport::Quic => "quic",
    };
    assert_eq!(hp["direct_transport"], expected);
    assert!(record["direct_connections"].as_u64() >= Some(1));
    // The stream opened on the relay was not broken by the upgrade.
    let first_bytes = stream_ok(&mut first);
    assert!(
        first_bytes > 1_000_000,
        "first stream moved {first_bytes} bytes"
    );
    let b_metrics = ns_get(&s.b_host, s.b.admin, "/metrics");
    assert!(
        metric_sum(
            &b_metrics,
            "relaygate_agent_service_bytes_total{role=\"Visit\",path=\"Relayed\"}"
        ) >= (2 * first_bytes) as f64,
        "the first stream ran over the relay:\n{b_metrics}"
    );

    // A new connection now uses the direct path: the gateway relays (almost)
    // nothing while it runs; keep-alive pings on the idle relayed connection
    // are all that may still cross it.
    let relayed_before = relayed_bytes(&s);
    let mut second = stream(&s.b_host, 4);
    second
        .wait_for(|l| l.contains("progress"), Duration::from_secs(10))
        .expect("second stream flowing");
    let second_bytes = stream_ok(&mut second);
    let relayed_during = relayed_bytes(&s) - relayed_before;
    println!(
        "second stream: {second_bytes} bytes direct, gateway relayed {relayed_during} meanwhile"
    );
    assert!(second_bytes > 1_000_000);
    assert!(
        relayed_during < 20_000.0,
        "the gateway relayed {relayed_during} bytes while {second_bytes} flowed directly"
    );
    let b_metrics = ns_get(&s.b_host, s.b.admin, "/metrics");
    assert!(
        metric_sum(
            &b_metrics,
            "relaygate_agent_service_bytes_total{role=\"Visit\",path=\"Direct\"}"
        ) >= (2 * second_bytes) as f64
    );
    let a_metrics = ns_get(&s.a_host, s.a.admin, "/metrics");
    assert!(metric_sum(&a_metrics, "relaygate_agent_holepunch_attempts_total") >= 1.0);
}

#[test]
fn dcutr_punches_through_two_port_keeping_nats_over_tcp() {
    if !require_root("dcutr_punches_through_two_port_keeping_nats_over_tcp") {
        return;
    }
    punch_through("hpt", Transport::Tcp);
}

#[test]
fn dcutr_punches_through_two_port_keeping_nats_over_quic() {
    if !require_root("dcutr_punches_through_two_port_keeping_nats_over_quic") {
        return;
    }
    punch_through("hpq", Transport::Quic);
}

#[test]
fn symmetric_nat_keeps_the_service_on_the_relay() {
    if !require_root("symmetric_nat_keeps_the_service_on_the_relay") {
        return;
    }
    let s = setup("hps", Transport::Quic, Nat::Symmetric);
    let relayed_before = relayed_bytes(&s);
    let mut first = stream(&s.b_host, 3);
    let bytes = stream_ok(&mut first);
    assert!(bytes > 1_000_000);
    // A (the DCUtR initiator) gives up after its attempts; nothing direct exists.
    let a_failed = eventually(Duration::from_secs(60), || {
        let m = ns_get(&s.a_host, s.a.admin, "/metrics");
        metric_sum(
            &m,
            "relaygate_agent_holepunch_results_total{transport=\"Quic\",result=\"Failure\"}",
        ) >= 1.0
    });
    let b_view = punch_record(&s.b_host, s.b.admin, &s.a_id).unwrap_or_default();
    println!("symmetric: B's view {b_view}");
    assert!(a_failed, "A reports the failed hole punch");
    assert_eq!(
        b_view["direct_connections"], 0,
        "no direct connection: {b_view}"
    );
    // The service still works, byte-exact, through the relay.
    let mut again = stream(&s.b_host, 2);
    let bytes2 = stream_ok(&mut again);
    let relayed = relayed_bytes(&s) - relayed_before;
    assert!(
        relayed >= (2 * (bytes + bytes2)) as f64,
        "both streams crossed the relay ({relayed} bytes relayed)"
    );
}

#[test]
fn autonat_tells_agents_whether_they_are_reachable() {
    if !require_root("autonat_tells_agents_whether_they_are_reachable") {
        return;
    }
    let lab = Lab::new("an").expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let public_host = lab.internet_host("pub", 20);
    let lan = lab.lan("a", Nat::Masquerade, 1);
    let private_host = lab.lan_host(&lan, "priv", 10);
    let launch_gw = |b: &Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            extra: vec!["--set".into(), "autonat.only_global_ips=false".into()],
            ..Default::default()
        },
    );
    let service = [
        "--service".to_string(),
        "none=127.0.0.1:1,allow=12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".to_string(),
    ];
    let launch_pub = |b: &Path| public_host.cmd(b);
    let public = Agent::start(&launch_pub, &gw, Transport::Tcp, &[], true, &service);
    let launch_priv = |b: &Path| private_host.cmd(b);
    let private = Agent::start(&launch_priv, &gw, Transport::Tcp, &[], true, &service);
    let reachable = |host: &Host, a: &Agent| {
        let m = ns_get(host, a.admin, "/metrics");
        relaygate_tests::stack::metric(&m, "relaygate_agent_reachable")
    };
    assert!(
        eventually(Duration::from_secs(45), || reachable(&public_host, &public)
            == Some(1.0)),
        "an agent on the internet segment learns it is public (got {:?})",
        reachable(&public_host, &public)
    );
    assert!(
        eventually(Duration::from_secs(45), || reachable(
            &private_host,
            &private
        ) == Some(0.0)),
        "an agent behind a NAT learns it is private (got {:?})",
        reachable(&private_host, &private)
    );
}
