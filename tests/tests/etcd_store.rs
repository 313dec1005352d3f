//! Leases in etcd (issue #16, part 1), against a real etcd: gateways that
//! share it give a tunnel one port and never give a port to two tunnels;
//! with etcd gone, what is leased keeps working and new leases are refused
//! and counted; an embedded store's leases move into etcd.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use relaygate_tests::{
    etcd::{require_etcd, Etcd},
    fleetkit::{echo_agent, echo_through, fleet, on_etcd, on_etcd_with, range},
    procs::workspace_bin,
    stack::{
        agent_peer_id, eventually, here, http_get, http_request, metric, Agent, Echo, Gateway,
        GatewaySpec, Transport,
    },
};

const T: Duration = Duration::from_secs(20);

/// These tests are about the store: each agent keeps to the gateway it is
/// given (twins with one identity on two gateways would otherwise take each
/// other's sessions as both follow the fleet).
fn one_gateway() -> Vec<String> {
    vec!["--set".into(), "gateway.max_sessions=1".into()]
}

/// Two gateways on `etcd` with one port range, on 127.0.0.1 and 127.0.0.2
/// (so both can bind the same leased port); and the range.
fn two_gateways(etcd: &Etcd) -> (Gateway, Gateway, String) {
    let r = range();
    let gw1 = on_etcd(etcd, "127.0.0.1", &r);
    let gw2 = on_etcd(etcd, "127.0.0.2", &r);
    (gw1, gw2, r)
}

/// A copy of an agent's data dir: the same identity for a second process.
fn twin_dir(of: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    for entry in std::fs::read_dir(of).expect("agent dir").flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::copy(entry.path(), dir.path().join(entry.file_name()));
        }
    }
    dir
}

#[test]
fn a_tunnel_gets_one_port_from_every_gateway_on_the_store() {
    if !require_etcd("a_tunnel_gets_one_port_from_every_gateway_on_the_store") {
        return;
    }
    let etcd = Etcd::start();
    let (gw1, gw2, _) = two_gateways(&etcd);
    let echo = Echo::start();
    let a1 = echo_agent(&gw1, &echo, &one_gateway());
    let p1 = a1.wait_leased("echo", T).expect("lease through gateway 1");
    // The same agent (its identity) through the other gateway.
    let a2 = Agent::start_in(
        &here,
        &gw2,
        Transport::Quic,
        &[echo.tunnel("echo")],
        true,
        &one_gateway(),
        twin_dir(a1.dir.path()),
    );
    let p2 = a2.wait_leased("echo", T).expect("lease through gateway 2");
    assert_eq!(p1, p2, "one tunnel, one port, whichever gateway");
    for host in ["127.0.0.1", "127.0.0.2"] {
        assert_eq!(
            echo_through(host, p1, b"through each"),
            b"through each",
            "{host}"
        );
    }
    // Another agent through gateway 2 does not get that port.
    let other = echo_agent(&gw2, &echo, &one_gateway());
    let p3 = other.wait_leased("echo", T).expect("another agent's lease");
    assert_ne!(p3, p1);
}

#[test]
fn two_agents_racing_for_one_port_through_two_gateways_get_it_once() {
    if !require_etcd("two_agents_racing_for_one_port_through_two_gateways_get_it_once") {
        return;
    }
    let etcd = Etcd::start();
    let (gw1, gw2, r) = two_gateways(&etcd);
    let echo = Echo::start();
    let first: u16 = r
        .split('-')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("range");
    for round in 0..4u16 {
        let port = first + round;
        let tunnel = format!("x={}@{port}", echo.addr);
        let a = Agent::start(
            &here,
            &gw1,
            Transport::Quic,
            std::slice::from_ref(&tunnel),
            true,
            &one_gateway(),
        );
        let b = Agent::start(
            &here,
            &gw2,
            Transport::Quic,
            &[tunnel],
            true,
            &one_gateway(),
        );
        let outcome = |agent: &Agent| {
            agent
                .proc
                .wait_for(
                    |l| l.contains("tunnel leased") || l.contains("refused the tunnel's lease"),
                    T,
                )
                .expect("an answer")
        };
        let (oa, ob) = (outcome(&a), outcome(&b));
        let won = [&oa, &ob]
            .iter()
            .filter(|l| l.contains("tunnel leased"))
            .count();
        assert_eq!(
            won, 1,
            "round {round}: exactly one gets port {port}:\n{oa}\n{ob}"
        );
        let lost = if oa.contains("tunnel leased") {
            &ob
        } else {
            &oa
        };
        assert!(lost.contains("port_held"), "round {round}: {lost}");
    }
}

