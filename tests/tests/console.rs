//! The operator's console in a real browser (headless chromium through
//! playwright-core): what an operator sees and does on `/ui/`, against real
//! gateway and agent processes, with real connections through the tunnel.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use relaygate_tests::{
    browser::{browser_ready, Browser},
    stack::{
        self, agent_peer_id, echoes, eventually, here, http_get, Agent, Echo, Gateway, GatewaySpec,
        Transport,
    },
    targets::{upload_rate, Sink},
};

const LEASE: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(5);

/// A connection from `from` (a loopback address) that echoed once.
fn connect_from(from: &str, port: u16) -> Option<TcpStream> {
    let mut s = stack::connect_from(from, port).ok()?;
    echoes(&mut s, b"ping").then_some(s)
}

fn ui(admin: SocketAddr) -> String {
    format!("http://{admin}/ui/")
}

#[test]
fn the_gateway_console_shows_agents_and_connections_and_acts() {
    if !browser_ready("the_gateway_console_shows_agents_and_connections_and_acts") {
        return;
    }
    let gw = Gateway::start(&here, GatewaySpec::default());
    let (echo, sink) = (Echo::start(), Sink::start());
    let mut b = Browser::start();
    b.open(&ui(gw.admin), None, 1280);
    b.wait_text("[data-testid=live]", "live", SHORT);

    // An agent and its tunnels appear within 2 s of connecting.
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node"), sink.tunnel("bulk")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease node");
    let bulk = agent.wait_leased("bulk", LEASE).expect("lease bulk");
    let id = agent_peer_id(agent.dir.path());
    let card = format!("[data-testid=\"agent-{id}\"]");
    let shown = Instant::now();
    b.wait_text(
        &format!("{card} [data-testid=\"tunnel-node\"]"),
        &port.to_string(),
        Duration::from_millis(2000),
    );
    eprintln!("agent on the page {:?} after its lease", shown.elapsed());

    // A live connection shows the client's real source.
    let _held = connect_from("127.0.0.3", port).expect("connection from 127.0.0.3");
    b.wait_text(&format!("{card} [data-testid=conn]"), "127.0.0.3:", SHORT);

    // A ban added on the page refuses that address, and only it.
    b.fill("[data-testid=ban-target]", "127.0.0.4");
    b.fill("[data-testid=ban-reason]", "console test");
    b.click("[data-testid=ban-submit]");
    b.wait_text("[data-testid=ban-row]", "127.0.0.4", SHORT);
    assert!(
        connect_from("127.0.0.4", port).is_none(),
        "a source banned on the page got through"
    );
    assert!(
        connect_from("127.0.0.3", port).is_some(),
        "an honest source was refused"
    );
    b.click("[data-testid=ban-row]:has-text(\"127.0.0.4\") [data-testid=ban-lift]");
    b.wait_gone("[data-testid=ban-row]:has-text(\"127.0.0.4\")", SHORT);
    assert!(
        eventually(SHORT, || connect_from("127.0.0.4", port).is_some()),
        "lifted on the page, still refused"
    );

    // The throughput chart moves while a transfer runs, and comes back.
    let bps = |b: &mut Browser| -> f64 {
        b.attr("[data-testid=throughput-chart]", "data-last-bps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let transfer = std::thread::spawn(move || {
        upload_rate(bulk, &sink, Duration::ZERO, Duration::from_secs(4))
    });
    assert!(
        eventually(Duration::from_secs(4), || bps(&mut b) > 8_000_000.0),
        "chart did not show the transfer: {} bit/s",
        bps(&mut b)
    );
    let rate = transfer.join().expect("transfer");
    eprintln!("transfer {rate:.0} B/s; chart peak seen above 8 Mbit/s");
    assert!(
        eventually(Duration::from_secs(5), || bps(&mut b) < 1_000_000.0),
        "chart did not come back down"
    );
    let points: u64 = b
        .attr("[data-testid=throughput-chart]", "data-points")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(points >= 5, "{points} samples");

    // A lease revoked on the page frees its port; the agent leases another.
    let seen = agent.lease_count("node");
    let row = format!("[data-testid=\"lease-{port}\"]");
    b.click(&format!("{row} [data-testid=lease-revoke]"));
    b.click(&format!("{row} [data-testid=lease-revoke]"));
    let again = agent
        .wait_leased_again("node", seen, LEASE)
        .expect("the agent asks for a new lease");
    assert_ne!(again, port, "given the revoked port back");
    b.wait_gone(&row, SHORT);
    b.wait(&format!("[data-testid=\"lease-{again}\"]"), SHORT);
    assert!(
        connect_from("127.0.0.1", port).is_none(),
        "the revoked port still serves"
    );
    assert!(connect_from("127.0.0.1", again).is_some(), "the new port");

    let errors = b.errors();
    assert!(errors.is_empty(), "page errors: {errors:?}");

    // Readable on a phone: nothing wider than the screen.
    b.open(&ui(gw.admin), None, 375);
    b.wait(&card, SHORT);
    assert!(!b.overflows(), "the page scrolls sideways at 375 px");
}

#[test]
fn the_console_asks_for_the_token_when_the_admin_api_has_one() {
    if !browser_ready("the_console_asks_for_the_token_when_the_admin_api_has_one") {
        return;
    }
    let conf = tempfile::tempdir().expect("tempdir");
    let token_file = conf.path().join("admin-token");
    let token = "console-test-token-0123456789";
    std::fs::write(&token_file, token).expect("write token");
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec![
                "--set".into(),
                format!("admin.token_file={}", token_file.display()),
            ],
            ..Default::default()
        },
    );
    // The page itself carries no data; the data needs the token.
    assert_eq!(http_get(gw.admin, "/ui/").0, 200);
    assert_eq!(http_get(gw.admin, "/v1/overview").0, 401);
    let mut b = Browser::start();
    b.open(&ui(gw.admin), None, 1280);
    b.wait("[data-testid=token-input]", SHORT);
    b.fill("[data-testid=token-input]", token);
    b.click("[data-testid=token-submit]");
    b.wait_text("[data-testid=live]", "live", SHORT);
    b.wait_text("[data-testid=addresses]", &gw.peer_id, SHORT);
}

#[test]
fn the_agent_console_shows_its_session_tunnels_and_doctor() {
    if !browser_ready("the_agent_console_shows_its_session_tunnels_and_doctor") {
        return;
    }
    // Advertised by name: doctor counts a bare loopback address as not public.
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
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
    let mut b = Browser::start();
    b.open(&ui(agent.admin), None, 1280);
    b.wait_text("[data-testid=agent-session]", &gw.peer_id, SHORT);
    b.wait_text("[data-testid=\"tunnel-node\"]", &port.to_string(), SHORT);
    b.wait_text("[data-testid=advertise]", &format!("/tcp/{port}"), SHORT);
    b.click("[data-testid=doctor-run]");
    // The status badge: "healthy" in green ("unhealthy" is another class).
    b.wait_text(
        "[data-testid=doctor] .card-head + div .badge.ok",
        "healthy",
        Duration::from_secs(45),
    );
    let errors = b.errors();
    assert!(errors.is_empty(), "page errors: {errors:?}");
    b.open(&ui(agent.admin), None, 375);
    b.wait_text("[data-testid=agent-session]", &gw.peer_id, SHORT);
    assert!(!b.overflows(), "the agent page scrolls sideways at 375 px");
}
