//! A node reachable by its own peer id through the gateway's relay (issue
//! #17, parts 2-4), on loopback: the agent claims the node it learnt, the
//! gateway checks the claim through the tunnel, and a rust-libp2p dialer
//! reaches the node at `/p2p/<gateway>/p2p-circuit/p2p/<node>`: ping,
//! identify (the node's own), no Limit. A second agent claiming the same
//! node is refused, and a node id nobody fronts gets no circuit.

use std::{path::Path, time::Duration};

use relaygate_tests::{
    procs::{free_tcp_port, Proc},
    stack::{here, http_get, metric, seed_peer_id, Agent, Gateway, GatewaySpec, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const T: Duration = Duration::from_secs(20);

fn field(line: &str, key: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    v.get(key).cloned().unwrap_or_default()
}

/// A rust-libp2p node (Noise + yamux over TCP) with the identity of `seed`.
fn node(seed: u8) -> (Proc, u16) {
    node_on(seed, free_tcp_port())
}

fn node_on(seed: u8, port: u16) -> (Proc, u16) {
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args([
        "listen",
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{port}"),
        "--seed",
        &seed.to_string(),
    ]);
    let p = Proc::spawn("node", cmd);
    p.wait_for(|l| l.contains("\"listening\""), T)
        .expect("node up");
    (p, port)
}

/// Dials `addr` with a rust-libp2p node; its output lines and whether it succeeded.
fn dial(addr: &str, expect: &str) -> (bool, Vec<String>) {
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args([
        "dial",
        "--addr",
        addr,
        "--expect-peer",
        expect,
        "--pings",
        "2",
        "--timeout-secs",
        "15",
    ]);
    let mut p = Proc::spawn("dialer", cmd);
    let ok = p
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success());
    (ok, p.lines())
}

fn circuit(gw: &Gateway, node: &str) -> String {
    format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}/p2p-circuit/p2p/{node}",
        gw.tcp, gw.peer_id
    )
}

