//! The benchmark's helper processes: the targets (sink and echo, and a UDP
//! echo) and the plain TCP forwarders of the floor, each this binary in
//! another role.

use std::{net::SocketAddr, time::Duration};

use relaygate_tests::{
    procs::Proc,
    stack::{here, Launch},
    udpkit,
};
use tokio::net::{TcpListener, TcpStream};

use crate::load::{start_echo, start_sink};

/// The targets process and where its services listen (on `0.0.0.0` in the
/// WAN lab: connect to their ports).
pub(crate) struct Targets {
    /// The process; the targets live as long as this.
    pub _proc: Proc,
    pub sink: SocketAddr,
    pub echo: SocketAddr,
    /// The udpkit UDP echo.
    pub udp: SocketAddr,
}

/// The targets (sink and echo) run in a process of their own, as a real
/// service does: direct and tunnelled figures both cross processes, as with
/// iperf3 or an echo server, and this process stays under the open-files
/// limit while holding 10,000 idle connections.
pub(crate) fn spawn_targets(ports: &[u16]) -> anyhow::Result<Targets> {
    spawn_targets_with(&here, "127.0.0.1", ports)
}

/// The targets process, started through `launch` (e.g. in a namespace) and
/// listening on `bind`.
pub(crate) fn spawn_targets_with(
    launch: Launch,
    bind: &str,
    ports: &[u16],
) -> anyhow::Result<Targets> {
    let mut args = vec![
        "--serve-targets".to_string(),
        "--targets-bind".into(),
        bind.into(),
    ];
    if let [s, e] = ports {
        args.extend(["--targets-ports".into(), format!("{s},{e}")]);
    }
    let (p, line) = spawn_self_with(launch, "targets", &args, "targets listening")?;
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .ok_or_else(|| anyhow::anyhow!("no {key} in {line:?}"))?
            .parse()
            .map_err(anyhow::Error::from)
    };
    Ok(Targets {
        sink: addr("sink=")?,
        echo: addr("echo=")?,
        udp: addr("udp=")?,
        _proc: p,
    })
}

/// A process relaying a local port to each of `targets`, in order.
pub(crate) fn spawn_relays(
    targets: &[SocketAddr],
) -> anyhow::Result<(relaygate_tests::procs::Proc, Vec<SocketAddr>)> {
    let mut args = vec!["--serve-relays".to_string()];
    args.extend(targets.iter().map(|t| t.to_string()));
    let (p, line) = spawn_self("relay", &args, "relays listening")?;
    let addrs = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect::<Vec<SocketAddr>>();
    anyhow::ensure!(addrs.len() == targets.len(), "relay printed {line:?}");
    Ok((p, addrs))
}

/// This binary in another role; returns it and its line containing `ready`.
pub(crate) fn spawn_self(
    label: &str,
    args: &[String],
    ready: &str,
) -> anyhow::Result<(relaygate_tests::procs::Proc, String)> {
    spawn_self_with(&here, label, args, ready)
}

pub(crate) fn spawn_self_with(
    launch: Launch,
    label: &str,
    args: &[String],
    ready: &str,
) -> anyhow::Result<(relaygate_tests::procs::Proc, String)> {
    let mut cmd = launch(&std::env::current_exe()?);
    cmd.args(args);
    let p = relaygate_tests::procs::Proc::spawn(label, cmd);
    let line = p
        .wait_for(|l| l.contains(ready), Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    Ok((p, line))
}

/// One worker per core whatever TOKIO_WORKER_THREADS says: that variable
/// reaches the gateway and agent processes, for trying their settings.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
}

pub(crate) fn serve_relays(targets: &[SocketAddr]) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut addrs = Vec::new();
        for &target in targets {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(l.local_addr()?.to_string());
            tokio::spawn(async move {
                while let Ok((mut a, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut b) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = a.set_nodelay(true);
                        let _ = b.set_nodelay(true);
                        // The lane's frame size, for a like-for-like copy.
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut a,
                            &mut b,
                            64 * 1024,
                            64 * 1024,
                        )
                        .await;
                    });
                }
            });
        }
        println!("relays listening {}", addrs.join(" "));
        std::future::pending::<()>().await;
        Ok(())
    })
}

pub(crate) fn serve_targets(
    bind: std::net::IpAddr,
    sink_port: u16,
    echo_port: u16,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (sink, echo) = (
            start_sink((bind, sink_port).into()).await?,
            start_echo((bind, echo_port).into()).await?,
        );
        let (udp, _udp_echo) = udpkit::echo_server((bind, 0).into()).await?;
        println!("targets listening sink={sink} echo={echo} udp={udp}");
        std::future::pending::<()>().await;
        Ok(())
    })
}
