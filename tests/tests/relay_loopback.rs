//! The gateway's circuit relay v2 hop and services between agents, on
//! loopback, with real processes: who may reserve, which circuits carry a
//! Limit, what the hop answers to malformed messages, and a service's
//! allow-list and PROXY v2 peer id.

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use relaygate_common::{
    circuit::{decode_frame, HopMessage, HopType, Peer, Status},
    proxy,
};
use relaygate_tests::{
    procs::{free_tcp_port, Proc},
    rawpeer::RawPeer,
    stack::{
        agent_peer_id, eventually, here, metric_sum, round_trip, seed_peer_id, Agent, Gateway,
        GatewaySpec, Transport,
    },
};
use serde_json::Value;

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

fn lab_node(args: &[&str]) -> Proc {
    let mut cmd = std::process::Command::new(LAB_NODE);
    cmd.args(args);
    Proc::spawn("lab-node", cmd)
}

fn json(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or(Value::Null)
}

fn sum_matching(body: &str, family: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn relay_admits_members_limits_guests_and_refuses_strangers() {
    let guest = seed_peer_id(9);
    let mut gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec![
                "--set".into(),
                format!("relay.limited_peers={guest}"),
                // Short, so the test sees clients renew (at 3/4 of it).
                "--set".into(),
                "relay.reservation_ttl=4s".into(),
            ],
            ..Default::default()
        },
    );
    let relay = gw.addr(Transport::Tcp);

    // A peer that is neither an admitted agent nor listed may not reserve.
    let mut stranger = lab_node(&["reserve", "--relay", &relay, "--seed", "8"]);
    let refused = stranger
        .wait_for(
            |l| l.contains("reservation_failed"),
            Duration::from_secs(15),
        )
        .expect("stranger refused");
    assert!(refused.contains("PERMISSION_DENIED"), "{refused}");
    assert!(stranger
        .wait_exit(Duration::from_secs(5))
        .is_some_and(|s| !s.success()));

    // A listed guest reserves, and circuits to it carry the configured Limit.
    let guest_node = lab_node(&["reserve", "--relay", &relay, "--seed", "9"]);
    let r = guest_node
        .wait_for(|l| l.contains("\"reservation\""), Duration::from_secs(15))
        .expect("guest reserved");
    assert_eq!(json(&r)["limit"]["duration_secs"], 120, "{r}");
    assert_eq!(json(&r)["limit"]["data_bytes"], 131072, "{r}");
    let mut to_guest = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{guest}"),
        "--pings",
        "2",
    ]);
    let c = to_guest
        .wait_for(|l| l.contains("\"circuit\""), Duration::from_secs(15))
        .expect("circuit to guest");
    assert_eq!(json(&c)["limit"]["duration_secs"], 120, "{c}");
    assert_eq!(json(&c)["limit"]["data_bytes"], 131072, "{c}");
    assert!(to_guest
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));

    // An admitted agent is a member: circuits to it carry no Limit.
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[],
        true,
        &[
            "--service".into(),
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
    // Seed 3: on the agent's service allow-list (the agent refuses strangers).
    let mut to_member = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{agent_id}"),
        "--pings",
        "2",
        "--seed",
        "3",
    ]);
    let c = to_member
        .wait_for(|l| l.contains("\"circuit\""), Duration::from_secs(15))
        .expect("circuit to member");
    assert_eq!(json(&c)["limit"], Value::Null, "no Limit for a member: {c}");
    assert!(to_member
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));

    // A stranger's circuit to the agent is opened by the gateway, but the
    // agent refuses the connection over it: no identify, no DCUtR, no
    // streams for peers on no allow-list (issue #15, item 19; at 4462fed it
    // was served like any other).
    let mut stranger = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{agent_id}"),
        "--pings",
        "1",
        "--timeout-secs",
        "10",
    ]);
    assert!(stranger
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| !s.success()));
    assert!(
        eventually(Duration::from_secs(5), || metric_sum(
            &relaygate_tests::stack::http_get(agent.admin, "/metrics").1,
            "relaygate_agent_refusals_total{reason=\"stranger\"}"
        ) >= 1.0),
        "the agent refused and counted the stranger"
    );

    // No reservation, no circuit.
    let mut nowhere = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{}", seed_peer_id(4)),
        "--timeout-secs",
        "10",
    ]);
    assert!(nowhere
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| !s.success()));

    let m = gw.metrics();
    let denied = |reason: &str| {
        sum_matching(
            &m,
            "relaygate_gateway_relay_reservations_denied_total",
            reason,
        )
    };
    assert_eq!(denied("PERMISSION_DENIED"), 1.0, "{m}");
    assert!(
        sum_matching(
            &m,
            "relaygate_gateway_relay_reservations_accepted_total",
            "Member"
        ) >= 1.0
    );
    assert_eq!(
        sum_matching(
            &m,
            "relaygate_gateway_relay_reservations_accepted_total",
            "Limited"
        ),
        1.0
    );
    assert!(
        sum_matching(
            &m,
            "relaygate_gateway_relay_circuits_opened_total",
            "Member"
        ) >= 1.0
    );
    assert_eq!(
        sum_matching(
            &m,
            "relaygate_gateway_relay_circuits_opened_total",
            "Limited"
        ),
        1.0
    );
    assert!(
        sum_matching(
            &m,
            "relaygate_gateway_relay_circuits_denied_total",
            "NO_RESERVATION"
        ) >= 1.0
    );
    assert!(metric_sum(&m, "relaygate_gateway_relay_bytes_total") > 0.0);

    // Reservations are renewed before they expire.
    assert!(
        eventually(Duration::from_secs(15), || metric_sum(
            &gw.metrics(),
            "relaygate_gateway_relay_reservations_renewed_total"
        ) >= 1.0),
        "a client renewed its reservation"
    );

    // After the gateway restarts, the agent reserves again and is reachable.
    let reserved = |a: &Agent| {
        a.proc
            .lines()
            .iter()
            .filter(|l| l.contains("relay reservation active"))
            .count()
    };
    let before = reserved(&agent);
    gw.crash_and_restart(&here);
    assert!(
        eventually(Duration::from_secs(30), || reserved(&agent) > before),
        "the agent reserved again after the gateway restarted"
    );
    let mut again = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{agent_id}"),
        "--pings",
        "1",
        "--seed",
        "3",
    ]);
    assert!(again
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
}

