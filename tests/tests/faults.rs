//! Faults: the gateway killed mid-transfer, the target restarting, a LAN
//! router dropping every packet for 20 s, and a data dir that cannot be
//! written. Each test states what must hold afterwards.

use std::{
    net::TcpStream,
    path::Path,
    time::{Duration, Instant},
};

use relaygate_tests::{
    netlab::{require_root, Lab, Nat},
    procs::{free_tcp_port, workspace_bin, Proc},
    stack::{eventually, here, round_trip, Agent, Echo, Gateway, GatewaySpec, Transport},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const LEASE: Duration = Duration::from_secs(20);

#[test]
fn gateway_killed_mid_transfer_every_agent_returns_within_5s_on_its_port() {
    // Default session settings. A killed gateway sends no close; the
    // restarted one recognises the QUIC connection ids of the sessions it
    // lost (stable, from its identity) and answers their next keep-alive with
    // a stateless reset, so QUIC agents reconnect as fast as TCP ones.
    let mut gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let transports = [Transport::Quic, Transport::Tcp, Transport::Quic];
    let agents: Vec<Agent> = transports
        .iter()
        .map(|t| Agent::start(&here, &gw, *t, &[echo.tunnel("node")], true, &[]))
        .collect();
    let ports: Vec<u16> = agents
        .iter()
        .map(|a| a.wait_leased("node", LEASE).expect("lease"))
        .collect();
    let seen: Vec<usize> = agents.iter().map(|a| a.lease_count("node")).collect();

    // A transfer is running through the first agent when the gateway dies.
    let mut transfer = std::process::Command::new(LAB_NODE);
    transfer.args([
        "tcp-stream",
        "--addr",
        &format!("127.0.0.1:{}", ports[0]),
        "--seconds",
        "10",
    ]);
    let transfer = Proc::spawn("transfer", transfer);
    transfer
        .wait_for(|l| l.contains("progress"), Duration::from_secs(10))
        .expect("transfer running");
    gw.crash_and_restart(&here);
    let restarted = Instant::now();
    for ((a, port), n) in agents.iter().zip(&ports).zip(&seen) {
        let again = a
            .wait_leased_again("node", *n, Duration::from_secs(10))
            .expect("agent came back");
        assert_eq!(again, *port, "the same port after the restart");
    }
    let back = restarted.elapsed();
    println!("all agents re-leased {back:?} after the gateway restarted");
    assert!(back <= Duration::from_secs(5), "agents took {back:?}");
    for port in &ports {
        assert!(
            eventually(Duration::from_secs(2), || round_trip(*port, b"after")
                .unwrap_or_default()
                == b"after"),
            "new connections work on port {port}"
        );
    }
}

#[test]
fn a_restarting_target_refuses_while_down_and_serves_when_back() {
    let gw = Gateway::start(&here, GatewaySpec::default());
    let target_port = free_tcp_port();
    let target = format!("127.0.0.1:{target_port}");
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Tcp,
        &[format!("node={target}")],
        true,
        &[],
    );
    let port = agent.wait_leased("node", LEASE).expect("lease");
    let up = || {
        let mut cmd = std::process::Command::new(LAB_NODE);
        cmd.args(["tcp-echo", "--listen", &target]);
        let p = Proc::spawn("target", cmd);
        p.wait_for(|l| l.contains("listening"), Duration::from_secs(10))
            .expect("target up");
        p
    };
    let mut t = up();
    assert_eq!(round_trip(port, b"one").expect("round trip"), b"one");
    t.kill_hard();
    // Down: the public connection ends at once with nothing, not after a timeout.
    let started = Instant::now();
    assert!(round_trip(port, b"two").unwrap_or_default().is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
    let _t = up();
    assert_eq!(round_trip(port, b"three").expect("round trip"), b"three");
}

#[test]
fn sessions_recover_after_a_20s_partition_of_the_lan() {
    if !require_root("sessions_recover_after_a_20s_partition_of_the_lan") {
        return;
    }
    let lab = Lab::new("part").expect("lab");
    let gw_host = lab.internet_host("gw", 10);
    let client = lab.internet_host("client", 20);
    let lan = lab.lan("lan", Nat::Masquerade, 1);
    let node = lab.lan_host(&lan, "node", 10);
    let launch_gw = |b: &Path| gw_host.cmd(b);
    let gw = Gateway::start(
        &launch_gw,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: gw_host.ip().to_string(),
            ..Default::default()
        },
    );
    let mut echo = node.cmd(LAB_NODE);
    echo.args(["tcp-echo", "--listen", "127.0.0.1:9905"]);
    let echo = Proc::spawn("echo", echo);
    echo.wait_for(|l| l.contains("listening"), Duration::from_secs(10))
        .expect("echo");
    let launch_agent = |b: &Path| node.cmd(b);
    let agents: Vec<Agent> = [Transport::Quic, Transport::Tcp]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Agent::start(
                &launch_agent,
                &gw,
                *t,
                &[format!("node{i}=127.0.0.1:9905")],
                true,
                &[],
            )
        })
        .collect();
    let ports: Vec<u16> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| a.wait_leased(&format!("node{i}"), LEASE).expect("lease"))
        .collect();
    let send = |port: u16, data: &str| {
        let mut cmd = client.cmd(LAB_NODE);
        cmd.args([
            "tcp-send",
            "--addr",
            &format!("{}:{port}", gw_host.ip()),
            "--data",
            data,
            "--timeout-secs",
            "5",
        ]);
        cmd.output().is_ok_and(|o| o.status.success())
    };
    for p in &ports {
        assert!(send(*p, "before"), "port {p} works before the partition");
    }
    let seen: Vec<usize> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| a.lease_count(&format!("node{i}")))
        .collect();
    lan.partition(true).expect("partition");
    std::thread::sleep(Duration::from_secs(20));
    lan.partition(false).expect("heal");
    let healed = Instant::now();
    for (i, a) in agents.iter().enumerate() {
        let name = format!("node{i}");
        let port = a
            .wait_leased_again(&name, seen[i], Duration::from_secs(30))
            .expect("session came back");
        assert_eq!(port, ports[i]);
    }
    println!(
        "sessions back {:?} after the partition healed",
        healed.elapsed()
    );
    for p in &ports {
        assert!(
            eventually(Duration::from_secs(5), || send(*p, "after")),
            "port {p} works after the partition"
        );
    }
}