#[test]
fn with_etcd_gone_leases_keep_working_and_new_ones_are_refused_until_it_returns() {
    if !require_etcd("with_etcd_gone_leases_keep_working_and_new_ones_are_refused_until_it_returns")
    {
        return;
    }
    let mut etcd = Etcd::start();
    let gw = on_etcd(&etcd, "127.0.0.1", &range());
    let echo = Echo::start();
    let a = echo_agent(&gw, &echo, &one_gateway());
    let port = a.wait_leased("echo", T).expect("lease");

    etcd.kill();
    assert_eq!(echo_through("127.0.0.1", port, b"still"), b"still");
    let late = echo_agent(&gw, &echo, &one_gateway());
    let refused = late
        .proc
        .wait_for(|l| l.contains("refused the tunnel's lease"), T)
        .expect("a new lease is refused while etcd is gone");
    assert!(refused.contains("store_failed"), "{refused}");
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"store_unavailable\"}"
        )
        .is_some_and(|n| n >= 1.0)),
        "counted as store_unavailable"
    );
    assert_eq!(echo_through("127.0.0.1", port, b"still"), b"still");

    // Back: the gateway's client reconnects by itself, and the refused
    // agent, asking again with backoff, gets its lease; nothing restarted.
    etcd.restart();
    let p = late
        .wait_leased("echo", Duration::from_secs(40))
        .expect("the refused agent's lease once etcd is back");
    assert_ne!(p, port);
    assert_eq!(echo_through("127.0.0.1", p, b"late"), b"late");
}

