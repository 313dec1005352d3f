//! Lease lifecycle end to end, with real processes on loopback: listing and
//! revoking leases (admin API and CLI), the agent asking again on another
//! port, expiry (`leases.expire_after`) also across a gateway restart, and
//! renamed tunnels releasing their leases.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use relaygate_tests::{
    etcd::{require_etcd, Etcd},
    fleetkit::{echo_through, fleet, on_etcd_with, range},
    procs::workspace_bin,
    stack::{
        agent_peer_id, eventually, here, http_get, http_request, metric, round_trip, settings,
        Agent, Echo, Gateway, GatewaySpec, Transport,
    },
};
use serde_json::Value;

const LEASE: Duration = Duration::from_secs(20);

fn gateway(kv: &[&str]) -> Gateway {
    Gateway::start(
        &here,
        GatewaySpec {
            extra: settings(kv),
            ..Default::default()
        },
    )
}

/// `GET /v1/leases`.
fn leases(gw: &Gateway) -> Vec<Value> {
    let (status, body) = http_get(gw.admin, "/v1/leases");
    assert_eq!(status, 200, "{body}");
    match serde_json::from_str(&body) {
        Ok(Value::Array(v)) => v,
        other => panic!("not an array: {other:?} ({body})"),
    }
}

/// The lease of `tunnel`, if listed.
fn lease_of(gw: &Gateway, tunnel: &str) -> Option<Value> {
    leases(gw).into_iter().find(|l| l["tunnel"] == tunnel)
}

fn revoke(gw: &Gateway, query: &str) -> (u16, String) {
    http_request(gw.admin, "DELETE", &format!("/v1/leases?{query}"), "")
}

fn freed(gw: &Gateway, reason: &str) -> f64 {
    metric(
        &gw.metrics(),
        &format!("relaygate_gateway_leases_freed_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Stops an agent and waits until the gateway no longer lists it in session;
/// returns when it saw that.
fn leave(gw: &Gateway, agent: Agent, tunnel: &str) -> Instant {
    drop(agent);
    assert!(
        eventually(Duration::from_secs(15), || lease_of(gw, tunnel)
            .is_some_and(|l| l["in_session"] == false)),
        "the gateway still holds {tunnel}'s session"
    );
    Instant::now()
}

/// One line through an open connection.
fn echo_line(s: &mut TcpStream, line: &[u8]) -> bool {
    let mut back = vec![0u8; line.len()];
    s.write_all(line).is_ok() && s.read_exact(&mut back).is_ok() && back == line
}

fn refuses(port: u16) -> bool {
    match TcpStream::connect(("127.0.0.1", port)) {
        Err(_) => true,
        // Accepted by the kernel but reset at once would also do.
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_))
        }
    }
}

fn advertised_port(agent: &Agent, tunnel: &str) -> Option<u64> {
    let (_, body) = http_get(agent.admin, "/v1/advertise");
    let v: Value = serde_json::from_str(&body).ok()?;
    v["tunnels"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == tunnel)?["port"]
        .as_u64()
}

