//! The agent's side of the operator's console, with real processes: the
//! overview (`/v1/overview`), its event stream (`/v1/events`), doctor runs
//! in process (`POST /v1/doctor`) and from the CLI (handed over with
//! `PUT /v1/doctor`), and the page at `/ui/`.

use std::time::Duration;

use relaygate_tests::stack::{
    agent_peer_id, here, http_get, http_get_headers, http_request, round_trip, sse_frames, Agent,
    Echo, Gateway, GatewaySpec, Transport,
};
use serde_json::Value;

const LEASE: Duration = Duration::from_secs(20);

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A gateway, an echo target and an agent with one tunnel to it. The
/// gateway advertises a name, not its loopback IP, so doctor's check that
/// advertised addresses are public passes here (`127.0.0.1` as a DNS name:
/// it resolves to IPv4 loopback everywhere, where `localhost` may give
/// `::1` first, and the gateway's dial-back goes to the first advertised host).
fn stack() -> (Gateway, Echo, Agent, u16) {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            advertise_host: Some("/dns4/127.0.0.1".into()),
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
    (gw, echo, agent, port)
}

fn overview(agent: &Agent) -> Value {
    let (status, body) = http_get(agent.admin, "/v1/overview");
    assert_eq!(status, 200, "GET /v1/overview: {body}");
    json(&body)
}

#[test]
fn overview_shows_the_session_the_tunnel_and_the_last_doctor_run() {
    let (gw, _echo, agent, port) = stack();
    assert_eq!(round_trip(port, b"hi").expect("round trip"), b"hi");
    let peer = agent_peer_id(agent.dir.path());

    let o = overview(&agent);
    assert_eq!(o["role"], "agent", "{o:#}");
    assert_eq!(o["peer_id"], peer.as_str(), "{o:#}");
    assert!(
        o["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{o:#}"
    );
    assert!(o["uptime_secs"].is_u64(), "{o:#}");
    assert_eq!(
        o["advertise"]["session"]["gateway"],
        gw.peer_id.as_str(),
        "{o:#}"
    );
    let tunnels = o["advertise"]["tunnels"].as_array().expect("tunnels");
    let node = tunnels
        .iter()
        .find(|t| t["name"] == "node")
        .unwrap_or_else(|| panic!("no tunnel node in {o:#}"));
    assert_eq!(node["port"], port, "{o:#}");
    assert!(o["peers"].is_array(), "{o:#}");
    assert!(o["doctor"].is_null(), "no doctor run yet: {o:#}");
    // The same objects as the routes of their own.
    let advertise = json(&http_get(agent.admin, "/v1/advertise").1);
    for key in ["session", "sessions", "tunnels", "fleet", "circuit"] {
        assert_eq!(o["advertise"][key], advertise[key], "{key}: {o:#}");
    }
    assert!(json(&http_get(agent.admin, "/v1/peers").1).is_array());

    // In process.
    let (status, body) = http_request(agent.admin, "POST", "/v1/doctor", "");
    assert_eq!(status, 200, "POST /v1/doctor: {body}");
    let report = json(&body);
    assert_eq!(report["healthy"], true, "{report:#}");
    let checks = report["checks"].as_array().expect("checks");
    for name in ["session", "lease", "gateway", "dial-back", "advertise"] {
        assert!(
            checks.iter().any(|c| c["name"] == name && c["ok"] == true),
            "no passing {name} check in {report:#}"
        );
    }
    assert!(
        checks
            .iter()
            .all(|c| c["detail"].as_str().is_some_and(|d| !d.is_empty())),
        "{report:#}"
    );
    let first = report["ran_at"].as_u64().expect("ran_at");
    assert_eq!(overview(&agent)["doctor"], report, "the overview shows it");

    // From the CLI: its report replaces the last run (ran_at is in seconds).
    std::thread::sleep(Duration::from_millis(1100));
    let (ok, out) = agent.run_cli(&here, &["doctor"], Duration::from_secs(60));
    assert!(ok, "doctor should find nothing wrong:\n{out}");
    assert!(out.contains("verdict: healthy"), "{out}");
    let o = overview(&agent);
    let after = o["doctor"]["ran_at"].as_u64().expect("ran_at");
    assert!(
        after > first,
        "the CLI's run is the last: {first} then {o:#}"
    );
    assert_eq!(o["doctor"]["healthy"], true, "{o:#}");
    assert_eq!(
        o["doctor"]["checks"].as_array().map(Vec::len),
        Some(checks.len()),
        "the same checks either way: {o:#}"
    );

    // A report that is not one is refused, and the last run stays.
    let (status, _) = http_request(agent.admin, "PUT", "/v1/doctor", "{\"healthy\":1}");
    assert!((400..500).contains(&status), "HTTP {status}");
    assert_eq!(overview(&agent)["doctor"]["ran_at"], after);
}

#[test]
fn events_stream_the_overview_and_the_page_is_served() {
    let (_gw, _echo, agent, _port) = stack();
    let frames = sse_frames(agent.admin, "/v1/events", 2, Duration::from_secs(3));
    assert!(frames.len() >= 2, "2 frames within 3 s, got {frames:?}");
    for (event, data) in &frames {
        assert_eq!(event, "overview");
        let o = json(data);
        assert_eq!(o["role"], "agent", "{o:#}");
        assert!(o["advertise"]["tunnels"].is_array(), "{o:#}");
    }

    let (status, headers, body) = http_get_headers(agent.admin, "/ui/");
    assert_eq!(status, 200, "{body}");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert!(
        header("content-type").is_some_and(|v| v.starts_with("text/html")),
        "{headers:?}"
    );
    assert!(
        header("content-security-policy").is_some_and(|v| v.contains("default-src 'self'")),
        "{headers:?}"
    );
    assert!(body.to_ascii_lowercase().contains("<html"), "{body}");
}