#[test]
fn migrate_store_copies_an_embedded_gateways_leases_into_etcd() {
    if !require_etcd("migrate_store_copies_an_embedded_gateways_leases_into_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let r = range();
    let data = tempfile::tempdir().expect("gateway dir");
    let echo = Echo::start();
    let embedded = Gateway::start(
        &here,
        GatewaySpec {
            port_range: Some(r.clone()),
            data_dir: Some(data.path().to_path_buf()),
            ..Default::default()
        },
    );
    // The last port of the range: not what a fresh store would pick first.
    let last: u16 = r
        .split('-')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("range");
    let a = Agent::start(
        &here,
        &embedded,
        Transport::Quic,
        &[format!("echo={}@{last}", echo.addr)],
        true,
        &one_gateway(),
    );
    assert_eq!(a.wait_leased("echo", T), Ok(last));
    let identity = twin_dir(a.dir.path());
    drop(a);
    drop(embedded);

    let out = std::process::Command::new(workspace_bin("relaygate-gateway"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["--set", "store.kind=etcd", "--set"])
        .arg(format!("store.etcd.endpoints={}", etcd.endpoint()))
        .arg("migrate-store")
        .output()
        .expect("migrate-store runs");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("1 of 1 leases copied"), "{said}");

    // A gateway on etcd (another data dir) gives the agent its port back,
    // though the agent no longer asks for it by number.
    let fleet = on_etcd(&etcd, "127.0.0.1", &r);
    let back = Agent::start_in(
        &here,
        &fleet,
        Transport::Quic,
        &[echo.tunnel("echo")],
        true,
        &one_gateway(),
        identity,
    );
    assert_eq!(back.wait_leased("echo", T), Ok(last));
    assert_eq!(echo_through("127.0.0.1", last, b"moved"), b"moved");
}

#[test]
fn a_ban_through_one_gateway_holds_on_the_others_within_a_second() {
    if !require_etcd("a_ban_through_one_gateway_holds_on_the_others_within_a_second") {
        return;
    }
    let etcd = Etcd::start();
    let (gw1, gw2, _) = two_gateways(&etcd);
    let echo = Echo::start();
    let agent = echo_agent(&gw2, &echo, &one_gateway());
    let port = agent
        .wait_leased("echo", T)
        .expect("lease through gateway 2");
    assert_eq!(echo_through("127.0.0.2", port, b"before"), b"before");
    let id = agent_peer_id(agent.dir.path());

    // Banned through gateway 1: gateway 2 holds it, and closes the agent.
    let (code, body) = http_request(
        gw1.admin,
        "POST",
        "/v1/blacklist",
        &format!(r#"{{"target":"{id}","reason":"fleet test","ttl":"1h"}}"#),
    );
    assert_eq!(code, 201, "{body}");
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || http_get(
            gw2.admin,
            "/v1/blacklist"
        )
        .1
        .contains(&id)),
        "gateway 2 holds the ban"
    );
    let took = started.elapsed();
    eprintln!("a ban made on gateway 1 held on gateway 2 after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    agent
        .proc
        .wait_for(|l| l.contains("session ended"), T)
        .expect("gateway 2 closed the banned agent's session");
    assert!(
        eventually(T, || echo_through("127.0.0.2", port, b"banned").is_empty()),
        "its port answers no more"
    );

    // Lifted through gateway 1: the agent is back on gateway 2.
    let (code, _) = http_request(
        gw1.admin,
        "DELETE",
        &format!("/v1/blacklist?target={id}"),
        "",
    );
    assert_eq!(code, 204);
    assert!(
        eventually(Duration::from_secs(5), || !http_get(
            gw2.admin,
            "/v1/blacklist"
        )
        .1
        .contains(&id)),
        "the lift holds on gateway 2"
    );
    assert!(
        eventually(Duration::from_secs(30), || echo_through(
            "127.0.0.2",
            port,
            b"back"
        ) == b"back"),
        "the agent is back through gateway 2"
    );

    // And the other way: a network banned through gateway 2 holds on gateway 1.
    let (code, body) = http_request(
        gw2.admin,
        "POST",
        "/v1/blacklist",
        r#"{"target":"198.51.100.0/24","reason":"scanner"}"#,
    );
    assert_eq!(code, 201, "{body}");
    assert!(
        eventually(Duration::from_secs(1), || http_get(
            gw1.admin,
            "/v1/blacklist"
        )
        .1
        .contains("198.51.100.0/24")),
        "gateway 1 holds gateway 2's ban within a second"
    );
}

#[test]
fn gateways_on_one_etcd_see_each_other_and_a_dead_one_leaves() {
    if !require_etcd("gateways_on_one_etcd_see_each_other_and_a_dead_one_leaves") {
        return;
    }
    let etcd = Etcd::start();
    let r = range();
    let ttl = ["store.etcd.member_ttl=3s"];
    let gw1 = on_etcd_with(&etcd, "127.0.0.1", &r, &ttl);
    let gw2 = on_etcd_with(&etcd, "127.0.0.2", &r, &ttl);
    let mut gw3 = on_etcd_with(&etcd, "127.0.0.3", &r, &ttl);
    let ids = |gw: &Gateway| fleet(gw).into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert!(
        eventually(Duration::from_secs(10), || [&gw1, &gw2, &gw3]
            .iter()
            .all(|g| ids(g).len() == 3)),
        "every gateway sees three: {:?}",
        ids(&gw1)
    );
    for g in [&gw1, &gw2, &gw3] {
        assert!(ids(&gw1).contains(&g.peer_id));
    }

    // An agent on gateway 2 shows in gateway 1's view.
    let echo = Echo::start();
    let agent = echo_agent(&gw2, &echo, &one_gateway());
    agent.wait_leased("echo", T).expect("lease");
    let agent_id = agent_peer_id(agent.dir.path());
    assert!(
        eventually(Duration::from_secs(5), || fleet(&gw1).iter().any(
            |(id, agents)| *id == gw2.peer_id && agents.contains(&agent_id)
        )),
        "gateway 1 sees the agent on gateway 2: {:?}",
        fleet(&gw1)
    );

    // Gateway 3 dies: it leaves the others' view once its record's lease ends.
    let killed = Instant::now();
    gw3.proc.kill_hard();
    assert!(
        eventually(Duration::from_secs(10), || !ids(&gw1)
            .contains(&gw3.peer_id)
            && !ids(&gw2).contains(&gw3.peer_id)),
        "the dead gateway left the view"
    );
    let gone = killed.elapsed();
    eprintln!("a killed gateway left the fleet's view after {gone:?} (member_ttl 3s)");
    assert!(gone < Duration::from_secs(7), "took {gone:?}");

    // Back on the same data dir: the same peer id rejoins.
    gw3.crash_and_restart(&here);
    assert!(
        eventually(Duration::from_secs(10), || ids(&gw1).contains(&gw3.peer_id)),
        "the restarted gateway is back in the view"
    );
}

#[test]
fn a_three_member_etcd_losing_one_member_goes_unnoticed() {
    if !require_etcd("a_three_member_etcd_losing_one_member_goes_unnoticed") {
        return;
    }
    let mut members = Etcd::cluster(3);
    let endpoints = members
        .iter()
        .map(|m| m.endpoint())
        .collect::<Vec<_>>()
        .join(",");
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            port_range: Some(range()),
            extra: vec![
                "--set".into(),
                "store.kind=etcd".into(),
                "--set".into(),
                format!("store.etcd.endpoints={endpoints}"),
            ],
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let a = echo_agent(&gw, &echo, &one_gateway());
    let port = a.wait_leased("echo", T).expect("lease");
    // The member the gateway most likely talks to first goes.
    members[0].kill();
    assert_eq!(echo_through("127.0.0.1", port, b"still"), b"still");
    let b = echo_agent(&gw, &echo, &one_gateway());
    let pb = b
        .wait_leased("echo", T)
        .expect("a new lease with two members of three");
    assert_ne!(pb, port);
    assert_eq!(echo_through("127.0.0.1", pb, b"new"), b"new");
    assert_eq!(
        metric(
            &gw.metrics(),
            "relaygate_gateway_refusals_total{reason=\"store_unavailable\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "no lease was refused"
    );
}
