//! Nodes reachable by their own peer id through the gateway's relay, in the
//! NAT lab (issue #17): a rust-libp2p node and a js-libp2p node behind a NAT,
//! each with an agent beside it (transparent delivery, `node_peer_id=auto`)
//! and no relay configuration of their own, are dialled at
//! `/p2p/<gateway>/p2p-circuit/p2p/<node>` from a rust-libp2p dialer and a
//! js-libp2p dialer on the internet segment: ping, the node's own identify,
//! a 1 MB stream echoed byte-exact, no Limit; each node sees the dialer's real address, and the rust node's
//! private-address gater lets it in.

use std::{path::Path, time::Duration};

use relaygate_tests::{
    netlab::{require_root, Host, Lab, Nat},
    nodes::{interop, js_ready},
    procs::Proc,
    stack::{seed_peer_id, Agent, Gateway, GatewaySpec, Transport},
};
use serde_json::Value;

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const T: Duration = Duration::from_secs(40);

fn json(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or(Value::Null)
}

/// A rust-libp2p dialer on `host`; its lines, and whether it finished.
fn rust_dial(host: &Host, addr: &str, expect: &str, more: &[&str]) -> (bool, Vec<String>) {
    let mut cmd = host.cmd(LAB_NODE);
    cmd.args([
        "dial",
        "--addr",
        addr,
        "--expect-peer",
        expect,
        "--pings",
        "2",
        "--timeout-secs",
        "20",
    ]);
    cmd.args(more);
    let mut p = Proc::spawn("rust-dialer", cmd);
    let ok = p.wait_exit(T).is_some_and(|s| s.success());
    (ok, p.lines())
}

/// A js-libp2p dialer on `host`; its lines, and whether it finished.
fn js_dial(host: &Host, addr: &str) -> (bool, Vec<String>) {
    let mut cmd = host.cmd("node");
    cmd.arg(interop())
        .args(["dial", addr, "--pings", "2", "--timeout-ms", "20000"]);
    let mut p = Proc::spawn("js-dialer", cmd);
    let ok = p.wait_exit(T).is_some_and(|s| s.success());
    (ok, p.lines())
}

fn event<'a>(lines: &'a [String], event: &str, peer: &str) -> Option<&'a String> {
    lines
        .iter()
        .find(|l| json(l)["event"] == event && (peer.is_empty() || json(l)["peer"] == peer))
}

