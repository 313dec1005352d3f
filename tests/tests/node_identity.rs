//! The agent learns its node's peer id from the node (issue #17, part 1): a
//! security handshake with the tunnel's target, as any dialer would run.
//! `node_peer_id=auto` advertises what it learnt; a given id that the node
//! does not hold is an error on the tunnel, with a `fix:` line.

use std::time::Duration;

use relaygate_tests::{
    procs::{free_tcp_port, Proc},
    stack::{here, http_get, seed_peer_id, Agent, Gateway, GatewaySpec, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const T: Duration = Duration::from_secs(20);

/// A rust-libp2p node (Noise + yamux over TCP) with the identity of `seed`.
fn node(seed: u8) -> (Proc, u16) {
    let port = free_tcp_port();
    (
        relaygate_tests::nodes::rust_node(LAB_NODE, seed, port),
        port,
    )
}

#[test]
fn the_agent_learns_its_nodes_peer_id_and_catches_a_wrong_one() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (_node, port) = node(7);
    let id = seed_peer_id(7);

    let auto = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("n=127.0.0.1:{port},node_peer_id=auto")],
        true,
        &[],
    );
    auto.proc
        .wait_for(
            |l| l.contains("learnt the node's peer id") && l.contains(&id),
            T,
        )
        .expect("the agent learnt the node's id");
    let leased = auto
        .proc
        .wait_for(|l| l.contains("tunnel leased"), T)
        .expect("lease");
    assert!(
        leased.contains(&format!("/p2p/{id}")),
        "advertised with the node's id: {leased}"
    );
    let (_, advertise) = http_get(auto.admin, "/v1/advertise");
    assert!(advertise.contains(&format!("/p2p/{id}")), "{advertise}");

    // A given id the node does not hold: an error on the tunnel, with the fix.
    let wrong = seed_peer_id(8);
    let given = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("n=127.0.0.1:{port},node_peer_id={wrong}")],
        true,
        &[],
    );
    let err = given
        .proc
        .wait_for(|l| l.contains("not the configured"), T)
        .expect("the mismatch is reported");
    assert!(
        err.contains(&format!("fix: set node_peer_id={id}")),
        "{err}"
    );
    assert!(
        relaygate_tests::stack::eventually(Duration::from_secs(10), || {
            let (code, body) = http_get(given.admin, "/health/ready");
            code == 503 && body.contains("not the configured")
        }),
        "the agent is not ready while its node holds another id"
    );

    // The right id, given: no error.
    let right = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("n=127.0.0.1:{port},node_peer_id={id}")],
        true,
        &[],
    );
    right
        .proc
        .wait_for(|l| l.contains("tunnel leased"), T)
        .expect("lease");
    assert!(right
        .proc
        .lines()
        .iter()
        .all(|l| !l.contains("not the configured")));
    assert_eq!(http_get(right.admin, "/health/ready").0, 200);
}