fn hop_answer(raw: &RawPeer, bytes: &[u8]) -> Option<Status> {
    let back = raw
        .exchange("/libp2p/circuit/relay/0.2.0/hop", bytes)
        .expect("hop answers");
    let msg: HopMessage = decode_frame(&back).ok()?;
    assert_eq!(msg.kind(), Some(HopType::Status));
    Status::try_from(msg.status?).ok()
}

#[test]
fn relay_hop_answers_malformed_messages_and_keeps_serving() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let raw = RawPeer::connect(&gw.addr(Transport::Tcp)).expect("raw peer");
    // Garbage where a protobuf should be.
    assert_eq!(
        hop_answer(&raw, &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff]),
        Some(Status::MalformedMessage)
    );
    // A length prefix far over the 4 KiB bound.
    assert_eq!(
        hop_answer(&raw, &[0xff, 0xff, 0x7f]),
        Some(Status::MalformedMessage)
    );
    // A STATUS message is not a request.
    let status = prost::Message::encode_length_delimited_to_vec(&HopMessage::answer(Status::Ok));
    assert_eq!(hop_answer(&raw, &status), Some(Status::UnexpectedMessage));
    // CONNECT naming something that is not a peer id.
    let bad_peer = HopMessage {
        r#type: HopType::Connect as i32,
        peer: Some(Peer {
            id: vec![1, 2, 3],
            addrs: vec![],
        }),
        ..HopMessage::answer(Status::Ok)
    };
    let mut bad_peer = bad_peer;
    bad_peer.status = None;
    let bytes = prost::Message::encode_length_delimited_to_vec(&bad_peer);
    assert_eq!(hop_answer(&raw, &bytes), Some(Status::MalformedMessage));
    // A truncated message: the stream ends mid-frame.
    assert_eq!(
        hop_answer(&raw, &[0x10, 0x08]),
        Some(Status::MalformedMessage)
    );
    // A stranger's RESERVE is refused.
    let reserve = HopMessage {
        r#type: HopType::Reserve as i32,
        peer: None,
        reservation: None,
        limit: None,
        status: None,
    };
    let bytes = prost::Message::encode_length_delimited_to_vec(&reserve);
    assert_eq!(hop_answer(&raw, &bytes), Some(Status::PermissionDenied));

    let m = gw.metrics();
    assert!(
        metric_sum(&m, "relaygate_gateway_bad_input_total") >= 5.0,
        "{m}"
    );
    // Still serving: an honest agent's tunnel works.
    let echo = relaygate_tests::stack::Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("t")], true, &[]);
    let port = agent
        .wait_leased("t", Duration::from_secs(20))
        .expect("lease");
    assert_eq!(
        round_trip(port, b"still here").expect("round trip"),
        b"still here"
    );
}

