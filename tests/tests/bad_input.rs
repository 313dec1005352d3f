//! Bad input gets a clear error to its sender and in the log, is counted, and
//! never costs another user's connection.

use std::{io::Write, net::TcpStream, process::Command, time::Duration};

use relaygate_common::protocol::{ControlMessage, RefusalCode};
use relaygate_tests::{
    procs::workspace_bin,
    rawpeer::RawPeer,
    stack::{eventually, here, metric, round_trip, Agent, Echo, Gateway, GatewaySpec, Transport},
};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn refusal(m: Option<ControlMessage>) -> (RefusalCode, String) {
    match m {
        Some(ControlMessage::Refused(r)) => (r.code, r.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn malformed_control_messages_are_refused_counted_and_harmless() {
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
    let port = agent.wait_leased("node", Duration::from_secs(20)).unwrap();
    // An honest transfer runs while the garbage arrives.
    let honest = std::thread::spawn(move || {
        let data: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
        round_trip(port, &data).map(|b| b == data)
    });

    let peer = RawPeer::connect(&gw.addr(Transport::Tcp)).expect("raw peer connects");
    let proto = "/relaygate/control/1";
    let (code, msg) = refusal(peer.send(proto, &[0xff, 0xff, 0xff, 0xff]).unwrap());
    assert_eq!(code, RefusalCode::BadRequest);
    assert!(msg.contains("exceeds the limit"), "{msg}");

    let (code, msg) = refusal(peer.send(proto, &frame(b"\x00\x01garbage")).unwrap());
    assert_eq!(code, RefusalCode::BadRequest);
    assert!(msg.contains("malformed"), "{msg}");

    let (code, msg) = refusal(
        peer.send(
            proto,
            &frame(br#"{"type":"hello","version":99,"tunnels":[]}"#),
        )
        .unwrap(),
    );
    assert_eq!(code, RefusalCode::UnsupportedVersion);
    assert!(msg.contains("99"), "{msg}");

    let (code, _) = refusal(
        peer.send(
            proto,
            &frame(br#"{"type":"hello","version":1,"tunnels":[{"name":"a b"}]}"#),
        )
        .unwrap(),
    );
    assert_eq!(code, RefusalCode::BadRequest);

    // truncated: half a frame, then end of stream
    let _ = peer.send(proto, &frame(br#"{"type":"hello"}"#)[..7]);

    // a valid hello without a token: refused as not admitted
    let (code, msg) = refusal(
        peer.send(
            proto,
            &frame(br#"{"type":"hello","version":1,"tunnels":[{"name":"x"},{"name":"x"}]}"#),
        )
        .unwrap(),
    );
    assert_eq!(code, RefusalCode::NotAdmitted);
    assert!(msg.contains("admission.allow"), "{msg}");

    assert!(
        eventually(Duration::from_secs(3), || {
            let m = gw.metrics();
            ["oversized", "malformed", "version", "truncated"]
                .iter()
                .all(|k| {
                    metric(
                        &m,
                        &format!("relaygate_gateway_bad_input_total{{reason=\"{k}\"}}"),
                    )
                    .unwrap_or(0.0)
                        >= 1.0
                })
        }),
        "{}",
        gw.metrics()
    );
    assert!(
        honest.join().unwrap().unwrap(),
        "honest transfer byte-exact"
    );
    assert_eq!(
        round_trip(port, b"still serving").unwrap(),
        b"still serving"
    );
}

#[test]
fn duplicate_tunnel_names_in_one_hello_are_refused_per_tunnel() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let peer = RawPeer::connect(&gw.addr(Transport::Quic)).unwrap();
    let hello = format!(
        r#"{{"type":"hello","version":1,"token":"{}","tunnels":[{{"name":"x"}},{{"name":"x"}}]}}"#,
        gw.token
    );
    match peer
        .send("/relaygate/control/1", &frame(hello.as_bytes()))
        .unwrap()
    {
        Some(ControlMessage::Welcome(w)) => {
            let s = format!("{:?}", w.leases);
            assert!(s.contains("Granted") && s.contains("DuplicateName"), "{s}");
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[test]
fn garbage_on_the_libp2p_port_is_counted_and_the_gateway_stays_up() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    for _ in 0..20 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", gw.tcp)) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\x13garbage");
        }
    }
    assert!(eventually(Duration::from_secs(10), || {
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"handshake_failed\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    }));
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", Duration::from_secs(20)).unwrap();
    assert_eq!(round_trip(port, b"alive").unwrap(), b"alive");
}

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin(bin))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_config_and_key_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "listen = [\"/ip4/0.0.0.0/tcp/4001\"]\nlisten_typo = 1\n",
    )
    .unwrap();
    let (code, err) = run(
        "relaygate-gateway",
        &["--config", cfg.to_str().unwrap(), "check-config"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("listen_typo"), "{err}");

    let (code, err) = run(
        "relaygate-gateway",
        &["--listen", "/ip4/not-an-ip/tcp/1", "check-config"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid"), "{err}");

    let (code, err) = run(
        "relaygate-gateway",
        &["--advertise", "/tcp/4001", "check-config"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("advertise"), "{err}");

    let (code, err) = run(
        "relaygate-agent",
        &[
            "--gateway",
            "/ip4/127.0.0.1/tcp/4001",
            "--tunnel",
            "a=127.0.0.1:1",
            "check-config",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("/p2p/"), "{err}");

    let (code, err) = run(
        "relaygate-agent",
        &["--tunnel", "bad name=127.0.0.1:1", "check-config"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("tunnel name"), "{err}");

    let key = dir.path().join("identity.key");
    std::fs::write(&key, "definitely not a key").unwrap();
    let (code, err) = run(
        "relaygate-gateway",
        &["--data-dir", dir.path().to_str().unwrap(), "peer-id"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not a valid key"), "{err}");

    // a go-libp2p style hex key (64 raw Ed25519 bytes) is accepted
    let hexkey = "0".repeat(62) + "01" + &"0".repeat(64);
    let (code, err) = run(
        "relaygate-gateway",
        &["--set", &format!("identity.key={hexkey}"), "peer-id"],
    );
    assert_ne!(code, 0, "mismatched public half must be refused: {err}");

    let kp = libp2p::identity::ed25519::Keypair::generate();
    let expected = libp2p::identity::Keypair::from(kp.clone())
        .public()
        .to_peer_id()
        .to_string();
    let out = Command::new(workspace_bin("relaygate-gateway"))
        .args([
            "--set",
            &format!("identity.key={}", hex::encode(kp.to_bytes())),
            "peer-id",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);

    std::fs::remove_file(&key).unwrap();
    let (code, err) = run(
        "relaygate-gateway",
        &[
            "--admin-listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("admin.token"), "{err}");
}

#[test]
fn check_config_masks_secrets() {
    let out = Command::new(workspace_bin("relaygate-agent"))
        .args([
            "--gateway",
            "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "--tunnel",
            "a=127.0.0.1:1",
            "check-config",
        ])
        .env("RELAYGATE_GATEWAY__TOKEN", "rgt_supersecret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("supersecret"), "{stdout}");
    assert!(stdout.contains("token = \"***\""), "{stdout}");
}

#[test]
fn environment_overrides_file_and_flags_override_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[leases]\nport_range = \"30000-30010\"\nmax_tunnels_per_agent = 3\n",
    )
    .unwrap();
    let out = Command::new(workspace_bin("relaygate-gateway"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--log-format",
            "json",
            "check-config",
        ])
        .env("RELAYGATE_LEASES__PORT_RANGE", "31000-31010")
        .env("RELAYGATE_SESSION__MAX_STREAMS", "77")
        .env("RELAYGATE_ADMISSION__TOKEN", "0123456789")
        .env(
            "RELAYGATE_ADVERTISE",
            "/dns4/gw.example.com/tcp/4001,/dns4/gw.example.com/udp/4001/quic-v1",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("port_range = \"31000-31010\""),
        "env beats file: {stdout}"
    );
    assert!(
        stdout.contains("max_tunnels_per_agent = 3"),
        "file beats defaults: {stdout}"
    );
    assert!(
        stdout.contains("/dns4/gw.example.com/udp/4001/quic-v1"),
        "env lists: {stdout}"
    );
    assert!(
        stdout.contains("format = \"json\""),
        "flags beat file: {stdout}"
    );
    assert!(
        stdout.contains("max_streams = 77"),
        "numbers parse from env text: {stdout}"
    );
    let out = Command::new(workspace_bin("relaygate-gateway"))
        .args(["--config", cfg.to_str().unwrap(), "token"])
        .env("RELAYGATE_ADMISSION__TOKEN", "0123456789")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0123456789",
        "an all-digit secret stays text"
    );
}

#[test]
fn garbled_stream_headers_are_answered_counted_and_harmless() {
    use relaygate_common::protocol::{StreamHeader, StreamStatus};
    use relaygate_tests::rawpeer::FakeGateway;

    let echo = Echo::start();
    let fake = FakeGateway::start("node", 20000).expect("fake gateway");
    let admin: std::net::SocketAddr =
        format!("127.0.0.1:{}", relaygate_tests::procs::free_tcp_port())
            .parse()
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(workspace_bin("relaygate-agent"));
    cmd.arg("--data-dir").arg(dir.path()).args([
        "--gateway",
        &fake.addr.to_string(),
        "--admin-listen",
        &admin.to_string(),
    ]);
    cmd.args(["--tunnel", &echo.tunnel("node")]);
    let agent = relaygate_tests::procs::Proc::spawn("agent", cmd);
    agent
        .wait_for(|l| l.contains("tunnel leased"), Duration::from_secs(20))
        .expect("agent joined the fake gateway");

    let good = StreamHeader {
        tunnel: "node".parse().unwrap(),
        source: "203.0.113.5:4000".parse().unwrap(),
        destination: "198.51.100.1:20000".parse().unwrap(),
        peer: None,
    }
    .encode();
    let mut bad_version = good.clone();
    bad_version[0] = 7;
    let mut bad_family = good.clone();
    bad_family[6] = 9;
    let unknown = StreamHeader {
        tunnel: "other".parse().unwrap(),
        ..StreamHeader::decode(&good).unwrap().unwrap().0
    }
    .encode();
    for (bytes, want) in [
        (bad_version, Some(StreamStatus::BadHeader as u8)),
        (bad_family, Some(StreamStatus::BadHeader as u8)),
        (vec![1, 200], Some(StreamStatus::BadHeader as u8)), // oversized name length
        (good[..5].to_vec(), Some(StreamStatus::BadHeader as u8)), // truncated
        (unknown, Some(StreamStatus::UnknownTunnel as u8)),
        (good.clone(), Some(StreamStatus::Connected as u8)),
    ] {
        assert_eq!(fake.tunnel_stream(&bytes).unwrap(), want, "{bytes:?}");
    }
    assert!(eventually(Duration::from_secs(3), || {
        let m = relaygate_tests::stack::http_get(admin, "/metrics").1;
        metric(&m, "relaygate_agent_bad_input_total{reason=\"version\"}").unwrap_or(0.0) >= 1.0
            && metric(&m, "relaygate_agent_bad_input_total{reason=\"bad_header\"}").unwrap_or(0.0)
                >= 2.0
            && metric(&m, "relaygate_agent_bad_input_total{reason=\"truncated\"}").unwrap_or(0.0)
                >= 1.0
            && metric(
                &m,
                "relaygate_agent_refusals_total{reason=\"unknown_tunnel\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
    }));
    agent
        .wait_for(
            |l| l.contains("bad tunnel stream header"),
            Duration::from_secs(2),
        )
        .expect("logged");
}
