//! Reload without restart, with connections open: `POST /v1/reload` and
//! SIGHUP apply new limits, bans and allow-lists and rotate join tokens,
//! without dropping a connection or a session; a key that cannot change
//! while running is refused by name and nothing changes.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::Duration,
};

use relaygate_tests::stack::{
    agent_peer_id, connect_from, echoes, eventually, here, http_request, metric, Agent, Echo,
    Gateway, GatewaySpec, Transport,
};

const LEASE: Duration = Duration::from_secs(20);

/// A gateway whose configuration lives in a file the test rewrites.
fn gateway_with(conf: &tempfile::TempDir, toml: &str) -> (Gateway, PathBuf) {
    let file = conf.path().join("gateway.toml");
    std::fs::write(&file, toml).expect("write config");
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--config".into(), file.display().to_string()],
            ..Default::default()
        },
    );
    (gw, file)
}

/// A new connection from `from` that echoes.
fn fresh(from: &str, port: u16) -> Option<TcpStream> {
    let mut s = connect_from(from, port).ok()?;
    echoes(&mut s, b"hello").then_some(s)
}

fn reload(gw: &Gateway) -> (u16, String) {
    http_request(gw.admin, "POST", "/v1/reload", "")
}

#[test]
fn limits_and_bans_change_with_connections_open_and_none_dropped() {
    let conf = tempfile::tempdir().expect("tempdir");
    let (gw, file) = gateway_with(&conf, "[limits]\nmax_connections_per_tunnel = 40\n");
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
    let mut open: Vec<TcpStream> = (0..8)
        .map(|i| fresh("127.0.0.1", port).unwrap_or_else(|| panic!("connection {i}")))
        .collect();

    std::fs::write(
        &file,
        "[limits]\nmax_connections_per_tunnel = 10\n\n\
         [[guard.blacklist]]\ntarget = \"127.0.0.5/32\"\nreason = \"reload test\"\n",
    )
    .expect("rewrite config");
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("limits.max_connections_per_tunnel"), "{body}");
    assert!(body.contains("guard.blacklist"), "{body}");

    let dropped = open
        .iter_mut()
        .map(|s| echoes(s, b"still there"))
        .filter(|ok| !ok)
        .count();
    assert_eq!(dropped, 0, "open connections dropped by the reload");
    // The new cap: two more fit, the eleventh does not.
    open.push(fresh("127.0.0.1", port).expect("9th"));
    open.push(fresh("127.0.0.1", port).expect("10th"));
    assert!(
        fresh("127.0.0.1", port).is_none(),
        "11th admitted over the reloaded cap"
    );
    // The new ban refuses its source, and only it.
    assert!(fresh("127.0.0.5", port).is_none(), "banned source admitted");
    assert!(fresh("127.0.0.6", port).is_none(), "cap still full");
    drop(open.pop());
    assert!(
        eventually(Duration::from_secs(5), || fresh("127.0.0.6", port)
            .is_some()),
        "a place freed under the cap"
    );

    // SIGHUP does the same: the ban is lifted, the cap raised.
    std::fs::write(&file, "[limits]\nmax_connections_per_tunnel = 40\n").expect("rewrite");
    gw.proc.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || {
            metric(
                &gw.metrics(),
                "relaygate_gateway_config_reloads_total{reason=\"applied\"}",
            ) == Some(2.0)
        }),
        "SIGHUP did not reload"
    );
    let _unbanned = fresh("127.0.0.5", port).expect("ban lifted by SIGHUP");
    let _more: Vec<TcpStream> = (0..5)
        .map(|i| fresh("127.0.0.1", port).unwrap_or_else(|| panic!("over the old cap {i}")))
        .collect();
    let dropped = open
        .iter_mut()
        .map(|s| echoes(s, b"and still"))
        .filter(|ok| !ok)
        .count();
    assert_eq!(dropped, 0, "open connections dropped by SIGHUP");
}