#[test]
fn a_revoked_lease_closes_its_port_and_the_agent_leases_another() {
    let gw = gateway(&[]);
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let old = agent.wait_leased("node", LEASE).expect("lease");
    let peer = agent_peer_id(agent.dir.path());

    let listed = lease_of(&gw, "node").expect("listed");
    assert_eq!(listed["agent"], peer.as_str());
    assert_eq!(listed["port"], old);
    assert_eq!(listed["in_session"], true);
    assert!(listed["last_active"].as_u64().unwrap_or(0) > 1_600_000_000);

    // A connection open before the revocation.
    let mut held = TcpStream::connect(("127.0.0.1", old)).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(echo_line(&mut held, b"before\n"));

    let seen = agent.lease_count("node");
    let (status, body) = revoke(
        &gw,
        &format!("agent={peer}&tunnel=node&reason=moving%20to%20another%20port"),
    );
    assert_eq!(status, 204, "{body}");
    assert!(refuses(old), "the old port still accepts");
    agent
        .proc
        .wait_for(
            |l| l.contains("revoked") && l.contains("moving to another port"),
            Duration::from_secs(10),
        )
        .expect("the agent logs why");
    let new = agent
        .wait_leased_again("node", seen, Duration::from_secs(10))
        .expect("a new lease");
    assert_ne!(new, old, "a freed port goes to the back of the pick order");
    assert!(eventually(Duration::from_secs(10), || round_trip(
        new,
        b"through the new port"
    )
    .ok()
    .as_deref()
        == Some(&b"through the new port"[..])));
    assert!(eventually(Duration::from_secs(5), || advertised_port(
        &agent, "node"
    ) == Some(u64::from(
        new
    ))));
    assert_eq!(
        lease_of(&gw, "node").map(|l| l["port"].clone()),
        Some(new.into())
    );
    assert!(refuses(old), "nobody took the old port");
    // The connection from before still works until it is closed.
    assert!(echo_line(&mut held, b"after\n"));
    drop(held);
    assert_eq!(freed(&gw, "revoked"), 1.0);

    // Bad input is refused and counted; a lease that is not there is a 404.
    let bad_before = metric(
        &gw.metrics(),
        "relaygate_gateway_bad_input_total{reason=\"admin_lease_query\"}",
    )
    .unwrap_or(0.0);
    for q in [
        "",
        "port=0",
        "agent=nope&tunnel=node",
        "tunnel=node",
        "port=1&agent=x",
    ] {
        let (status, body) = revoke(&gw, q);
        assert_eq!(status, 400, "{q}: {body}");
        assert!(!body.trim().is_empty(), "{q}: a reason is given");
    }
    let bad_after = metric(
        &gw.metrics(),
        "relaygate_gateway_bad_input_total{reason=\"admin_lease_query\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(bad_after - bad_before, 5.0);
    let (status, body) = revoke(&gw, &format!("agent={peer}&tunnel=other"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no lease"), "{body}");
    let (status, body) = revoke(&gw, &format!("port={old}"));
    assert_eq!(status, 404, "{body}");
}

#[test]
fn the_port_of_a_gone_agent_revoked_can_be_asked_for_by_another() {
    let gw = gateway(&[]);
    let echo = Echo::start();
    let first = Agent::start(&here, &gw, Transport::Quic, &[echo.tunnel("a")], true, &[]);
    let port = first.wait_leased("a", LEASE).expect("lease");
    leave(&gw, first, "a");

    let (status, body) = revoke(&gw, &format!("port={port}"));
    assert_eq!(status, 204, "{body}");
    assert!(
        lease_of(&gw, "a").is_none(),
        "revoked leases are not listed"
    );
    let other = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[format!("b={}@{port}", echo.addr)],
        true,
        &[],
    );
    assert_eq!(other.wait_leased("b", LEASE).expect("lease"), port);
    assert_eq!(round_trip(port, b"mine now").unwrap(), b"mine now");
}

#[test]
fn leases_expire_after_their_agent_left_never_while_it_stays() {
    let gw = gateway(&["leases.expire_after=2s"]);
    let echo = Echo::start();
    let stays = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("stays")],
        true,
        &[],
    );
    let stays_port = stays.wait_leased("stays", LEASE).expect("lease");
    let joined = Instant::now();
    let goes = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("goes")],
        true,
        &[],
    );
    goes.wait_leased("goes", LEASE).expect("lease");

    let left = leave(&gw, goes, "goes");
    // Listed while it has been gone less than expire_after...
    while left.elapsed() < Duration::from_millis(1000) {
        let asked = left.elapsed();
        let listed = lease_of(&gw, "goes").is_some();
        assert!(
            listed || asked >= Duration::from_millis(1000),
            "freed {asked:?} after the agent left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... and freed soon after.
    assert!(
        eventually(
            Duration::from_secs(5).saturating_sub(left.elapsed()),
            || { lease_of(&gw, "goes").is_none() }
        ),
        "not freed within 5 s of the agent leaving"
    );
    assert_eq!(freed(&gw, "expired"), 1.0);
    assert_eq!(
        metric(&gw.metrics(), "relaygate_gateway_leases"),
        Some(1.0),
        "the gauge follows"
    );

    // The agent that stays, longer than expire_after: never freed.
    while joined.elapsed() < Duration::from_secs(6) {
        let l = lease_of(&gw, "stays").expect("an agent in session keeps its lease");
        assert_eq!(l["in_session"], true);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        round_trip(stays_port, b"still here").unwrap(),
        b"still here"
    );
    assert_eq!(freed(&gw, "expired"), 1.0);
}

#[test]
fn over_a_gateway_restart_revoked_leases_stay_gone_and_expiry_keeps_its_clock() {
    const EXPIRE: Duration = Duration::from_secs(10);
    let mut gw = gateway(&["leases.expire_after=10s"]);
    let echo = Echo::start();
    let start = |name: &str, t| Agent::start(&here, &gw, t, &[echo.tunnel(name)], true, &[]);
    // TCP for the one that comes back: a dial to a gateway that is down
    // fails at once, so it is back soon after the restart.
    let (gone, revoked) = (
        start("gone", Transport::Quic),
        start("revoked", Transport::Quic),
    );
    let back = start("back", Transport::Tcp);
    gone.wait_leased("gone", LEASE).expect("lease");
    let revoked_port = revoked.wait_leased("revoked", LEASE).expect("lease");
    let back_port = back.wait_leased("back", LEASE).expect("lease");

    drop(revoked);
    let left = leave(&gw, gone, "gone");
    assert!(eventually(Duration::from_secs(15), || lease_of(
        &gw, "revoked"
    )
    .is_some_and(|l| l["in_session"] == false)));
    let (status, body) = revoke(&gw, &format!("port={revoked_port}"));
    assert_eq!(status, 204, "{body}");
    let wait_until = |t: Duration| {
        while left.elapsed() < t {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_until(Duration::from_millis(8500));
    assert!(lease_of(&gw, "gone").is_some(), "not expired before 10 s");
    // Down from just before "gone" expires until just after: "back" (in
    // session until the crash, refreshed every 2.5 s) has 6 s or more left
    // when the gateway returns.
    wait_until(Duration::from_millis(9500));
    let seen = back.lease_count("back");
    gw.proc.kill_hard();
    wait_until(EXPIRE + Duration::from_millis(500));
    gw.crash_and_restart(&here);
    let up = Instant::now();

    assert!(
        lease_of(&gw, "revoked").is_none(),
        "a revoked lease stays gone"
    );
    // Judged by the time recorded before the restart: freed at the first
    // sweep (2.5 s), not 10 s after the restart.
    assert!(
        eventually(Duration::from_secs(6), || lease_of(&gw, "gone").is_none()),
        "not freed {:?} after the restart",
        up.elapsed()
    );
    assert!(up.elapsed() < EXPIRE - Duration::from_secs(2));
    assert_eq!(freed(&gw, "expired"), 1.0);
    // The agent that returns keeps its port.
    let again = back
        .wait_leased_again("back", seen, Duration::from_secs(20))
        .expect("back after the restart");
    assert_eq!(again, back_port);
    assert!(eventually(Duration::from_secs(5), || lease_of(&gw, "back")
        .is_some_and(
            |l| l["in_session"] == true && l["port"] == back_port
        )));
    assert_eq!(round_trip(back_port, b"kept").unwrap(), b"kept");
}

#[test]
fn a_renamed_tunnel_releases_its_lease_and_no_longer_counts() {
    let gw = gateway(&["leases.max_tunnels_per_agent=1"]);
    let echo = Echo::start();
    let agent = Agent::start(&here, &gw, Transport::Quic, &[echo.tunnel("a")], true, &[]);
    agent.wait_leased("a", LEASE).expect("lease");
    let Agent { proc, dir, .. } = agent;
    drop(proc);
    // The same identity, its tunnel renamed.
    let agent = Agent::start_in(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("b")],
        true,
        &[],
        dir,
    );
    let port = agent
        .wait_leased("b", LEASE)
        .expect("b leased, not too_many_tunnels");
    assert!(!agent
        .proc
        .lines()
        .iter()
        .any(|l| l.contains("too_many_tunnels")));
    assert!(lease_of(&gw, "a").is_none(), "a's lease released");
    assert!(lease_of(&gw, "b").is_some());
    assert_eq!(freed(&gw, "renamed"), 1.0);
    assert_eq!(round_trip(port, b"renamed").unwrap(), b"renamed");
}

#[test]
fn in_a_fleet_revocation_reaches_every_gateway_and_a_session_anywhere_keeps_a_lease() {
    if !require_etcd(
        "in_a_fleet_revocation_reaches_every_gateway_and_a_session_anywhere_keeps_a_lease",
    ) {
        return;
    }
    let etcd = Etcd::start();
    let r = range();
    let cfg = ["store.etcd.member_ttl=3s", "leases.expire_after=4s"];
    let a = on_etcd_with(&etcd, "127.0.0.1", &r, &cfg);
    let b = on_etcd_with(&etcd, "127.0.0.2", &r, &cfg);
    assert!(eventually(Duration::from_secs(10), || fleet(&a).len() == 2
        && fleet(&b).len() == 2));
    let echo = Echo::start();
    // On both gateways.
    let both = Agent::start(
        &here,
        &a,
        Transport::Quic,
        &[echo.tunnel("both")],
        true,
        &[],
    );
    let old = both.wait_leased("both", LEASE).expect("lease");
    let on_both = |port: u16, data: &[u8]| {
        ["127.0.0.1", "127.0.0.2"]
            .iter()
            .all(|h| echo_through(h, port, data) == data)
    };
    assert!(eventually(Duration::from_secs(10), || on_both(
        old, b"both"
    )));
    // On b alone.
    let only_b = Agent::start(
        &here,
        &b,
        Transport::Quic,
        &[echo.tunnel("only-b")],
        true,
        &settings(&["gateway.max_sessions=1"]),
    );
    let b_port = only_b.wait_leased("only-b", LEASE).expect("lease");

    // Revoked at a: b closes the old port too, and both serve the new one.
    let peer = agent_peer_id(both.dir.path());
    let (status, body) = revoke(&a, &format!("agent={peer}&tunnel=both"));
    assert_eq!(status, 204, "{body}");
    let new = eventually(Duration::from_secs(15), || {
        lease_of(&a, "both").is_some_and(|l| l["port"] != old)
            && lease_of(&b, "both").is_some_and(|l| l["port"] != old)
    });
    assert!(
        new,
        "a: {:?}, b: {:?}",
        lease_of(&a, "both"),
        lease_of(&b, "both")
    );
    let new = lease_of(&a, "both")
        .and_then(|l| l["port"].as_u64())
        .unwrap_or(0) as u16;
    assert!(eventually(Duration::from_secs(15), || on_both(new, b"new")));
    assert!(eventually(Duration::from_secs(15), || [
        "127.0.0.1",
        "127.0.0.2"
    ]
    .iter()
    .all(|h| echo_through(h, old, b"old").is_empty())));

    // a holds no session of "only-b", but b refreshes its lease: kept for
    // three times expire_after, and listed at a as not in session there.
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(12) {
        let l = lease_of(&a, "only-b").expect("a lease in session at b is kept");
        assert_eq!(l["in_session"], false);
        assert_eq!(l["port"], b_port);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(freed(&a, "expired") + freed(&b, "expired"), 0.0);
    // Gone from the fleet: freed (by whichever gateway sweeps first).
    drop(only_b);
    assert!(
        eventually(Duration::from_secs(20), || lease_of(&a, "only-b").is_none()
            && lease_of(&b, "only-b").is_none()),
        "a: {:?}, b: {:?}",
        lease_of(&a, "only-b"),
        lease_of(&b, "only-b")
    );
    assert_eq!(freed(&a, "expired") + freed(&b, "expired"), 1.0);
}

/// `relaygate-gateway <args>` against `gw`'s admin API: (success, stdout, stderr).
fn cli(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(workspace_bin("relaygate-gateway"))
        .current_dir(dir.path())
        .arg("--admin-listen")
        .arg(gw.admin.to_string())
        .args(args)
        .output()
        .expect("run relaygate-gateway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_lists_and_revokes_leases() {
    let gw = gateway(&[]);
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let old = agent.wait_leased("node", LEASE).expect("lease");
    let peer = agent_peer_id(agent.dir.path());

    let (ok, out, err) = cli(&gw, &["leases", "list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("PORT") && lines[0].contains("LAST ACTIVE"),
        "{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        [
            old.to_string().as_str(),
            peer.as_str(),
            "node",
            "yes",
            "now"
        ],
        "{out}"
    );

    let seen = agent.lease_count("node");
    let (ok, out, err) = cli(
        &gw,
        &[
            "leases", "revoke", "--agent", &peer, "--tunnel", "node", "--reason", "cli test",
        ],
    );
    assert!(ok, "{out}{err}");
    agent
        .proc
        .wait_for(|l| l.contains("cli test"), Duration::from_secs(10))
        .expect("the agent logs why");
    let new = agent
        .wait_leased_again("node", seen, Duration::from_secs(10))
        .expect("a new lease");
    assert_ne!(new, old);
    let (ok, out, _) = cli(&gw, &["leases", "list"]);
    assert!(
        ok && out.contains(&new.to_string()) && !out.contains(&old.to_string()),
        "{out}"
    );

    let (ok, _, err) = cli(&gw, &["leases", "revoke", "--port", &old.to_string()]);
    assert!(
        !ok && err.contains(&format!("no lease holds port {old}")),
        "{err}"
    );
    let (ok, _, err) = cli(&gw, &["leases", "revoke", "--tunnel", "node"]);
    assert!(!ok, "--tunnel alone is refused: {err}");
    let (ok, _, _) = cli(&gw, &["leases", "revoke", "--port", &new.to_string()]);
    assert!(ok);
    assert!(eventually(Duration::from_secs(10), || lease_of(
        &gw, "node"
    )
    .is_some_and(|l| l["port"] != new && l["port"] != old)));
}
