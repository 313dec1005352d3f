//! Interop with a real js-libp2p 3.x node (tests/js, installed by `npm ci`):
//! it dials an agent's circuit address through the gateway's relay, pings it,
//! and its connection is not marked limited; a js node that is not a member
//! cannot reserve.

use std::{process::Command, time::Duration};

use relaygate_tests::{
    procs::Proc,
    stack::{agent_peer_id, here, seed_peer_id, Agent, Gateway, GatewaySpec, Transport},
};
use serde_json::Value;

fn js(args: &[&str]) -> Proc {
    let mut cmd = Command::new("node");
    cmd.arg(relaygate_tests::nodes::interop()).args(args);
    // Proc kills it when dropped, so a failing test leaves no node behind.
    Proc::spawn("js", cmd)
}

fn json(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or(Value::Null)
}

#[test]
fn js_libp2p_reaches_an_agent_through_the_relay_unlimited() {
    if !relaygate_tests::nodes::js_ready("js_libp2p_reaches_an_agent_through_the_relay_unlimited") {
        return;
    }
    let gw = Gateway::start(&here, GatewaySpec::default());
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[],
        true,
        &[
            "--service".into(),
            // The js node's identity (--seed 3): the agent takes connections
            // only from its gateway and allow-listed peers.
            format!("none=127.0.0.1:1,allow={}", seed_peer_id(3)),
        ],
    );
    agent
        .proc
        .wait_for(
            |l| l.contains("relay reservation active"),
            Duration::from_secs(20),
        )
        .expect("agent reserved");
    let agent_id = agent_peer_id(agent.dir.path());
    let circuit = format!("{}/p2p-circuit/p2p/{agent_id}", gw.addr(Transport::Tcp));

    let mut dial = js(&["dial", &circuit, "--pings", "3", "--seed", "3"]);
    let connected = dial
        .wait_for(|l| l.contains("\"connected\""), Duration::from_secs(40))
        .expect("js connected");
    let c = json(&connected);
    assert_eq!(c["peer"], agent_id.as_str(), "{connected}");
    assert_eq!(c["limited"], false, "not a limited connection: {connected}");
    assert_eq!(c["relay_limit_bytes"], Value::Null, "{connected}");
    assert_eq!(c["relay_limit_seconds"], Value::Null, "{connected}");
    dial.wait_for(|l| l.contains("\"done\""), Duration::from_secs(30))
        .expect("js pinged the agent three times");
    let pings = dial
        .lines()
        .iter()
        .filter(|l| l.contains("\"ping\""))
        .count();
    assert_eq!(pings, 3);
    assert!(dial
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let m = gw.metrics();
    assert!(
        m.lines().any(|l| l
            .starts_with("relaygate_gateway_relay_circuits_opened_total{class=\"Member\"}")
            && !l.ends_with(" 0")),
        "{m}"
    );

    // A js node that is not a member cannot reserve.
    let mut reserve = js(&["reserve", &gw.addr(Transport::Tcp), "--timeout-ms", "10000"]);
    let err = reserve
        .wait_for(|l| l.contains("\"error\""), Duration::from_secs(30))
        .expect("js reservation refused");
    assert_eq!(json(&err)["status"], "PERMISSION_DENIED", "{err}");
    assert!(reserve
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| !s.success()));
}