#[test]
fn a_key_that_cannot_change_is_named_and_nothing_changes() {
    let conf = tempfile::tempdir().expect("tempdir");
    let (gw, file) = gateway_with(&conf, "[limits]\nmax_connections_per_tunnel = 40\n");
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
    std::fs::write(
        &file,
        "shutdown_grace = \"3s\"\n[limits]\nmax_connections_per_tunnel = 1\nmax_connections = 5\n",
    )
    .expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("shutdown_grace") && body.contains("limits.max_connections,"),
        "{body}"
    );
    assert!(body.contains("restart"), "{body}");
    // The running configuration stays: more than one connection per tunnel.
    let held: Vec<TcpStream> = (0..3)
        .map(|i| fresh("127.0.0.1", port).unwrap_or_else(|| panic!("connection {i}")))
        .collect();
    // Another site's page cannot make a browser reload it (no token on loopback).
    let mut raw = TcpStream::connect(gw.admin).expect("admin");
    write!(
        raw,
        "POST /v1/reload HTTP/1.1\r\nHost: {}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        gw.admin
    )
    .expect("write");
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // A file that does not parse is refused too, with the reason.
    std::fs::write(&file, "[limits\n").expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("cannot read the configuration"), "{body}");
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            "relaygate_gateway_config_reloads_total{reason=\"refused\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "relaygate_gateway_config_reloads_total{reason=\"unreadable\"}"
        ),
        Some(1.0)
    );
    drop(held);
}

#[test]
fn join_tokens_rotate_while_agents_stay_connected() {
    let conf = tempfile::tempdir().expect("tempdir");
    let (mut gw, file) = gateway_with(&conf, "# defaults\n");
    let old = gw.token.clone();
    assert!(!old.is_empty());
    let new = "rgt_rotated_0123456789abcdef0123456789abcdef".to_string();
    let echo = Echo::start();
    let a = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("a")], true, &[]);
    let a_port = a.wait_leased("a", LEASE).expect("lease a");

    std::fs::write(
        &file,
        format!("[admission]\ntoken = \"{new}\"\naccept_tokens = [\"{old}\"]\n"),
    )
    .expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("admission.token"), "{body}");
    assert!(
        !body.contains(&new) && !body.contains(&old),
        "a token in {body}"
    );
    gw.token = new.clone();
    let b = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("b")], true, &[]);
    b.wait_leased("b", LEASE).expect("the new token admits");
    gw.token = old.clone();
    let c = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("c")], true, &[]);
    c.wait_leased("c", LEASE)
        .expect("the old token admits while both are accepted");

    std::fs::write(&file, format!("[admission]\ntoken = \"{new}\"\n")).expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    let d = Agent::start(&here, &gw, Transport::Tcp, &[echo.tunnel("d")], true, &[]);
    d.proc
        .wait_for(|l| l.contains("not admitted"), LEASE)
        .expect("the retired token is refused");
    // The allow-list: an agent without any token, once its peer id is listed.
    let e_dir = tempfile::tempdir().expect("tempdir");
    let e_id = agent_peer_id(e_dir.path());
    std::fs::write(
        &file,
        format!("[admission]\ntoken = \"{new}\"\nallow = [\"{e_id}\"]\n"),
    )
    .expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("admission.allow"), "{body}");
    let e = Agent::start_in(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("e")],
        false,
        &[],
        e_dir,
    );
    e.wait_leased("e", LEASE)
        .expect("admitted by the reloaded allow-list");
    // Agents admitted before stay: their sessions and tunnels were not touched.
    let mut s = fresh("127.0.0.1", a_port).expect("agent a still serves");
    assert!(echoes(&mut s, b"rotated"));
    assert!(!a.proc.lines().iter().any(|l| l.contains("session ended")));
}

#[test]
fn port_ranges_change_for_the_leases_asked_next() {
    let conf = tempfile::tempdir().expect("tempdir");
    let (gw, file) = gateway_with(&conf, "# defaults\n");
    let echo = Echo::start();
    let wanted = relaygate_tests::procs::free_tcp_port();
    let tunnel = format!("{}@{wanted}", echo.tunnel("fixed"));
    let before = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        std::slice::from_ref(&tunnel),
        true,
        &[],
    );
    before
        .proc
        .wait_for(|l| l.contains("port_not_allowed"), LEASE)
        .expect("refused outside the ports allowed");
    drop(before);
    std::fs::write(
        &file,
        format!("[leases]\nallowed_ports = [\"{wanted}\"]\nmax_tunnels_per_agent = 4\n"),
    )
    .expect("rewrite");
    let (status, body) = reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("leases.allowed_ports"), "{body}");
    let after = Agent::start(&here, &gw, Transport::Tcp, &[tunnel], true, &[]);
    let port = after.wait_leased("fixed", LEASE).expect("allowed now");
    assert_eq!(port, wanted);
    let mut s = fresh("127.0.0.1", port).expect("the new port serves");
    assert!(echoes(&mut s, b"ranges"));
}
