//! WAN figures: the gateway and the load generator on one host, the agent and
//! the targets on another, a router between them that delays (and drops)
//! packets: the test kit's WAN lab. One and eight streams through
//! gateway+agent beside direct TCP over the same path, and optionally through
//! another tunnel set up in the same lab (`--via` with `--via-setup`). The
//! UDP section builds its lab with [`world`] too.

use std::{
    fs::File,
    future::Future,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use relaygate_tests::{
    netlab::{require_root, WanLab, WanPath},
    procs::Proc,
    stack::{settings, Agent, Gateway, GatewaySpec, Transport},
};

use crate::{
    load::throughput,
    roles::{spawn_targets_with, Targets},
    Args,
};

/// One point of the WAN table.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub rtt: Duration,
    pub loss: f64,
}

impl Point {
    /// What `--wan` measures: 0, 50 and 150 ms, each without and with 1% loss.
    pub fn table() -> Vec<Point> {
        let mut v = Vec::new();
        for ms in [0, 50, 150] {
            for loss in [0.0, 0.01] {
                v.push(Point {
                    rtt: Duration::from_millis(ms),
                    loss,
                });
            }
        }
        v
    }
}

/// Gbit/s measured at one point (medians over the runs).
#[derive(Clone, Debug)]
pub struct WanFigures {
    pub point: Point,
    pub direct: [f64; 2],
    pub tunnel: [f64; 2],
    pub via: Option<[f64; 2]>,
}

/// Measures every point, a fresh lab each.
pub fn run(a: &Args, transport: Transport, points: &[Point]) -> anyhow::Result<Vec<WanFigures>> {
    if points.is_empty() {
        return Ok(Vec::new());
    }
    let line = prerequisites("relaygate-bench WAN figures")?;
    let mut out = Vec::new();
    for &p in points {
        eprintln!(
            "WAN: {} ms RTT, {}% loss",
            p.rtt.as_millis(),
            p.loss * 100.0
        );
        out.push(point(a, transport, &line, p)?);
    }
    Ok(out)
}

/// Root, and the delay line: what a lab needs. Returns the delay line.
pub(crate) fn prerequisites(what: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        require_root(what),
        "the WAN figures need root (network namespaces)"
    );
    delay_line()
}

/// A WAN lab at one point: the targets and an agent on the far host, the
/// gateway on the near one, and a runtime for the load generator whose
/// workers live on the near host. The fields drop in order: every process
/// before the lab's namespaces.
pub(crate) struct World {
    pub rt: tokio::runtime::Runtime,
    pub agent: Agent,
    /// Held, not read: the agent's gateway.
    pub _gw: Gateway,
    pub targets: Targets,
    pub lab: WanLab,
}

/// Builds the [`World`] at `p`; the agent's tunnels come from `tunnels`,
/// given the targets (listening on the far host's `0.0.0.0`).
pub(crate) fn world(
    a: &Args,
    transport: Transport,
    line: &Path,
    p: Point,
    tunnels: impl FnOnce(&Targets) -> Vec<String>,
) -> anyhow::Result<World> {
    let lab = WanLab::with_binary("bench", WanPath::rtt(p.rtt).with_loss(p.loss), line)?;
    let (near, far) = (lab.near().clone(), lab.far().clone());
    let in_far = |b: &Path| far.cmd(b);
    let in_near = |b: &Path| near.cmd(b);
    let targets = spawn_targets_with(&in_far, "0.0.0.0", &a.targets_ports)?;
    let gw = Gateway::start(
        &in_near,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: near.ip().to_string(),
            extra: settings(&[
                "log.level=info",
                "guard.tunnel_connections_per_ip.per_second=0",
                "guard.connections_per_ip.per_second=0",
                "session.lanes=8",
                "autonat.only_global_ips=false",
            ]),
            ..Default::default()
        },
    );
    let agent = Agent::start(
        &in_far,
        &gw,
        transport,
        &tunnels(&targets),
        true,
        &settings(&[
            "log.level=info",
            &format!("session.data_path={}", a.data_path),
            &format!("session.lanes={}", a.lanes),
        ]),
    );
    let rt = runtime_in(near.ns())?;
    Ok(World {
        rt,
        agent,
        _gw: gw,
        targets,
        lab,
    })
}