#[test]
fn rust_and_js_nodes_behind_a_nat_are_reached_by_their_own_peer_ids() {
    let name = "rust_and_js_nodes_behind_a_nat_are_reached_by_their_own_peer_ids";
    if !require_root(name) || !js_ready(name) {
        return;
    }
    let lab = Lab::new("nc").expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let remote = lab.internet_host("remote", 20);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node_host = lab.lan_host(&lan, "node", 10);

    let launch_gw = |b: &Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            ..Default::default()
        },
    );

    // The nodes: plain libp2p hosts, no relay configuration. The rust one
    // refuses private source addresses.
    let mut rust = node_host.cmd(LAB_NODE);
    rust.args([
        "listen",
        "--listen",
        "/ip4/0.0.0.0/tcp/9905",
        "--deny-private-sources",
        "--seed",
        "7",
    ]);
    let rust = Proc::spawn("rust-node", rust);
    rust.wait_for(|l| l.contains("\"listening\""), T)
        .expect("rust node up");
    let mut js = node_host.cmd("node");
    js.arg(interop()).args([
        "listen",
        "/ip4/0.0.0.0/tcp/9906",
        "--seed",
        "5",
        "--ignore-stdin",
    ]);
    let js = Proc::spawn("js-node", js);
    js.wait_for(|l| l.contains("\"listening\""), T)
        .expect("js node up");
    let (rust_id, js_id) = (seed_peer_id(7), seed_peer_id(5));

    let ip = node_host.ip();
    let launch_agent = |b: &Path| node_host.cmd(b);
    let agents: Vec<Agent> = [
        format!("rust={ip}:9905,deliver=transparent,node_peer_id=auto"),
        format!("js={ip}:9906,deliver=transparent,node_peer_id=auto"),
    ]
    .iter()
    .map(|t| {
        Agent::start(
            &launch_agent,
            &gw,
            Transport::Quic,
            std::slice::from_ref(t),
            true,
            &[],
        )
    })
    .collect();
    for (agent, id) in agents.iter().zip([&rust_id, &js_id]) {
        agent
            .proc
            .wait_for(
                |l| l.contains("node reachable by its own peer id") && l.contains(id.as_str()),
                T,
            )
            .unwrap_or_else(|e| panic!("the gateway took the claim on {id}: {e}"));
    }

    let circuit = |node: &str| {
        format!(
            "/ip4/{}/tcp/{}/p2p/{}/p2p-circuit/p2p/{node}",
            gw_host.ip(),
            gw.tcp,
            gw.peer_id
        )
    };
    let remote_ip = remote.ip().to_string();

    // A rust dialer to each node; to the rust node a 1 MB stream too, echoed
    // back byte-exact.
    for (id, own_protocol, more) in [
        (
            &rust_id,
            Some("/relaygate-lab/1.0.0"),
            &["--echo-bytes", "1000000"][..],
        ),
        (&js_id, None, &[][..]),
    ] {
        let (ok, out) = rust_dial(&remote, &circuit(id), id, more);
        assert!(ok, "rust dialer reached {id}:\n{}", out.join("\n"));
        let c = event(&out, "circuit", "").expect("a circuit event");
        assert_eq!(json(c)["limit"], Value::Null, "no Limit: {c}");
        let identify = event(&out, "identify", id).expect("the node's own identify");
        if let Some(p) = own_protocol {
            assert_eq!(json(identify)["protocol_version"], p, "{identify}");
        }
        let pings = out
            .iter()
            .filter(|l| json(l)["event"] == "ping" && json(l)["peer"] == id.as_str())
            .count();
        assert!(pings >= 2, "{}", out.join("\n"));
        if !more.is_empty() {
            let e = event(&out, "echo", "").expect("an echo event");
            assert_eq!(json(e)["same"], true, "{e}");
            assert_eq!(json(e)["bytes"], 1_000_000, "{e}");
        }
    }
    // A js dialer to each node.
    for id in [&rust_id, &js_id] {
        let (ok, out) = js_dial(&remote, &circuit(id));
        assert!(ok, "js dialer reached {id}:\n{}", out.join("\n"));
        let c = event(&out, "connected", "").expect("connected");
        assert_eq!(json(c)["peer"], id.as_str(), "{c}");
        assert_eq!(json(c)["limited"], false, "not limited: {c}");
        assert_eq!(
            out.iter().filter(|l| json(l)["event"] == "ping").count(),
            2,
            "{}",
            out.join("\n")
        );
    }

    // Each node saw the dialers' real address (transparent delivery), and
    // the rust node's private-address gater let them in.
    let real = format!("/ip4/{remote_ip}/tcp/");
    let rust_saw: Vec<String> = rust
        .lines()
        .into_iter()
        .filter(|l| json(l)["event"] == "connected")
        .map(|l| json(&l)["remote_addr"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        rust_saw.len() >= 2 && rust_saw.iter().all(|a| a.starts_with(&real)),
        "the rust node saw {rust_saw:?}, want {real}..."
    );
    assert!(
        !rust.lines().iter().any(|l| json(l)["event"] == "denied"),
        "the gater refused a dialer"
    );
    let js_saw: Vec<String> = js
        .lines()
        .into_iter()
        .filter(|l| json(l)["event"] == "inbound")
        .map(|l| json(&l)["remote_addr"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        js_saw.len() >= 2 && js_saw.iter().all(|a| a.starts_with(&real)),
        "the js node saw {js_saw:?}, want {real}..."
    );
    drop(agents);
    drop(lab);
}
