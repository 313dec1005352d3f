//! Transparent delivery across a real NAT: the node sees each remote's real
//! address (not loopback, not the LAN router, not the gateway), IPv4 and IPv6;
//! a private-address gater accepts it only with transparent delivery; the
//! node's own traffic is untouched; rules are installed once and removed.

use std::{path::Path, time::Duration};

use relaygate_tests::{
    labworld::{field, sh, world as lab_world, World},
    netlab::require_root,
    procs::Proc,
    stack::{Agent, Gateway, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const T: Duration = Duration::from_secs(30);

fn world() -> World {
    lab_world("tp")
}

fn gateway(w: &World) -> Gateway {
    w.gateway(None, &[])
}

fn agent(w: &World, gw: &Gateway, tunnels: &[String]) -> Agent {
    w.agent(gw, tunnels)
}

#[test]
fn target_sees_the_remotes_real_address_v4_and_v6() {
    if !require_root("target_sees_the_remotes_real_address_v4_and_v6") {
        return;
    }
    let w = world();
    let mut echo = w.node_host.cmd(LAB_NODE);
    echo.args([
        "tcp-echo",
        "--listen",
        "0.0.0.0:7000",
        "--listen",
        "[::]:7001",
    ]);
    let echo = Proc::spawn("target", echo);
    echo.wait_for(|l| l.contains("7001"), T).expect("target up");
    let gw = gateway(&w);
    let (v4, v6) = (w.node_host.ip(), w.node_host.ip6());
    let a = agent(
        &w,
        &gw,
        &[
            format!("v4={v4}:7000,deliver=transparent"),
            format!("v6=[{v6}]:7001,deliver=transparent"),
            // Another host: its connections would leave with public sources.
            format!("far={}:7000,deliver=transparent", w.remote.ip()),
        ],
    );
    let refused = a
        .proc
        .wait_for(|l| l.contains("tunnel not started") && l.contains("far"), T)
        .expect("a transparent tunnel to another host is refused");
    assert!(refused.contains("IP address of this host"), "{refused}");
    let p4 = a.wait_leased("v4", T).expect("v4 lease");
    let p6 = a.wait_leased("v6", T).expect("v6 lease");
    a.proc
        .wait_for(|l| l.contains("transparent delivery rules installed"), T)
        .expect("rules installed");

    for (addr, remote_ip) in [
        (
            format!("{}:{p4}", w.gw_host.ip()),
            w.remote.ip().to_string(),
        ),
        (
            format!("[{}]:{p6}", w.gw_host.ip6()),
            w.remote.ip6().to_string(),
        ),
    ] {
        let mut send = w.remote.cmd(LAB_NODE);
        send.args(["tcp-send", "--addr", &addr, "--data", "who am i"]);
        let mut send = Proc::spawn("remote", send);
        let echoed = send
            .wait_for(|l| l.contains("\"echoed\""), T)
            .expect("echo through the tunnel");
        assert!(send.wait_exit(T).is_some_and(|s| s.success()));
        let local = field(&echoed, "local"); // the remote's own ip:port
        let accepted = echo
            .wait_for(
                |l| l.contains("\"accepted\"") && field(l, "peer") == local,
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("target never saw {local} as its peer: {e}"));
        let peer = field(&accepted, "peer");
        assert!(
            peer.contains(&remote_ip),
            "target saw {peer}, want the remote {remote_ip}"
        );
        for wrong in [
            "127.0.0.1",
            &w.lan.gateway_ip().to_string(),
            &w.gw_host.ip().to_string(),
            &w.lan.wan_ip().to_string(),
        ] {
            assert!(!peer.starts_with(wrong), "target saw {peer}");
        }
    }
}

#[test]
fn private_source_gater_accepts_transparent_and_refuses_plain() {
    if !require_root("private_source_gater_accepts_transparent_and_refuses_plain") {
        return;
    }
    let w = world();
    let mut node = w.node_host.cmd(LAB_NODE);
    node.args([
        "listen",
        "--listen",
        "/ip4/0.0.0.0/tcp/9905",
        "--deny-private-sources",
        "--seed",
        "7",
    ]);
    let node = Proc::spawn("node", node);
    let peer = field(
        &node
            .wait_for(|l| l.contains("\"listening\""), T)
            .expect("node up"),
        "peer_id",
    );
    let gw = gateway(&w);
    let a = agent(
        &w,
        &gw,
        &[
            format!("tnode={}:9905,deliver=transparent", w.node_host.ip()),
            "pnode=127.0.0.1:9905".to_string(),
        ],
    );
    let pt = a.wait_leased("tnode", T).expect("lease");
    let pp = a.wait_leased("pnode", T).expect("lease");
    let gw_ip = w.gw_host.ip();

    let mut dial = w.remote.cmd(LAB_NODE);
    dial.args([
        "dial",
        "--addr",
        &format!("/ip4/{gw_ip}/tcp/{pt}/p2p/{peer}"),
        "--pings",
        "2",
    ]);
    let mut dial = Proc::spawn("remote", dial);
    dial.wait_for(|l| l.contains("\"done\""), T)
        .expect("transparent: the gater accepts the remote");
    assert!(dial.wait_exit(T).is_some_and(|s| s.success()));
    let remote_prefix = format!("/ip4/{}/tcp/", w.remote.ip());
    node.wait_for(
        |l| l.contains("\"connected\"") && field(l, "remote_addr").starts_with(&remote_prefix),
        T,
    )
    .expect("node's view of the remote is its real address");
    let observed = format!("/ip4/{gw_ip}/tcp/{pt}");
    node.wait_for(
        |l| l.contains("\"identify\"") && field(l, "observed_addr") == observed,
        T,
    )
    .expect("remote observed the node at the gateway's public address and port");

    let mut dial = w.remote.cmd(LAB_NODE);
    dial.args([
        "dial",
        "--addr",
        &format!("/ip4/{gw_ip}/tcp/{pp}/p2p/{peer}"),
        "--pings",
        "1",
        "--timeout-secs",
        "10",
    ]);
    let mut dial = Proc::spawn("remote-plain", dial);
    let st = dial.wait_exit(T).expect("plain dial ends");
    assert!(
        !st.success(),
        "plain delivery comes from loopback and must be refused by the gater"
    );
    node.wait_for(
        |l| l.contains("\"denied\"") && field(l, "remote_addr").starts_with("/ip4/127.0.0.1/"),
        T,
    )
    .expect("gater refused the loopback source");
}

#[test]
fn nodes_own_traffic_is_untouched_while_transparent_delivery_runs() {
    if !require_root("nodes_own_traffic_is_untouched_while_transparent_delivery_runs") {
        return;
    }
    let w = world();
    let public = w.lab.internet_host("public", 30);
    let mut p = public.cmd(LAB_NODE);
    p.args(["listen", "--listen", "/ip4/0.0.0.0/tcp/4001", "--seed", "9"]);
    let p = Proc::spawn("public", p);
    let public_peer = field(
        &p.wait_for(|l| l.contains("\"listening\""), T)
            .expect("public up"),
        "peer_id",
    );
    let gw = gateway(&w);
    let a = agent(
        &w,
        &gw,
        &[format!(
            "node={}:9905,deliver=transparent",
            w.node_host.ip()
        )],
    );
    let port = a.wait_leased("node", T).expect("lease");
    a.proc
        .wait_for(|l| l.contains("rules installed"), T)
        .expect("rules");
    let public_addr = format!("/ip4/{}/tcp/4001/p2p/{public_peer}", public.ip());

    // The node listens on 9905 (the tunnel's target) and dials out from that port.
    let mut node = w.node_host.cmd(LAB_NODE);
    node.args([
        "dial",
        "--listen",
        "/ip4/0.0.0.0/tcp/9905",
        "--addr",
        &public_addr,
        // long enough for the remote below to reach it meanwhile
        "--pings",
        "5",
        "--timeout-secs",
        "20",
    ]);
    let mut node = Proc::spawn("node", node);
    let node_ip = w.node_host.ip().to_string();
    node.wait_for(|l| l.contains("\"listening\"") && l.contains(&node_ip), T)
        .expect("node listens before the remote dials");
    // Meanwhile a remote reaches the same node through the tunnel.
    let mut remote = w.remote.cmd(LAB_NODE);
    remote.args([
        "dial",
        "--addr",
        &format!("/ip4/{}/tcp/{port}", w.gw_host.ip()),
        "--pings",
        "1",
    ]);
    let mut remote = Proc::spawn("remote", remote);
    assert!(
        remote.wait_exit(T).is_some_and(|s| s.success()),
        "remote reached the node through the tunnel"
    );
    assert!(
        node.wait_exit(T).is_some_and(|s| s.success()),
        "node's own outbound dial from its listen port works"
    );
    let wan_9905 = format!("/ip4/{}/tcp/9905", w.lan.wan_ip());
    p.wait_for(
        |l| l.contains("\"connected\"") && field(l, "remote_addr") == wan_9905,
        T,
    )
    .expect("the node's dial left from its listen port");

    // An unrelated process on the same host is untouched too.
    let mut other = w.node_host.cmd(LAB_NODE);
    other.args(["dial", "--addr", &public_addr, "--pings", "1"]);
    let mut other = Proc::spawn("other", other);
    assert!(
        other.wait_exit(T).is_some_and(|s| s.success()),
        "unrelated process dials out"
    );
}

#[test]
fn rules_are_installed_once_and_removed_on_exit() {
    if !require_root("rules_are_installed_once_and_removed_on_exit") {
        return;
    }
    let w = world();
    let gw = gateway(&w);
    let tunnel = [format!(
        "node={}:9905,deliver=transparent",
        w.node_host.ip()
    )];
    let count_rules = |fam: &str| {
        sh(&w.node_host, &format!("ip {fam} rule show"))
            .matches("fwmark 0x5247")
            .count()
    };

    let mut first = agent(&w, &gw, &tunnel);
    first
        .proc
        .wait_for(|l| l.contains("rules installed"), T)
        .expect("rules");
    assert_eq!(count_rules("-4"), 1);
    assert_eq!(count_rules("-6"), 1);
    first.proc.kill_hard(); // no cleanup on SIGKILL: the next start must not duplicate
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    let launch = |b: &Path| w.node_host.cmd(b);
    let mut second = Agent::start_in(&launch, &gw, Transport::Quic, &tunnel, true, &[], dir);
    second
        .proc
        .wait_for(|l| l.contains("rules installed"), T)
        .expect("rules again");
    assert_eq!(count_rules("-4"), 1, "restart must not duplicate the rule");
    assert_eq!(count_rules("-6"), 1);
    assert!(sh(&w.node_host, "nft list tables").contains("relaygate"));

    second.proc.signal(libc::SIGTERM);
    assert!(
        second.proc.wait_exit(T).is_some_and(|s| s.success()),
        "agent exits cleanly"
    );
    assert_eq!(count_rules("-4"), 0, "rule removed");
    assert_eq!(count_rules("-6"), 0);
    assert!(
        !sh(&w.node_host, "nft list tables").contains("relaygate"),
        "nft table removed"
    );
    assert!(
        sh(&w.node_host, "ip -4 route show table 5247")
            .trim()
            .is_empty(),
        "route table emptied"
    );
    assert!(sh(&w.node_host, "ip -6 route show table 5247")
        .trim()
        .is_empty());
}

#[test]
fn without_the_capability_the_tunnel_is_refused_not_downgraded() {
    if !require_root("without_the_capability_the_tunnel_is_refused_not_downgraded") {
        return;
    }
    let w = world();
    let gw = gateway(&w);
    // Drop NET_ADMIN and NET_RAW for the agent only.
    let launch = |b: &Path| {
        let mut c = w.node_host.cmd("setpriv");
        c.args([
            "--bounding-set",
            "-net_admin,-net_raw",
            "--inh-caps",
            "-net_admin,-net_raw",
            "--",
        ])
        .arg(b);
        c
    };
    let a = Agent::start(
        &launch,
        &gw,
        Transport::Quic,
        &[
            format!("node={}:9905,deliver=transparent", w.node_host.ip()),
            "plain=127.0.0.1:9905".to_string(),
        ],
        true,
        &[],
    );
    a.proc
        .wait_for(
            |l| l.contains("tunnel not started") && l.contains("CAP_NET_ADMIN"),
            T,
        )
        .expect("says what is missing");
    a.wait_leased("plain", T).expect("other tunnels still run");
    assert_eq!(
        a.lease_count("node"),
        0,
        "no silent fallback to plain delivery"
    );
}

#[test]
fn missing_rules_refuse_only_the_transparent_tunnel() {
    if !require_root("missing_rules_refuse_only_the_transparent_tunnel") {
        return;
    }
    let w = world();
    let gw = gateway(&w);
    // `external`: the rules should come from an init container, which did not run.
    let launch = |b: &Path| w.node_host.cmd(b);
    let a = Agent::start(
        &launch,
        &gw,
        Transport::Quic,
        &[
            format!("node={}:9905,deliver=transparent", w.node_host.ip()),
            "plain=127.0.0.1:9905".to_string(),
        ],
        true,
        &["--set".into(), "transparent.rules=external".into()],
    );
    a.proc
        .wait_for(
            |l| l.contains("tunnel not started") && l.contains("transparent-rules"),
            T,
        )
        .expect("says the rules are missing and how to install them");
    a.wait_leased("plain", T)
        .expect("the plain tunnel still runs");
    assert_eq!(a.lease_count("node"), 0, "no silent fallback");
    assert!(
        !sh(&w.node_host, "nft list tables").contains("relaygate"),
        "external mode installs nothing"
    );
}

/// Two agents in one network namespace share the rules: the first to leave
/// leaves them for the other, whose transparent tunnel keeps working; the
/// last removes them. At 4462fed the first to leave removed them under the
/// other (issue #15, item 11).
#[test]
fn two_agents_in_one_namespace_share_the_rules() {
    if !require_root("two_agents_in_one_namespace_share_the_rules") {
        return;
    }
    let w = world();
    let mut echo = w.node_host.cmd(LAB_NODE);
    echo.args(["tcp-echo", "--listen", "0.0.0.0:7000"]);
    let echo = Proc::spawn("target", echo);
    echo.wait_for(|l| l.contains("7000"), T).expect("target up");
    let gw = gateway(&w);
    let count_rules = || {
        sh(&w.node_host, "ip -4 rule show")
            .matches("fwmark 0x5247")
            .count()
    };
    let tunnel = |name: &str| {
        [format!(
            "{name}={}:7000,deliver=transparent",
            w.node_host.ip()
        )]
    };
    let mut first = agent(&w, &gw, &tunnel("one"));
    let mut second = agent(&w, &gw, &tunnel("two"));
    for a in [&first, &second] {
        a.proc
            .wait_for(|l| l.contains("rules installed"), T)
            .expect("rules");
    }
    assert_eq!(count_rules(), 1, "one set of rules for both");
    let port = second.wait_leased("two", T).expect("lease");

    first.proc.signal(libc::SIGTERM);
    assert!(first.proc.wait_exit(T).is_some_and(|s| s.success()));
    first
        .proc
        .wait_for(|l| l.contains("another agent here uses them"), T)
        .expect("the first leaves the rules in place");
    assert_eq!(count_rules(), 1, "the rules stay for the second agent");
    assert!(sh(&w.node_host, "nft list tables").contains("relaygate"));

    let addr = format!("{}:{port}", w.gw_host.ip());
    let mut send = w.remote.cmd(LAB_NODE);
    send.args(["tcp-send", "--addr", &addr, "--data", "still here"]);
    let mut send = Proc::spawn("remote", send);
    let echoed = send
        .wait_for(|l| l.contains("\"echoed\""), T)
        .expect("the second agent's transparent tunnel still works");
    assert!(send.wait_exit(T).is_some_and(|s| s.success()));
    let local = field(&echoed, "local");
    echo.wait_for(
        |l| l.contains("\"accepted\"") && field(l, "peer") == local,
        T,
    )
    .expect("the target saw the remote's own address");

    second.proc.signal(libc::SIGTERM);
    assert!(second.proc.wait_exit(T).is_some_and(|s| s.success()));
    assert_eq!(count_rules(), 0, "the last agent out removes the rules");
    assert!(!sh(&w.node_host, "nft list tables").contains("relaygate"));
}

#[test]
fn a_remote_dialling_from_the_nodes_own_port_gets_through_with_its_address() {
    // libp2p peers dial from their listen port: a remote at :9905 reaching a
    // node that listens on 0.0.0.0:9905. The agent cannot bind the remote's
    // exact address and port there; the node must still see its address.
    if !require_root("a_remote_dialling_from_the_nodes_own_port_gets_through_with_its_address") {
        return;
    }
    let w = world();
    // An echo server on 0.0.0.0:9905 that prints who connected.
    const ECHO: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9905))
s.listen()
print("listening", flush=True)
while True:
    c, a = s.accept()
    print("peer", a[0], a[1], flush=True)
    c.sendall(c.recv(64))
    c.close()
"#;
    let mut echo = w.node_host.cmd("python3");
    echo.args(["-c", ECHO]);
    let echo = Proc::spawn("echo", echo);
    echo.wait_for(|l| l.contains("listening"), T)
        .expect("echo up");
    let gw = gateway(&w);
    let a = agent(
        &w,
        &gw,
        &[format!(
            "node={}:9905,deliver=transparent",
            w.node_host.ip()
        )],
    );
    let port = a.wait_leased("node", T).expect("lease");
    let out = sh(
        &w.remote,
        &format!(
            "python3 -c \"import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9905)); s.settimeout(10); s.connect(('{}', {port})); s.sendall(b'same port'); print(s.recv(64).decode())\"",
            w.gw_host.ip()
        ),
    );
    assert!(out.contains("same port"), "no echo: {out:?}");
    let remote = w.remote.ip().to_string();
    echo.wait_for(|l| l.starts_with("peer ") && l.contains(&remote), T)
        .expect("the node saw the remote's own address");
}
