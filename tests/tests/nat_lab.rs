//! The foundation path across a real NAT: a rust-libp2p node on a LAN behind
//! an nftables masquerade router is dialled by a remote peer at the gateway's
//! address, and keeps its own peer id end to end.

use std::time::Duration;

use relaygate_tests::{
    netlab::{require_root, Host, Lab, Nat},
    procs::Proc,
    stack::{Agent, Gateway, GatewaySpec, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

fn json_field(line: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    v.get(key).and_then(|x| x.as_str()).map(str::to_string)
}

fn start_node(host: &Host, port: u16) -> (Proc, String) {
    let mut cmd = host.cmd(LAB_NODE);
    cmd.args([
        "listen",
        "--listen",
        &format!("/ip4/0.0.0.0/tcp/{port}"),
        "--seed",
        "7",
    ]);
    let node = Proc::spawn("node", cmd);
    let line = node
        .wait_for(|l| l.contains("\"listening\""), Duration::from_secs(15))
        .expect("node listening");
    let peer = json_field(&line, "peer_id").expect("peer id");
    (node, peer)
}

fn reach_node_through_gateway(t: Transport) {
    let lab = Lab::new("rg").expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let remote = lab.internet_host("remote", 20);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node_host = lab.lan_host(&lan, "node", 10);

    // The LAN host is not reachable from the internet segment on its own.
    let (node, node_peer) = start_node(&node_host, 9905);
    let direct = format!("/ip4/{}/tcp/9905/p2p/{node_peer}", node_host.ip());
    let mut probe = remote.cmd(LAB_NODE);
    probe.args([
        "dial",
        "--addr",
        &direct,
        "--pings",
        "1",
        "--timeout-secs",
        "3",
    ]);
    let mut probe = Proc::spawn("probe", probe);
    let st = probe
        .wait_exit(Duration::from_secs(10))
        .expect("probe exits");
    assert!(
        !st.success(),
        "a LAN host must not be dialable from the internet"
    );

    let launch_gw = |b: &std::path::Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            ..Default::default()
        },
    );
    let launch_agent = |b: &std::path::Path| node_host.cmd(b);
    let agent = Agent::start(
        &launch_agent,
        &gw,
        t,
        &["node=127.0.0.1:9905".to_string()],
        true,
        &[],
    );
    let port = agent
        .wait_leased("node", Duration::from_secs(30))
        .expect("lease");
    let advertised = format!("/ip4/{}/tcp/{port}", gw_host.ip());
    agent
        .proc
        .wait_for(|l| l.contains(&advertised), Duration::from_secs(5))
        .expect("advertised the gateway address");

    let mut dial = remote.cmd(LAB_NODE);
    dial.args([
        "dial",
        "--addr",
        &format!("{advertised}/p2p/{node_peer}"),
        "--expect-peer",
        &node_peer,
        "--pings",
        "3",
    ]);
    let mut dial = Proc::spawn("remote", dial);
    let done = dial
        .wait_for(|l| l.contains("\"done\""), Duration::from_secs(30))
        .expect("remote pinged the node");
    assert_eq!(
        json_field(&done, "peer").as_deref(),
        Some(node_peer.as_str()),
        "remote saw the node's own peer id"
    );
    assert!(dial
        .wait_exit(Duration::from_secs(5))
        .is_some_and(|s| s.success()));
    // The node saw an inbound libp2p connection (through the agent) and pinged back.
    node.wait_for(
        |l| l.contains("\"connected\"") && l.contains("listener"),
        Duration::from_secs(5),
    )
    .expect("node accepted");
}

#[test]
fn node_behind_nat_is_reachable_at_the_gateway_over_quic_session() {
    if !require_root("node_behind_nat_is_reachable_at_the_gateway_over_quic_session") {
        return;
    }
    reach_node_through_gateway(Transport::Quic);
}

#[test]
fn node_behind_nat_is_reachable_at_the_gateway_over_tcp_session() {
    if !require_root("node_behind_nat_is_reachable_at_the_gateway_over_tcp_session") {
        return;
    }
    reach_node_through_gateway(Transport::Tcp);
}

#[test]
fn doctor_checks_everything_from_behind_the_nat() {
    if !require_root("doctor_checks_everything_from_behind_the_nat") {
        return;
    }
    let lab = Lab::new("dr").expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node_host = lab.lan_host(&lan, "node", 10);
    let (node, _peer) = start_node(&node_host, 9905);
    let launch_gw = |b: &std::path::Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            ..Default::default()
        },
    );
    let launch_agent = |b: &std::path::Path| node_host.cmd(b);
    let tunnels = ["node=127.0.0.1:9905".to_string()];
    let agent = Agent::start(&launch_agent, &gw, Transport::Quic, &tunnels, true, &[]);
    agent
        .wait_leased("node", Duration::from_secs(30))
        .expect("lease");

    let doctor = |label: &str| {
        let mut cmd = node_host.cmd(relaygate_tests::procs::workspace_bin("relaygate-agent"));
        cmd.arg("--data-dir").arg(agent.dir.path());
        cmd.args([
            "--gateway",
            &gw.addr(Transport::Quic),
            "--gateway",
            &gw.addr(Transport::Tcp),
        ]);
        cmd.args([
            "--admin-listen",
            &agent.admin.to_string(),
            "--tunnel",
            &tunnels[0],
            "doctor",
        ]);
        let mut p = Proc::spawn(label, cmd);
        let st = p
            .wait_exit(Duration::from_secs(60))
            .expect("doctor finishes");
        (st.success(), p.lines().join("\n"))
    };
    let (ok, out) = doctor("doctor");
    assert!(ok, "doctor should find nothing wrong:\n{out}");
    for want in [
        "gateway reachable at /ip4/203.0.113.10/udp",
        "gateway reachable at /ip4/203.0.113.10/tcp",
        "session up",
        "leased port",
        "target answered",
        "verdict: healthy",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }

    drop(node); // the target goes away
    let (ok, out) = doctor("doctor-2");
    assert!(!ok, "doctor must fail when the target is down:\n{out}");
    assert!(
        out.contains("[FAIL] dial-back") && out.contains("could not reach its target"),
        "{out}"
    );
    assert!(
        out.contains("fix: make sure the node listens on 127.0.0.1:9905"),
        "{out}"
    );
}