fn run_gateway(data_dir: &Path) -> (bool, String) {
    let mut c = std::process::Command::new(workspace_bin("relaygate-gateway"));
    c.arg("--data-dir").arg(data_dir).args([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let mut p = Proc::spawn("gateway", c);
    let status = p.wait_exit(Duration::from_secs(15));
    (status.is_some_and(|s| s.success()), p.lines().join("\n"))
}

#[test]
fn an_unwritable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A regular file where the data dir should be: nothing can be created under it.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let (ok, log) = run_gateway(&file.join("data"));
    assert!(!ok, "the gateway must not start");
    assert!(
        log.contains("data")
            && (log.contains("Not a directory") || log.contains("not a directory")),
        "the error names the problem:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_full_disk_never_corrupts_the_lease_store() {
    if !require_root("a_full_disk_never_corrupts_the_lease_store") {
        return;
    }
    // A 2 MiB tmpfs holds the data dir; a lease is taken, then the disk is filled.
    let mnt = tempfile::tempdir().expect("tempdir");
    let m = mnt.path().display().to_string();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", &m])
        .status()
        .expect("mount");
    assert!(mount.success(), "mount tmpfs");
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(m.clone());
    let data = mnt.path().join("gw");

    let mut gw = Gateway::start(
        &here,
        GatewaySpec {
            data_dir: Some(data.clone()),
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
    // Fill the disk, then make the gateway write: new agents want leases.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("of={m}/filler"), "bs=64k"])
        .output();
    let more: Vec<Agent> = (0..3)
        .map(|i| {
            Agent::start(
                &here,
                &gw,
                Transport::Tcp,
                &[format!("t{i}={}", echo.addr)],
                true,
                &[],
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the gateway is still up and serving the existing lease"
    );
    drop(more);
    // Free the space and restart: the store opens and the first lease is intact.
    std::fs::remove_file(format!("{m}/filler")).expect("free space");
    gw.crash_and_restart(&here);
    let seen = agent.lease_count("node");
    let again = agent
        .wait_leased_again("node", seen, Duration::from_secs(30))
        .expect("agent back");
    assert_eq!(again, port, "the lease survived a full disk and a crash");
}