#[test]
fn a_node_is_reachable_by_its_own_peer_id_through_the_gateways_relay() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (node, port) = node(7);
    let id = seed_peer_id(7);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("advertise");
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!(
            "n=127.0.0.1:{port},node_peer_id=auto,advertise_file={}",
            file.display()
        )],
        true,
        &["--set".into(), "node_recheck=1s".into()],
    );
    let line = agent
        .proc
        .wait_for(
            |l| l.contains("node reachable by its own peer id") && l.contains(&id),
            T,
        )
        .expect("the gateway checked the node and took the claim");
    assert!(line.contains(&format!("/p2p-circuit/p2p/{id}")), "{line}");
    // Published beside the leased port's addresses.
    let adv = http_get(agent.admin, "/v1/advertise").1;
    let v: serde_json::Value = serde_json::from_str(&adv).expect("json");
    let circuits = v["tunnels"][0]["circuits"].to_string();
    assert!(
        circuits.contains(&format!("/p2p/{}/p2p-circuit/p2p/{id}", gw.peer_id)),
        "{adv}"
    );
    let written = std::fs::read_to_string(&file).expect("advertise file");
    assert!(
        written.contains("/tcp/") && written.contains("/p2p-circuit/p2p/"),
        "{written}"
    );
    let listed = http_get(gw.admin, "/v1/nodes").1;
    assert!(
        listed.contains(&id) && listed.contains(&agent_id(&agent)),
        "{listed}"
    );

    // A dialer that knows only the node's peer id and the gateway.
    let (ok, out) = dial(&circuit(&gw, &id), &id);
    assert!(ok, "the dialer reached the node:\n{}", out.join("\n"));
    let find = |event: &str| {
        out.iter()
            .find(|l| field(l, "event") == event)
            .cloned()
            .unwrap_or_else(|| panic!("no {event} in\n{}", out.join("\n")))
    };
    let c = find("circuit");
    assert_eq!(field(&c, "limit"), serde_json::Value::Null, "no Limit: {c}");
    // The node's own identify (the gateway, the relay, answers its own first).
    let identify = out
        .iter()
        .find(|l| field(l, "event") == "identify" && field(l, "peer") == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no identify from the node in\n{}", out.join("\n")));
    assert_eq!(
        field(&identify, "protocol_version"),
        "/relaygate-lab/1.0.0",
        "the node's own identify: {identify}"
    );
    assert!(
        out.iter()
            .filter(|l| field(l, "event") == "ping" && field(l, "peer") == id.as_str())
            .count()
            >= 2
    );
    // The node itself saw the connection, end to end.
    node.wait_for(|l| l.contains("\"connected\""), T)
        .expect("the node saw the dialer");
    assert!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_relay_circuits_opened_total{class=\"Node\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // A js-libp2p dialer too: a full connection to the node, not a limited one.
    if js_ready() {
        let mut js = std::process::Command::new("node");
        js.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/js/interop.mjs"))
            .args(["dial", &circuit(&gw, &id), "--pings", "2"]);
        let mut js = Proc::spawn("js", js);
        let ok = js
            .wait_exit(Duration::from_secs(40))
            .is_some_and(|s| s.success());
        let lines = js.lines();
        assert!(ok, "js reached the node:\n{}", lines.join("\n"));
        let c = lines
            .iter()
            .find(|l| field(l, "event") == "connected")
            .cloned()
            .unwrap_or_default();
        assert_eq!(field(&c, "peer"), id.as_str(), "{c}");
        assert_eq!(field(&c, "limited"), false, "{c}");
    }

    // A second agent fronting the same node is refused.
    let twin = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("twin=127.0.0.1:{port},node_peer_id=auto")],
        true,
        &["--set".into(), "node_recheck=600s".into()],
    );
    let refused = twin
        .proc
        .wait_for(|l| l.contains("refused the node's claim"), T)
        .expect("the twin's claim is refused");
    assert!(refused.contains("fronted by agent"), "{refused}");
    assert!(http_get(gw.admin, "/v1/nodes")
        .1
        .contains(&agent_id(&agent)));

    // A node id nobody fronts gets no circuit.
    let stranger = seed_peer_id(9);
    let (ok, out) = dial(&circuit(&gw, &stranger), &stranger);
    assert!(
        !ok,
        "no circuit to a node nobody fronts:\n{}",
        out.join("\n")
    );

    // The node comes back with another identity: the agent notices, claims
    // the new id, and circuits to the old one are refused.
    drop(node);
    let (_node, _) = node_on(8, port);
    let new_id = seed_peer_id(8);
    agent
        .proc
        .wait_for(
            |l| l.contains("node reachable by its own peer id") && l.contains(&new_id),
            T,
        )
        .expect("the agent claimed the node's new id");
    let (ok, out) = dial(&circuit(&gw, &new_id), &new_id);
    assert!(ok, "the new id is reachable:\n{}", out.join("\n"));
    let (ok, out) = dial(&circuit(&gw, &id), &id);
    assert!(!ok, "the old id is not:\n{}", out.join("\n"));

    // The agent gone, its node is no longer reachable through the relay.
    drop(agent);
    assert!(
        relaygate_tests::stack::eventually(Duration::from_secs(10), || !http_get(
            gw.admin,
            "/v1/nodes"
        )
        .1
        .contains(&new_id)),
        "the node is let go with the agent's session"
    );
}

fn agent_id(agent: &Agent) -> String {
    relaygate_tests::stack::agent_peer_id(Path::new(agent.dir.path()))
}

/// node and the js harness installed; a loud skip line otherwise, and a
/// failure under `CI=true`.
fn js_ready() -> bool {
    let modules = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/js/node_modules/libp2p"
    ))
    .exists();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if node && modules {
        return true;
    }
    let msg = "!!! SKIPPED the js-libp2p dialer of node_circuits: needs node and `npm ci --prefix tests/js` !!!";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{msg} (CI=true, and a skipped test must fail CI)"
    );
    eprintln!("{msg}");
    false
}
