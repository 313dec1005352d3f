//! A fleet of three gateways on the lab's internet segment, one etcd there
//! too, and a node behind a NAT whose agent holds one session
//! (`gateway.max_sessions = 1`) (issue #16): a remote reaching the node
//! through any gateway, two of them by forwarding, is seen by the node at
//! its own address (transparent delivery); `relaygate-agent doctor` dials
//! every gateway of the fleet and has each dial the leased port back, and
//! names a gateway that died.

use std::{path::Path, time::Duration};

use relaygate_tests::{
    etcd::{require_etcd, Etcd},
    fleetkit::fleet,
    netlab::{require_root, Host, Lab, Nat},
    procs::{workspace_bin, Proc},
    stack::{eventually, http_get, Agent, Gateway, GatewaySpec, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const T: Duration = Duration::from_secs(30);

fn field(line: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

/// The fleet as the agent knows it: (gateway, whether it holds a session).
fn agent_fleet(node_host: &Host, agent: &Agent) -> Vec<(String, bool)> {
    let body = node_host.run_in(|| http_get(agent.admin, "/v1/advertise").1);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["fleet"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| Some((g["gateway"].as_str()?.to_string(), g["session"].as_bool()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn forwarded_connections_keep_the_source_and_doctor_checks_every_gateway() {
    let name = "forwarded_connections_keep_the_source_and_doctor_checks_every_gateway";
    if !require_root(name) || !require_etcd(name) {
        return;
    }
    let lab = Lab::new("fl").expect("lab");
    let gw_hosts: Vec<Host> = (0..3)
        .map(|i| lab.internet_host(&format!("gw{i}"), 10 + i as u8))
        .collect();
    let remote = lab.internet_host("remote", 20);
    let etcd_host = lab.internet_host("etcd", 30);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node_host = lab.lan_host(&lan, "node", 10);

    let etcd = Etcd::start_at(&|b: &Path| etcd_host.cmd(b), &etcd_host.ip().to_string());
    let gws: Vec<Gateway> = gw_hosts
        .iter()
        .map(|h| {
            let launch = |b: &Path| h.cmd(b);
            Gateway::start(
                &launch,
                GatewaySpec {
                    bind: "0.0.0.0".into(),
                    public_ip: h.ip().to_string(),
                    port_range: Some("20000-20009".into()),
                    extra: [
                        "store.kind=etcd".to_string(),
                        format!("store.etcd.endpoints={}", etcd.endpoint()),
                        "store.etcd.member_ttl=3s".into(),
                    ]
                    .into_iter()
                    .flat_map(|s| ["--set".to_string(), s])
                    .collect(),
                    ..Default::default()
                },
            )
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(15), || gw_hosts[0]
            .run_in(|| fleet(&gws[0]))
            .len()
            == 3),
        "gateway 1 sees the fleet of three"
    );

    let mut target = node_host.cmd(LAB_NODE);
    target.args(["tcp-echo", "--listen", "0.0.0.0:7000"]);
    let target = Proc::spawn("target", target);
    target
        .wait_for(|l| l.contains("7000"), T)
        .expect("target up");
    let tunnel = format!("echo={}:7000,deliver=transparent", node_host.ip());
    let one = ["--set".to_string(), "gateway.max_sessions=1".to_string()];
    let launch_agent = |b: &Path| node_host.cmd(b);
    let agent = Agent::start(
        &launch_agent,
        &gws[0],
        Transport::Quic,
        std::slice::from_ref(&tunnel),
        true,
        &one,
    );
    let port = agent.wait_leased("echo", T).expect("lease");
    agent
        .proc
        .wait_for(|l| l.contains("transparent delivery rules installed"), T)
        .expect("rules installed");
    assert!(
        eventually(Duration::from_secs(10), || {
            let f = agent_fleet(&node_host, &agent);
            f.len() == 3 && f.iter().filter(|(_, s)| *s).count() == 1
        }),
        "the agent knows three gateways and holds one: {:?}",
        agent_fleet(&node_host, &agent)
    );

    // Through each gateway, two of them forwarding: the node sees the remote itself.
    for (i, h) in gw_hosts.iter().enumerate() {
        let addr = format!("{}:{port}", h.ip());
        let mut echoed = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while echoed.is_none() && std::time::Instant::now() < deadline {
            let mut send = remote.cmd(LAB_NODE);
            send.args(["tcp-send", "--addr", &addr, "--data", "who am i"]);
            let mut send = Proc::spawn("remote", send);
            echoed = send
                .wait_for(|l| l.contains("\"echoed\""), Duration::from_secs(5))
                .ok();
            let _ = send.wait_exit(Duration::from_secs(5));
            if echoed.is_none() {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        let echoed = echoed.unwrap_or_else(|| panic!("no echo through gateway {} ({addr})", i + 1));
        let local = field(&echoed, "local");
        let accepted = target
            .wait_for(
                |l| l.contains("\"accepted\"") && field(l, "peer") == local,
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "through gateway {}: the node never saw {local} as its peer: {e}",
                    i + 1
                )
            });
        let peer = field(&accepted, "peer");
        assert!(
            peer.starts_with(&format!("{}:", remote.ip())),
            "through gateway {} the node saw {peer}, want the remote {}",
            i + 1,
            remote.ip()
        );
    }

    let seed = gws[0].addr(Transport::Quic);
    let doctor = |label: &str| {
        let mut cmd = node_host.cmd(workspace_bin("relaygate-agent"));
        cmd.arg("--data-dir").arg(agent.dir.path());
        cmd.args(["--gateway", &seed]);
        cmd.args([
            "--admin-listen",
            &agent.admin.to_string(),
            "--tunnel",
            &tunnel,
            "doctor",
        ]);
        let mut p = Proc::spawn(label, cmd);
        let st = p
            .wait_exit(Duration::from_secs(90))
            .expect("doctor finishes");
        (st.success(), p.lines().join("\n"))
    };
    let (ok, out) = doctor("doctor");
    assert!(ok, "doctor should find nothing wrong:\n{out}");
    let ids: Vec<String> = gws.iter().map(|g| g.peer_id.clone()).collect();
    let through = |id: &str| format!("through fleet gateway {id}: ");
    // A line with every part: doctor's verdict on one check.
    let line_with = |out: &str, parts: &[&str]| {
        out.lines()
            .any(|l| l.starts_with("[ ok ]") && parts.iter().all(|p| l.contains(p)))
    };
    let answered =
        |out: &str, via: &str| line_with(out, &["dial-back to echo", via, "the target answered"]);
    for via in [
        "through the gateway: ".to_string(),
        through(&ids[1]),
        through(&ids[2]),
    ] {
        assert!(answered(&out, &via), "no dial-back {via:?} in\n{out}");
    }
    for want in [
        format!("fleet gateway {} holds no session", ids[1]),
        format!("gateway reachable at /ip4/{}/", gw_hosts[2].ip()),
        "verdict: healthy".into(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }

    // A gateway dies: doctor names it at once...
    let mut gws = gws;
    gws[2].proc.kill_hard();
    let (ok, out) = doctor("doctor-dead");
    assert!(
        !ok,
        "doctor must fail while a dead gateway is in the fleet:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "gateway not reachable at /ip4/{}/",
            gw_hosts[2].ip()
        )),
        "doctor names the dead gateway:\n{out}"
    );
    assert!(answered(&out, &through(&ids[1])), "{out}");
    // ...and once it has left the fleet's view, it costs nothing.
    assert!(
        eventually(Duration::from_secs(15), || agent_fleet(&node_host, &agent)
            .len()
            == 2),
        "the dead gateway leaves the agent's view: {:?}",
        agent_fleet(&node_host, &agent)
    );
    let (ok, out) = doctor("doctor-after");
    assert!(ok, "healthy again without the dead gateway:\n{out}");
    drop(lab);
}
