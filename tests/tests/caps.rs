//! Bandwidth caps enforced by the gateway, with real processes: a capped
//! tunnel moves at its cap each way while an uncapped tunnel of the same
//! agent is not slowed, and a cap set on the agent through the admin API
//! applies to its running tunnels and is lifted the same way.

use std::time::Duration;

use relaygate_tests::{
    stack::{agent_peer_id, here, http_request, metric, Agent, Gateway, GatewaySpec, Transport},
    targets::{download_rate, upload_rate, Sink, Source},
};

const LEASE: Duration = Duration::from_secs(20);
const CAP: f64 = 2_000_000.0;
const WARMUP: Duration = Duration::from_millis(500);
const RUN: Duration = Duration::from_secs(3);

fn within_10_percent(rate: f64, cap: f64) -> bool {
    (rate - cap).abs() <= cap * 0.10
}

#[test]
fn a_capped_tunnel_moves_at_its_cap_and_an_uncapped_one_is_not_slowed() {
    let conf = tempfile::tempdir().expect("tempdir");
    let file = conf.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[[bandwidth.tunnels]]\nname = \"up\"\ninbound = {CAP}\nburst = 65536\n\n\
             [[bandwidth.tunnels]]\nname = \"down\"\noutbound = {CAP}\nburst = 65536\n",
            CAP = CAP as u64
        ),
    )
    .expect("write config");
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--config".into(), file.display().to_string()],
            ..Default::default()
        },
    );
    let (sink, fast_sink, source) = (Sink::start(), Sink::start(), Source::start());
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[
            sink.tunnel("up"),
            source.tunnel("down"),
            fast_sink.tunnel("fast"),
        ],
        true,
        &[],
    );
    let up = agent.wait_leased("up", LEASE).expect("lease up");
    let down = agent.wait_leased("down", LEASE).expect("lease down");
    let fast = agent.wait_leased("fast", LEASE).expect("lease fast");

    // The capped upload and the uncapped one run at the same time.
    let fast_run = std::thread::spawn(move || upload_rate(fast, &fast_sink, WARMUP, RUN));
    let up_rate = upload_rate(up, &sink, WARMUP, RUN);
    let fast_rate = fast_run.join().expect("fast upload");
    eprintln!("capped upload {up_rate:.0} B/s, uncapped {fast_rate:.0} B/s, cap {CAP}");
    assert!(
        within_10_percent(up_rate, CAP),
        "capped inbound {up_rate:.0} B/s"
    );
    assert!(
        fast_rate > 4.0 * CAP,
        "the uncapped tunnel was slowed: {fast_rate:.0} B/s"
    );

    let down_rate = download_rate(down, WARMUP, RUN);
    eprintln!("capped download {down_rate:.0} B/s");
    assert!(
        within_10_percent(down_rate, CAP),
        "capped outbound {down_rate:.0} B/s"
    );

    let m = gw.metrics();
    for dir in ["inbound", "outbound"] {
        let held = metric(
            &m,
            &format!("relaygate_gateway_bandwidth_throttled_bytes_total{{direction=\"{dir}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(held > 0.0, "no {dir} bytes counted as throttled:\n{m}");
        let secs = metric(
            &m,
            &format!("relaygate_gateway_bandwidth_held_seconds_total{{direction=\"{dir}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(secs > 1.0, "{dir} held {secs} s");
    }
}

#[test]
fn an_agent_cap_set_through_the_admin_api_applies_at_once_and_lifts() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let sink = Sink::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[sink.tunnel("bulk")],
        true,
        &[],
    );
    let port = agent.wait_leased("bulk", LEASE).expect("lease");
    let id = agent_peer_id(agent.dir.path());
    let free = upload_rate(port, &sink, WARMUP, Duration::from_secs(1));
    assert!(free > 4.0 * CAP, "uncapped at first: {free:.0} B/s");

    let path = format!("/v1/agents/caps?agent={id}");
    let body = format!(
        "{{\"inbound\": {}, \"outbound\": 0, \"burst\": 65536}}",
        CAP as u64
    );
    let (status, answer) = http_request(gw.admin, "PUT", &path, &body);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"source\":\"admin\""), "{answer}");
    let capped = upload_rate(port, &sink, WARMUP, RUN);
    eprintln!("agent capped at {CAP}: {capped:.0} B/s (uncapped {free:.0})");
    assert!(within_10_percent(capped, CAP), "capped {capped:.0} B/s");

    let (status, answer) = http_request(gw.admin, "DELETE", &path, "");
    assert_eq!(status, 200, "{answer}");
    let again = upload_rate(port, &sink, WARMUP, Duration::from_secs(1));
    assert!(again > 4.0 * CAP, "lifted: {again:.0} B/s");

    // Bad input is refused with a reason, and counted.
    let (status, answer) = http_request(gw.admin, "PUT", "/v1/agents/caps?agent=nope", &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not a peer id"), "{answer}");
}
