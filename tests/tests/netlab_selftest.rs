//! Self-tests of the NAT lab (tests/src/netlab.rs): that its NAT routers
//! translate and firewall as documented, that faults work, and that every
//! namespace goes away afterwards. Real namespaces and real libp2p nodes
//! (lab-node); they need root and skip loudly without it.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use relaygate_tests::{
    netlab::{require_root, Host, Lab, Nat},
    procs::Proc,
};
use serde_json::Value;

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The JSON event on `line` if it is of kind `kind`.
fn event(line: &str, kind: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line)
        .ok()
        .filter(|v| v["event"] == kind)
}

fn field(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// A lab-node listening on `addrs` inside `host`; returns it once every
/// address is bound, with its peer id.
fn listen(host: &Host, addrs: &[String], extra: &[&str]) -> (Proc, String) {
    let mut cmd = host.cmd(LAB_NODE);
    cmd.arg("listen").arg("--listen").args(addrs).args(extra);
    let p = Proc::spawn(&format!("{}-listen", host.name()), cmd);
    let deadline = Instant::now() + secs(10);
    loop {
        let bound: Vec<Value> = p
            .lines()
            .iter()
            .filter_map(|l| event(l, "listening"))
            .collect();
        if bound.len() >= addrs.len() {
            return (p, field(&bound[0], "peer_id"));
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on {addrs:?}",
            host.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lab-node dial` inside `host`; Ok(done event) or Err(error reason).
fn start_dial(host: &Host, addr: &str, pings: u32, timeout_secs: u64, extra: &[&str]) -> Proc {
    let mut cmd = host.cmd(LAB_NODE);
    cmd.args(["dial", "--addr", addr, "--pings", &pings.to_string()])
        .args(["--timeout-secs", &timeout_secs.to_string()])
        .args(extra);
    Proc::spawn(&format!("{}-dial", host.name()), cmd)
}

fn finish_dial(mut p: Proc, timeout_secs: u64) -> Result<Value, String> {
    let last = p
        .wait_for(
            |l| event(l, "done").is_some() || event(l, "error").is_some(),
            secs(timeout_secs + 10),
        )
        .expect("lab-node dial reports done or error");
    let status = p.wait_exit(secs(5)).expect("lab-node dial exits");
    match event(&last, "done") {
        Some(done) => {
            assert!(status.success(), "done but exit status {status}");
            Ok(done)
        }
        None => {
            assert_eq!(status.code(), Some(1), "error exit status");
            Err(field(&event(&last, "error").unwrap(), "reason"))
        }
    }
}

fn dial(host: &Host, addr: &str, pings: u32, timeout_secs: u64) -> Result<Value, String> {
    finish_dial(
        start_dial(host, addr, pings, timeout_secs, &[]),
        timeout_secs,
    )
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_namespaces_gone(names: &[String]) {
    assert!(!names.is_empty(), "the lab made no namespaces?");
    let left = netns_list();
    for ns in names {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} survived:\n{left}"
        );
    }
}

#[test]
fn masquerade_lan_host_reaches_internet_from_router_address() {
    if !require_root("masquerade_lan_host_reaches_internet_from_router_address") {
        return;
    }
    let lab = Lab::new("masq-reach").unwrap();
    let srv = lab.internet_host("srv", 10);
    let lan = lab.lan("home", Nat::Masquerade, 1);
    let pc = lab.lan_host(&lan, "pc", 10);
    let (l, peer) = listen(
        &srv,
        &[
            format!("/ip4/{}/tcp/4001", srv.ip()),
            format!("/ip6/{}/tcp/4001", srv.ip6()),
        ],
        // 203.0.113.0/24 counts as public, so NATed peers pass the gater.
        &["--deny-private-sources"],
    );
    for (target, wan) in [
        (
            format!("/ip4/{}/tcp/4001", srv.ip()),
            format!("/ip4/{}/tcp/", lan.wan_ip()),
        ),
        (
            format!("/ip6/{}/tcp/4001", srv.ip6()),
            format!("/ip6/{}/tcp/", lan.wan_ip6()),
        ),
    ] {
        dial(&pc, &format!("{target}/p2p/{peer}"), 1, 10)
            .unwrap_or_else(|e| panic!("dial {target}: {e}"));
        l.wait_for(
            |line| {
                event(line, "connected").is_some_and(|v| field(&v, "remote_addr").starts_with(&wan))
            },
            secs(5),
        )
        .unwrap_or_else(|e| panic!("listener never saw a connection from {wan}: {e}"));
    }
    assert!(
        !l.lines().iter().any(|x| event(x, "denied").is_some()),
        "NATed peer was denied"
    );
}

#[test]
fn internet_cannot_reach_lan_hosts_or_provoke_the_router() {
    if !require_root("internet_cannot_reach_lan_hosts_or_provoke_the_router") {
        return;
    }
    let lab = Lab::new("no-inbound").unwrap();
    let srv = lab.internet_host("srv", 20);
    let lan = lab.lan("home", Nat::Masquerade, 2);
    let pc = lab.lan_host(&lan, "pc", 10);
    let pc2 = lab.lan_host(&lan, "pc2", 11);
    let (l, peer) = listen(&pc, &[format!("/ip4/{}/tcp/4001", pc.ip())], &[]);
    let (gated, _) = listen(
        &pc,
        &[format!("/ip4/{}/tcp/4002", pc.ip())],
        &["--deny-private-sources"],
    );

    // The listener works: its LAN neighbour reaches it.
    dial(
        &pc2,
        &format!("/ip4/{}/tcp/4001/p2p/{peer}", pc.ip()),
        1,
        10,
    )
    .expect("dial from the same LAN");
    // ...but a private source is refused by the gater, at once.
    let err = dial(&pc2, &format!("/ip4/{}/tcp/4002", pc.ip()), 1, 10)
        .expect_err("gated listener admits 198.18.x");
    assert!(
        err.contains("connection closed"),
        "unexpected failure: {err}"
    );
    gated
        .wait_for(|x| event(x, "denied").is_some(), secs(5))
        .expect("denied event");

    // Even with a route to the LAN, the forward chain drops unsolicited SYNs;
    // and the router's own WAN address ignores them instead of answering RST.
    let out = srv
        .sh(&format!("ip route add 198.18.0.0/15 via {}", lan.wan_ip()))
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let to_lan = start_dial(&srv, &format!("/ip4/{}/tcp/4001", pc.ip()), 1, 3, &[]);
    let to_router = start_dial(&srv, &format!("/ip4/{}/tcp/4001", lan.wan_ip()), 1, 3, &[]);
    for (what, p) in [("LAN host", to_lan), ("router", to_router)] {
        let err = finish_dial(p, 3).expect_err(&format!("internet reached the {what}"));
        assert!(
            err.contains("timeout"),
            "{what}: expected a silent drop, got: {err}"
        );
    }
    let from_internet = |x: &str| {
        event(x, "connected").is_some_and(|v| field(&v, "remote_addr").contains("203.0.113."))
    };
    assert!(
        !l.lines().iter().any(|x| from_internet(x)),
        "a connection from the internet got in"
    );
}

#[test]
fn pings_cross_a_symmetric_nat_over_tcp_and_quic() {
    if !require_root("pings_cross_a_symmetric_nat_over_tcp_and_quic") {
        return;
    }
    let lab = Lab::new("sym-pings").unwrap();
    let srv = lab.internet_host("srv", 30);
    let lan = lab.lan("carrier", Nat::Symmetric, 3);
    let pc = lab.lan_host(&lan, "pc", 10);
    let (tcp, quic) = (
        format!("/ip4/{}/tcp/4001", srv.ip()),
        format!("/ip4/{}/udp/4001/quic-v1", srv.ip()),
    );
    let (l, peer) = listen(&srv, &[tcp.clone(), quic.clone()], &["--seed", "7"]);
    let dials: Vec<Proc> = [&tcp, &quic]
        .iter()
        .map(|a| start_dial(&pc, &format!("{a}/p2p/{peer}"), 3, 15, &[]))
        .collect();
    for (p, transport) in dials.into_iter().zip(["tcp", "quic"]) {
        let seen_from = format!("/ip4/{}/", lan.wan_ip());
        let observed = p
            .wait_for(|x| event(x, "identify").is_some(), secs(15))
            .map(|x| field(&event(&x, "identify").unwrap(), "observed_addr"))
            .unwrap_or_else(|e| panic!("{transport}: no identify: {e}"));
        assert!(
            observed.starts_with(&seen_from),
            "{transport}: observed as {observed}"
        );
        let done = finish_dial(p, 15).unwrap_or_else(|e| panic!("{transport}: {e}"));
        assert_eq!(done["pings"], 3);
    }
    let agent = l
        .wait_for(|x| event(x, "identify").is_some(), secs(5))
        .unwrap();
    assert_eq!(
        field(&event(&agent, "identify").unwrap(), "agent_version"),
        "lab-node"
    );
}

#[test]
fn nat_types_map_source_ports_as_documented() {
    if !require_root("nat_types_map_source_ports_as_documented") {
        return;
    }
    let lab = Lab::new("nat-types").unwrap();
    let servers = [lab.internet_host("srv1", 80), lab.internet_host("srv2", 81)];
    let listeners: Vec<(Proc, String)> = servers
        .iter()
        .map(|s| {
            listen(
                s,
                &[
                    format!("/ip4/{}/tcp/4001", s.ip()),
                    format!("/ip4/{}/udp/4001/quic-v1", s.ip()),
                ],
                &[],
            )
        })
        .collect();
    for (nat, index) in [(Nat::Masquerade, 8), (Nat::Symmetric, 9)] {
        let lan = lab.lan(&format!("{nat:?}"), nat, index);
        let pc = lab.lan_host(&lan, "pc", 10);
        for (proto, suffix) in [("tcp", ""), ("udp", "/quic-v1")] {
            // The same source port towards two destinations, one after the other.
            let from = format!("/ip4/0.0.0.0/{proto}/5555{suffix}");
            let ports: Vec<u16> = servers
                .iter()
                .zip(&listeners)
                .map(|(srv, (l, peer))| {
                    let to = format!("/ip4/{}/{proto}/4001{suffix}/p2p/{peer}", srv.ip());
                    finish_dial(start_dial(&pc, &to, 1, 10, &["--listen", &from]), 10)
                        .unwrap_or_else(|e| panic!("{nat:?} {proto} to {}: {e}", srv.name()));
                    let prefix = format!("/ip4/{}/{proto}/", lan.wan_ip());
                    let line = l
                        .wait_for(
                            |x| {
                                event(x, "connected")
                                    .is_some_and(|v| field(&v, "remote_addr").starts_with(&prefix))
                            },
                            secs(5),
                        )
                        .unwrap();
                    let remote = field(&event(&line, "connected").unwrap(), "remote_addr");
                    remote
                        .split('/')
                        .nth(4)
                        .and_then(|p| p.parse().ok())
                        .expect("port")
                })
                .collect();
            match nat {
                // Port kept, whatever the destination: endpoint-independent mapping.
                Nat::Masquerade => assert_eq!(ports, [5555, 5555], "{nat:?} {proto}"),
                // A new mapping per destination: symmetric.
                Nat::Symmetric => assert_ne!(ports[0], ports[1], "{nat:?} {proto}"),
            }
        }
    }
}

#[test]
fn dropping_a_lab_removes_its_namespaces_and_processes() {
    if !require_root("dropping_a_lab_removes_its_namespaces_and_processes") {
        return;
    }
    let (names, orphan) = {
        let lab = Lab::new("drop").unwrap();
        let srv = lab.internet_host("srv", 40);
        let lan = lab.lan("home", Nat::Masquerade, 4);
        let pc = lab.lan_host(&lan, "pc", 10);
        // Detached from us: only the lab's cleanup can end it.
        let out = pc.sh("sleep 300 >/dev/null 2>&1 & echo $!").unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid of sleep");
        let _ = srv;
        (lab.namespaces(), pid)
    };
    assert_namespaces_gone(&names);
    assert_eq!(names.len(), 4, "net, srv, router, pc: {names:?}");
    let deadline = Instant::now() + secs(3);
    // Gone, or a zombie waiting for its reaper: either way not running.
    while let Ok(stat) = std::fs::read_to_string(format!("/proc/{orphan}/stat")) {
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            break;
        }
        assert!(Instant::now() < deadline, "sleep {orphan} outlived its lab");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_panicking_test_still_removes_its_lab() {
    if !require_root("a_panicking_test_still_removes_its_lab") {
        return;
    }
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    let result = catch_unwind(AssertUnwindSafe(move || {
        let lab = Lab::new("panic").unwrap();
        let lan = lab.lan("home", Nat::Symmetric, 5);
        lab.lan_host(&lan, "pc", 10);
        *seen.lock().unwrap() = lab.namespaces();
        panic!("a test failing mid-way (expected)");
    }));
    assert!(result.is_err());
    assert_namespaces_gone(&names.lock().unwrap());
}

#[test]
fn partition_cuts_and_restores_the_lan() {
    if !require_root("partition_cuts_and_restores_the_lan") {
        return;
    }
    let lab = Lab::new("partition").unwrap();
    let srv = lab.internet_host("srv", 60);
    let lan = lab.lan("home", Nat::Masquerade, 6);
    let pc = lab.lan_host(&lan, "pc", 10);
    let (_l, peer) = listen(&srv, &[format!("/ip4/{}/tcp/4001", srv.ip())], &[]);
    let addr = format!("/ip4/{}/tcp/4001/p2p/{peer}", srv.ip());

    lan.partition(true).unwrap();
    lan.partition(true).expect("partitioning twice is fine");
    let err = dial(&pc, &addr, 1, 3).expect_err("dial across a partition");
    assert!(err.contains("timeout"), "{err}");

    lan.partition(false).unwrap();
    lan.partition(false).expect("healing twice is fine");
    dial(&pc, &addr, 1, 10).expect("dial after the partition healed");
}

#[test]
fn rate_limit_installs_and_clears_tbf() {
    if !require_root("rate_limit_installs_and_clears_tbf") {
        return;
    }
    let lab = Lab::new("rate").unwrap();
    let srv = lab.internet_host("srv", 70);
    let lan = lab.lan("home", Nat::Masquerade, 7);
    let qdisc =
        |h: &Host| String::from_utf8_lossy(&h.sh("tc qdisc show").unwrap().stdout).into_owned();
    lab.rate_limit(&lan, "10mbit").unwrap();
    lab.rate_limit(&srv, "500kbit").unwrap();
    assert!(
        qdisc(lan.router()).contains("tbf"),
        "{}",
        qdisc(lan.router())
    );
    assert!(qdisc(&srv).contains("rate 500Kbit"), "{}", qdisc(&srv));
    lab.clear_rate_limit(&lan).unwrap();
    assert!(!qdisc(lan.router()).contains("tbf"));
    assert!(lab.rate_limit(&srv, "fast").is_err());
}

#[test]
fn stale_namespaces_of_dead_labs_are_removed() {
    if !require_root("stale_namespaces_of_dead_labs_are_removed") {
        return;
    }
    // A lab id no live process holds (no marker in /run/relaygate-netlab).
    let ns = "rg9999z0-stale";
    let out = Command::new("ip")
        .args(["netns", "add", ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let removed = Lab::cleanup_stale().unwrap();
    assert!(removed.iter().any(|r| r == ns), "{removed:?}");
    assert_namespaces_gone(&[ns.to_string()]);
}
