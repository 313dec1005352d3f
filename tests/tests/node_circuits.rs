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
    (
        relaygate_tests::nodes::rust_node(LAB_NODE, seed, port),
        port,
    )
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
        "--echo-bytes",
        "300000",
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
    let e = find("echo");
    assert_eq!(field(&e, "same"), true, "a stream echoed byte-exact: {e}");
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

    // The node sees a plain connection and takes no DCUtR on it: a dialer
    // that tries is refused at once, and its connection goes on.
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args([
        "dial",
        "--addr",
        &circuit(&gw, &id),
        "--expect-peer",
        &id,
        "--pings",
        "1",
        "--try-dcutr",
    ]);
    let mut dcutr = Proc::spawn("dcutr", cmd);
    let ok = dcutr
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success());
    let lines = dcutr.lines();
    assert!(ok, "{}", lines.join("\n"));
    let answer = lines
        .iter()
        .find(|l| field(l, "event") == "dcutr")
        .cloned()
        .unwrap_or_else(|| panic!("no dcutr event in\n{}", lines.join("\n")));
    assert!(
        field(&answer, "result")
            .as_str()
            .is_some_and(|r| r.starts_with("refused")),
        "a clean refusal, not a hang: {answer}"
    );

    // A js-libp2p dialer too: a full connection to the node, not a limited one.
    if relaygate_tests::nodes::js_ready("the js-libp2p dialer of node_circuits") {
        let mut js = std::process::Command::new("node");
        js.arg(relaygate_tests::nodes::interop()).args([
            "dial",
            &circuit(&gw, &id),
            "--pings",
            "2",
        ]);
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

/// Forwards connections on a port of its own to `to`, except the first,
/// which it closes at once: the agent's own probe of the node fails, so it
/// claims the id it was given unchecked, and the gateway's check (the next
/// connection) meets the real node.
fn first_refused_then_forward(to: u16) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for (i, c) in listener.incoming().enumerate() {
            let Ok(c) = c else { continue };
            if i == 0 {
                drop(c);
                continue;
            }
            let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let (Ok(c2), Ok(up2)) = (c.try_clone(), up.try_clone()) else {
                continue;
            };
            let pipe = |mut a: std::net::TcpStream, mut b: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                })
            };
            pipe(c, up);
            pipe(up2, c2);
        }
    });
    port
}

#[test]
fn a_claim_the_node_does_not_prove_gets_no_circuit() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (_node, node_port) = node(7);
    let (real, claimed) = (seed_peer_id(7), seed_peer_id(8));
    let port = first_refused_then_forward(node_port);
    // Given id 8, while the node behind the tunnel holds 7.
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("n=127.0.0.1:{port},node_peer_id={claimed}")],
        true,
        &[],
    );
    agent
        .proc
        .wait_for(|l| l.contains("cannot check the node's peer id"), T)
        .expect("the agent's own probe failed, so it claims the given id unchecked");
    let refused = agent
        .proc
        .wait_for(|l| l.contains("refused the node's claim"), T)
        .expect("the gateway refused the claim");
    assert!(
        refused.contains(&format!("proved peer id {real}, not {claimed}")),
        "{refused}"
    );
    assert!(!http_get(gw.admin, "/v1/nodes").1.contains(&claimed));
    let (ok, out) = dial(&circuit(&gw, &claimed), &claimed);
    assert!(!ok, "no circuit to the claimed id:\n{}", out.join("\n"));
    assert!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"node_claim_unproven\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<relaygate_common::proxy::ProxyHeader>>>;

/// A PROXY-aware front for a libp2p node on `to`, as a node with PROXY
/// support is: an optional PROXY header is read and recorded, the rest
/// forwarded.
fn proxy_front(to: u16) -> (u16, Seen) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Seen::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let rest = loop {
                    let mut chunk = [0u8; 512];
                    let n = match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    match relaygate_common::proxy::decode(&buf) {
                        Ok(Some((h, used))) => {
                            if let Ok(mut r) = record.lock() {
                                r.push(h);
                            }
                            break buf.split_off(used);
                        }
                        Ok(None) => continue,
                        Err(_) => break buf,
                    }
                };
                let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    return;
                };
                if up.write_all(&rest).is_err() {
                    return;
                }
                let (Ok(mut c2), Ok(mut up2)) = (c.try_clone(), up.try_clone()) else {
                    return;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut c, &mut up);
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

#[test]
fn a_node_behind_proxy_v2_learns_the_dialers_peer_id() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (_node, node_port) = node(7);
    let id = seed_peer_id(7);
    let (port, seen) = proxy_front(node_port);
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!(
            "n=127.0.0.1:{port},deliver=proxy-v2,node_peer_id=auto"
        )],
        true,
        &[],
    );
    agent
        .proc
        .wait_for(
            |l| l.contains("node reachable by its own peer id") && l.contains(&id),
            T,
        )
        .expect("the gateway checked the node through its PROXY front");
    // A dialer with a known identity (seed 11).
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args([
        "dial",
        "--addr",
        &circuit(&gw, &id),
        "--expect-peer",
        &id,
        "--pings",
        "1",
        "--seed",
        "11",
    ]);
    let mut dialer = Proc::spawn("dialer", cmd);
    assert!(
        dialer.wait_exit(T).is_some_and(|s| s.success()),
        "{}",
        dialer.lines().join("\n")
    );
    let dialer_id: libp2p::PeerId = seed_peer_id(11).parse().expect("a peer id");
    let headers = seen.lock().map(|h| h.clone()).unwrap_or_default();
    let named = headers
        .iter()
        .find(|h| h.peer_id == Some(dialer_id))
        .unwrap_or_else(|| panic!("no PROXY header named the dialer: {headers:?}"));
    assert_eq!(
        named.source.map(|s| s.ip().to_string()).as_deref(),
        Some("127.0.0.1"),
        "{named:?}"
    );
}