/// A target that reads a PROXY v2 header first, records the peer id in it,
/// then echoes the rest.
fn proxy_echo() -> (u16, Arc<Mutex<Vec<Option<String>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let s = s.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (header, used) = loop {
                    let n = c.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match proxy::decode(&buf) {
                        Ok(Some(x)) => break x,
                        Ok(None) => continue,
                        Err(_) => return,
                    }
                };
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(header.peer_id.map(|p| p.to_string()));
                let _ = c.write_all(&buf[used..]);
                loop {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

#[test]
fn service_reaches_allowed_peers_with_their_peer_id_and_refuses_others() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (target, seen) = proxy_echo();
    let (b_dir, c_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let b_id = agent_peer_id(b_dir.path());
    let a = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[],
        true,
        &[
            "--service".into(),
            format!("echo=127.0.0.1:{target},allow={b_id},proxy=v2"),
        ],
    );
    a.proc
        .wait_for(
            |l| l.contains("relay reservation active"),
            Duration::from_secs(20),
        )
        .expect("A reserved");
    let a_id = agent_peer_id(a.dir.path());

    let visit = |dir: tempfile::TempDir, port: u16| {
        Agent::start_in(
            &here,
            &gw,
            Transport::Quic,
            &[],
            true,
            &[
                "connect".into(),
                a_id.clone(),
                "echo".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ],
            dir,
        )
    };
    let (b_port, c_port) = (free_tcp_port(), free_tcp_port());
    let b = visit(b_dir, b_port);
    b.proc
        .wait_for(|l| l.contains("visitor port open"), Duration::from_secs(20))
        .expect("B's port");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut back = Vec::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            back = round_trip(b_port, &data).unwrap_or_default();
            !back.is_empty()
        }),
        "B reached the service"
    );
    assert_eq!(back, data, "byte-exact through the service");
    assert_eq!(
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned()
            .flatten(),
        Some(b_id.clone()),
        "the target received the caller's peer id in the PROXY v2 TLV"
    );

    // C is not on the allow-list.
    let c = visit(c_dir, c_port);
    c.proc
        .wait_for(|l| l.contains("visitor port open"), Duration::from_secs(20))
        .expect("C's port");
    // A refuses C's connection outright (a stranger: on no allow-list), so C
    // never gets as far as a service stream.
    let refused = eventually(Duration::from_secs(20), || {
        let _ = round_trip(c_port, b"let me in");
        metric_sum(
            &relaygate_tests::stack::http_get(a.admin, "/metrics").1,
            "relaygate_agent_refusals_total{reason=\"stranger\"}",
        ) >= 1.0
    });
    assert!(refused, "A refused C");
    assert!(
        round_trip(c_port, b"let me in")
            .unwrap_or_default()
            .is_empty(),
        "C gets no byte through"
    );
    assert_eq!(
        seen.lock().unwrap_or_else(|e| e.into_inner()).len(),
        1,
        "C never reached the target"
    );
}

#[test]
fn an_idle_reservation_outlives_the_idle_connection_timeout() {
    // A peer without a session (a plain libp2p node) holds its reservation on an
    // otherwise idle connection; the gateway must not reap it after 30 s.
    let guest = seed_peer_id(11);
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), format!("relay.limited_peers={guest}")],
            ..Default::default()
        },
    );
    let relay = gw.addr(Transport::Tcp);
    let node = lab_node(&["reserve", "--relay", &relay, "--seed", "11"]);
    node.wait_for(|l| l.contains("\"reservation\""), Duration::from_secs(15))
        .expect("reserved");
    thread::sleep(Duration::from_secs(40));
    let mut dial = lab_node(&[
        "dial",
        "--addr",
        &format!("{relay}/p2p-circuit/p2p/{guest}"),
        "--pings",
        "1",
    ]);
    assert!(
        dial.wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "the reservation still works after 40 idle seconds"
    );
}