fn point(a: &Args, transport: Transport, line: &Path, p: Point) -> anyhow::Result<WanFigures> {
    let w = world(a, transport, line, p, |t| {
        vec![format!("sink=127.0.0.1:{}", t.sink.port())]
    })?;
    let sink_port = w.targets.sink.port();
    let port = w
        .agent
        .wait_leased("sink", Duration::from_secs(60))
        .map_err(anyhow::Error::msg)?;
    crate::wait_lanes(&w.agent, &a.data_path, a.lanes)?;
    // Declared after the world: the other tunnel goes before the lab does.
    let via = match (&a.via[..], &a.via_setup) {
        ([s, _], Some(setup)) => Some((*s, via_setup(setup, &w.lab, sink_port)?)),
        ([s, _], None) => Some((*s, None)),
        _ => None,
    };

    let d = Duration::from_secs_f64(a.seconds);
    let direct_sink: SocketAddr = (w.lab.far().ip(), sink_port).into();
    let tunnel_sink: SocketAddr = ([127, 0, 0, 1], port).into();
    let (mut direct, mut tunnel, mut through) = (vec![], vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("  run {}/{}", run + 1, a.runs);
        direct.push(pair(&w.rt, direct_sink, d)?);
        tunnel.push(pair(&w.rt, tunnel_sink, d)?);
        if let Some((v, _)) = &via {
            through.push(pair(&w.rt, *v, d)?);
        }
    }
    let med = |v: &[[f64; 2]], i: usize| crate::report::median(v.iter().map(|x| x[i]).collect());
    let both = |v: &[[f64; 2]]| [med(v, 0), med(v, 1)];
    Ok(WanFigures {
        point: p,
        direct: both(&direct),
        tunnel: both(&tunnel),
        via: via.map(|_| both(&through)),
    })
}

/// 1 stream, then 8, through `sink`.
fn pair(rt: &tokio::runtime::Runtime, sink: SocketAddr, d: Duration) -> anyhow::Result<[f64; 2]> {
    Ok([
        spawned(rt, throughput(sink, 1, d))?,
        spawned(rt, throughput(sink, 8, d))?,
    ])
}

/// Runs `f` on `rt`'s workers (which live in the lab's near namespace), not
/// on this thread.
pub(crate) fn spawned<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    rt.block_on(rt.spawn(f))?
}

/// A runtime whose worker threads enter network namespace `ns`: the load
/// generator's sockets are made there, while this process stays where it
/// can start the lab's other processes.
fn runtime_in(ns: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    // Owned by the thread-start hook, so it stays open as long as threads
    // can start: the blocking pool starts its threads when first needed.
    let file = File::open(format!("/run/netns/{ns}"))?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns(2) on the namespace file this closure owns; it
            // changes only the calling thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                eprintln!(
                    "setns into the lab failed: {}",
                    std::io::Error::last_os_error()
                );
                std::process::abort();
            }
        })
        .build()?;
    Ok(rt)
}

/// The delay line beside this binary (cargo builds it with the package's bins).
fn delay_line() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let line = me.with_file_name("delay-line");
    anyhow::ensure!(
        line.exists(),
        "{} is missing: the WAN figures need it; build it with `cargo build {}-p relaygate-tests --bins`",
        line.display(),
        if cfg!(debug_assertions) {
            ""
        } else {
            "--release "
        }
    );
    Ok(line)
}

/// Starts another tunnel in the lab: `setup` runs under `sh -c` with the
/// lab's namespaces and addresses in its environment, and keeps running
/// (its process group is killed when the point is done).
fn via_setup(setup: &str, lab: &WanLab, sink_port: u16) -> anyhow::Result<Option<Group>> {
    let mut cmd = Command::new("sh");
    // A group of its own: whatever it starts goes with it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(["-c", setup])
        .env("RELAYGATE_NEAR_NS", lab.near().ns())
        .env("RELAYGATE_FAR_NS", lab.far().ns())
        .env("RELAYGATE_NEAR_IP", lab.near().ip().to_string())
        .env("RELAYGATE_FAR_IP", lab.far().ip().to_string())
        .env("RELAYGATE_SINK", format!("127.0.0.1:{sink_port}"));
    let p = Proc::spawn("via", cmd);
    // Give it a moment to listen; its own output says more.
    std::thread::sleep(Duration::from_secs(3));
    Ok(Some(Group(p)))
}

/// A process and everything it started, killed together.
struct Group(Proc);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe {
            libc::kill(-(self.0.pid() as i32), libc::SIGKILL);
        }
    }
}
