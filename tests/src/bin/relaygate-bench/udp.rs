//! UDP tunnels (issue #19) beside direct: the targets process's UDP echo
//! (udpkit's), reached straight and through a `proto=udp` tunnel (the leased
//! port's datagrams ride the agent's datagram channel, QUIC datagrams, to the
//! agent and from its socket to the echo). 64-byte round trips, 1200-byte
//! datagrams at a few offered rates, and one QUIC stream of a rust-libp2p
//! node (`lab-node`) behind a UDP tunnel of its own. On loopback, and with
//! `--wan` in the WAN lab at 50 ms RTT (built by `wan::world`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use relaygate_tests::{
    procs::{free_udp_port, Proc},
    stack::{here, seed_peer_id, Agent, Launch, Transport},
    udpkit,
};
use tokio::runtime::Runtime;

use crate::{report::median, wan, Args};

/// Payload of a ping, and of a throughput datagram (a QUIC Initial's size).
const PING: usize = 64;
const DATAGRAM: usize = 1200;
/// Offered rates of the datagram figure, a second (`None`: as fast as the
/// socket takes them; measured after everything else, see [`run`]).
const RATES: [Option<u64>; 3] = [Some(10_000), Some(30_000), None];
/// The WAN lab's round trip, and the rate offered there.
const WAN_RTT: Duration = Duration::from_millis(50);
const WAN_RATE: u64 = 10_000;
/// `lab-node --seed`: the QUIC node's identity.
const SEED: u8 = 7;
/// Where the QUIC node listens in the WAN lab's far host (a fresh namespace).
const WAN_NODE_PORT: u16 = 9905;
const T: Duration = Duration::from_secs(60);

/// What one configuration measures.
#[derive(Clone, Debug)]
pub struct Plan {
    pub pings: usize,
    /// Seconds per offered rate.
    pub secs: f64,
    pub rates: Vec<Option<u64>>,
    /// Bytes the QUIC stream echoes.
    pub quic_bytes: usize,
    pub runs: usize,
}

/// One side's figures, medians over the runs.
#[derive(Clone, Debug, Default)]
pub struct Side {
    pub p50_us: f64,
    pub p99_us: f64,
    /// Pings lost, over all runs.
    pub lost: u64,
    /// Per offered rate: echoed MB/s and loss in percent.
    pub rates: Vec<(f64, f64)>,
    /// The same per run.
    pub raw: Vec<Vec<(f64, f64)>>,
    /// The QUIC stream's echo, MB/s.
    pub quic: Option<f64>,
    /// Runs whose QUIC dial failed.
    pub quic_failed: usize,
}

#[derive(Clone, Debug)]
pub struct UdpFigures {
    pub plan: Plan,
    pub direct: Side,
    pub tunnel: Side,
    /// Why there is no QUIC figure.
    pub quic_skipped: Option<String>,
    /// The same in the WAN lab (`--wan`).
    pub wan: Option<Box<UdpFigures>>,
}

/// One run's figures of one side.
#[derive(Clone, Debug, Default)]
struct Run {
    p50_us: u64,
    p99_us: u64,
    lost: u64,
    rates: Vec<(f64, f64)>,
    quic: Option<f64>,
}

/// A `lab-node listen` on QUIC: the QUIC figure's target.
struct Node {
    proc: Proc,
    bin: PathBuf,
    port: u16,
}

impl Node {
    /// Starts the node at `ip:port` through `launch`; [`Node::ready`] waits for it.
    fn start(launch: Launch, ip: &str, port: u16) -> Result<Node, String> {
        let bin = lab_node()?;
        let mut cmd = launch(&bin);
        cmd.args(["listen", "--listen"])
            .arg(format!("/ip4/{ip}/udp/{port}/quic-v1"))
            .args(["--seed", &SEED.to_string()]);
        Ok(Node {
            proc: Proc::spawn("quic-node", cmd),
            bin,
            port,
        })
    }

    fn ready(&self) -> anyhow::Result<()> {
        self.proc
            .wait_for(|l| l.contains("\"listening\""), T)
            .map(drop)
            .map_err(anyhow::Error::msg)
    }

    /// MB/s of a stream echoing `bytes` from a `lab-node dial` (through
    /// `launch`) to the node at `ip:port`; a failure is logged and counted,
    /// not fatal to a long bench.
    fn echo(&self, launch: Launch, ip: &str, port: u16, bytes: usize) -> Option<f64> {
        let addr = format!("/ip4/{ip}/udp/{port}/quic-v1/p2p/{}", seed_peer_id(SEED));
        let mut cmd = launch(&self.bin);
        cmd.args(["dial", "--addr", &addr, "--pings", "1"])
            .args(["--ping-interval-ms", "100", "--timeout-secs", "120"])
            .args(["--echo-bytes", &bytes.to_string()]);
        let mut p = Proc::spawn("quic-dial", cmd);
        let done = p.wait_exit(Duration::from_secs(150));
        let lines = p.lines();
        let echo = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "echo" && v["same"] == true);
        match (done, echo) {
            (Some(st), Some(v)) if st.success() => {
                let ms = v["ms"].as_u64().unwrap_or(0).max(1);
                Some(bytes as f64 / ms as f64 / 1e3)
            }
            _ => {
                eprintln!("!!! QUIC echo to {addr} failed: {}", lines.join("\n"));
                None
            }
        }
    }
}

/// `lab-node`, beside this binary (cargo builds it with the package's bins),
/// or why not.
fn lab_node() -> Result<PathBuf, String> {
    let bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("lab-node");
    if bin.exists() {
        return Ok(bin);
    }
    Err(format!(
        "{} is not built (`cargo build{} -p relaygate-tests --bins`)",
        bin.display(),
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        }
    ))
}

/// The loopback section's targets, started before the agent whose tunnels
/// lead to them: the targets process's UDP echo, and a QUIC node.
pub struct Targets {
    echo: SocketAddr,
    node: Result<Node, String>,
}

impl Targets {
    /// The QUIC node only without `--quick`: its two dials take seconds.
    pub fn start(echo: SocketAddr, a: &Args) -> Targets {
        let node = if a.quick {
            Err("in --quick (two dials take seconds)".into())
        } else {
            Node::start(&here, "127.0.0.1", free_udp_port())
        };
        Targets { echo, node }
    }

    /// The agent's UDP tunnels: `udp` to the echo, `node` to the QUIC node.
    pub fn tunnels(&self) -> Vec<String> {
        tunnels(self.echo.port(), self.node.as_ref().ok().map(|n| n.port))
    }
}

fn tunnels(echo: u16, node: Option<u16>) -> Vec<String> {
    let mut v = vec![format!("udp=127.0.0.1:{echo},proto=udp")];
    v.extend(node.map(|p| format!("node=127.0.0.1:{p},proto=udp")));
    v
}

impl Plan {
    fn loopback(a: &Args) -> Plan {
        Plan {
            pings: if a.quick { 200 } else { 2000 },
            secs: if a.quick { 0.3 } else { a.seconds },
            rates: if a.quick {
                RATES[..1].to_vec()
            } else {
                RATES.to_vec()
            },
            quic_bytes: 100 << 20,
            runs: a.runs,
        }
    }

    fn wan(a: &Args) -> Plan {
        Plan {
            pings: 200,
            secs: a.seconds,
            rates: vec![Some(WAN_RATE)],
            quic_bytes: 100 << 20,
            runs: a.runs,
        }
    }
}

/// The loopback figures, through the agent's tunnels `udp` and `node`.
pub fn run(rt: &Runtime, a: &Args, agent: &Agent, t: &Targets) -> anyhow::Result<UdpFigures> {
    eprintln!("UDP");
    let plan = Plan::loopback(a);
    let (echo_port, node_port) = leases(agent, t.node.is_ok())?;
    let tunnel: SocketAddr = ([127, 0, 0, 1], echo_port).into();
    let node = t.node.as_ref().ok();
    if let Some(n) = node {
        n.ready()?;
    }
    let quic = |ip: &str, port: u16| node.and_then(|n| n.echo(&here, ip, port, plan.quic_bytes));
    let (mut direct, mut through) = (vec![], vec![]);
    for run in 0..plan.runs {
        eprintln!("  run {}/{}", run + 1, plan.runs);
        let mut d = rt.block_on(datagrams(t.echo, plan.clone(), true))?;
        d.quic = quic("127.0.0.1", node.map_or(0, |n| n.port));
        direct.push(d);
        let mut x = rt.block_on(datagrams(tunnel, plan.clone(), true))?;
        x.quic = quic("127.0.0.1", node_port);
        through.push(x);
    }
    // Unpaced last: overloaded, the channel's sockets drop packets, which
    // quinn may take for a black hole and fall back to its 1200-byte MTU
    // for a minute (`black_hole_cooldown`): no 1200-byte datagram fits the
    // channel then, and QUIC handshakes through the tunnel fail.
    let unpaced = |target| rt.block_on(datagrams(target, plan.clone(), false));
    for (d, x) in direct.iter_mut().zip(&mut through) {
        d.rates.extend(unpaced(t.echo)?.rates);
        x.rates.extend(unpaced(tunnel)?.rates);
    }
    Ok(UdpFigures {
        quic_skipped: t.node.as_ref().err().cloned(),
        direct: medians(&direct),
        tunnel: medians(&through),
        plan,
        wan: None,
    })
}

/// With `--wan`: the figures in the WAN lab at 50 ms RTT, the echo and the
/// QUIC node on the far host with the agent, the load generator and the
/// dialer on the near one with the gateway.
pub fn wan(a: &Args, transport: Transport) -> anyhow::Result<Option<Box<UdpFigures>>> {
    if !a.wan {
        return Ok(None);
    }
    eprintln!("UDP over the WAN: {} ms RTT", WAN_RTT.as_millis());
    let plan = Plan::wan(a);
    let line = wan::prerequisites("relaygate-bench UDP WAN figures")?;
    let p = wan::Point {
        rtt: WAN_RTT,
        loss: 0.0,
    };
    let have_node = lab_node().is_ok();
    let w = wan::world(a, transport, &line, p, |t| {
        tunnels(t.udp.port(), have_node.then_some(WAN_NODE_PORT))
    })?;
    let (near, far) = (w.lab.near().clone(), w.lab.far().clone());
    let (in_near, in_far) = (|b: &Path| near.cmd(b), |b: &Path| far.cmd(b));
    let node = have_node
        .then(|| Node::start(&in_far, "0.0.0.0", WAN_NODE_PORT))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (echo_port, node_port) = leases(&w.agent, node.is_some())?;
    if let Some(n) = &node {
        n.ready()?;
    }
    let far_ip = far.ip().to_string();
    let direct_echo: SocketAddr = (far.ip(), w.targets.udp.port()).into();
    let tunnel: SocketAddr = ([127, 0, 0, 1], echo_port).into();
    let (mut direct, mut through) = (vec![], vec![]);
    for run in 0..plan.runs {
        eprintln!("  run {}/{}", run + 1, plan.runs);
        let mut d = wan::spawned(&w.rt, datagrams(direct_echo, plan.clone(), true))?;
        let mut x = wan::spawned(&w.rt, datagrams(tunnel, plan.clone(), true))?;
        if let Some(n) = &node {
            d.quic = n.echo(&in_near, &far_ip, WAN_NODE_PORT, plan.quic_bytes);
            x.quic = n.echo(&in_near, "127.0.0.1", node_port, plan.quic_bytes);
        }
        direct.push(d);
        through.push(x);
    }
    Ok(Some(Box::new(UdpFigures {
        quic_skipped: lab_node().err(),
        direct: medians(&direct),
        tunnel: medians(&through),
        plan,
        wan: None,
    })))
}

/// The leased ports of tunnels `udp` and (when `node`) `node`, once the
/// agent's datagram channel is up (0 for a missing node).
fn leases(agent: &Agent, node: bool) -> anyhow::Result<(u16, u16)> {
    let lease = |name| agent.wait_leased(name, T).map_err(anyhow::Error::msg);
    let echo = lease("udp")?;
    let node = if node { lease("node")? } else { 0 };
    agent
        .proc
        .wait_for(|l| l.contains("datagram channel up"), T)
        .map_err(anyhow::Error::msg)?;
    Ok((echo, node))
}

/// Against the echo at `target`: with `paced`, the RTT and each paced
/// rate; without, only the unpaced rate (if the plan has it).
async fn datagrams(target: SocketAddr, plan: Plan, paced: bool) -> anyhow::Result<Run> {
    let mut run = Run::default();
    if paced {
        let r = udpkit::rtt(target, plan.pings, PING).await?;
        (run.p50_us, run.p99_us, run.lost) = (r.p50_us, r.p99_us, r.lost);
    }
    for rate in plan.rates.iter().filter(|r| r.is_some() == paced) {
        let t = udpkit::throughput(target, plan.secs, DATAGRAM, *rate).await?;
        run.rates.push((t.mb_per_s, t.loss_pct));
    }
    Ok(run)
}

fn medians(runs: &[Run]) -> Side {
    let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let quic: Vec<f64> = runs.iter().filter_map(|r| r.quic).collect();
    Side {
        p50_us: med(&|r| r.p50_us as f64),
        p99_us: med(&|r| r.p99_us as f64),
        lost: runs.iter().map(|r| r.lost).sum(),
        raw: (0..runs[0].rates.len())
            .map(|i| runs.iter().map(|r| r.rates[i]).collect())
            .collect(),
        rates: (0..runs[0].rates.len())
            .map(|i| (med(&|r| r.rates[i].0), med(&|r| r.rates[i].1)))
            .collect(),
        quic_failed: runs.len() - quic.len(),
        quic: (!quic.is_empty()).then(|| median(quic)),
    }
}

/// The report's UDP section: the loopback table, then the WAN one.
/// `report` with its "## UDP tunnels" section (up to the next `## `)
/// replaced by `section`, or `section` appended when it has none.
pub fn splice(report: &str, section: &str) -> String {
    let head = "\n## UDP tunnels\n";
    let Some(start) = report.find(head) else {
        return format!(
            "{}{section}",
            report.trim_end_matches('\n').to_owned() + "\n"
        );
    };
    let rest = &report[start + head.len()..];
    let end = rest
        .find("\n## ")
        .map_or(report.len(), |e| start + head.len() + e);
    let tail = &report[end..];
    format!(
        "{}{}\n{tail}",
        &report[..start],
        section.trim_end_matches('\n')
    )
}

pub fn section(f: &UdpFigures) -> String {
    let p = &f.plan;
    let mut s = format!(
        "\n## UDP tunnels\n\nA UDP echo (the test kit's udpkit, in the targets process) reached directly and \
         through a `proto=udp` tunnel: datagrams to the gateway's leased port ride the agent's datagram channel \
         (QUIC datagrams, RFC 9221, on a quinn connection of its own) to the agent, whose socket for the flow \
         sends them on; one flow per measurement. Medians of {} run(s).\n\n",
        p.runs
    );
    s.push_str(&table(f, "direct loopback"));
    s.push_str(&format!(
        "\n- RTT: {} pings of {PING} bytes, one at a time (each after the last one's echo; a ping \
         unanswered for 1 s is lost: {} direct, {} through the tunnel, over all runs).\n\
         - Datagrams: {DATAGRAM}-byte payloads sent for {} s at the offered rate (unpaced: as fast as the \
         socket takes them) while another task counts the echoes; MB/s is echoed payload per second, loss the \
         share sent and never echoed (dropped by a full socket buffer, or by the channel). Unpaced offers more \
         than either path carries, on purpose: what gets through an overloaded path.\n",
        p.pings, f.direct.lost, f.tunnel.lost, p.secs
    ));
    s.push_str(&raw(f));
    s.push_str(&quic_note(f));
    if let Some(w) = &f.wan {
        s.push_str(&format!(
            "\n### UDP over a WAN\n\nThe WAN lab at {} ms RTT, no loss: the echo, the QUIC node and the agent on \
             the far host, the gateway, the load generator and the dialer on the near one; direct goes from \
             the near host to the far one over the same path. {} pings; {} s at the offered rate. Medians of {} \
             run(s).\n\n",
            WAN_RTT.as_millis(),
            w.plan.pings,
            w.plan.secs,
            w.plan.runs
        ));
        s.push_str(&table(w, "direct over the path"));
        s.push('\n');
        s.push_str(&raw(w));
        s.push_str(&quic_note(w));
    }
    s
}

fn quic_note(f: &UdpFigures) -> String {
    match &f.quic_skipped {
        Some(why) => format!("- QUIC stream: skipped, {why}.\n"),
        None => format!(
            "- QUIC stream: a rust-libp2p dialer (`lab-node dial --echo-bytes {}`) writes {} MiB on one \
             stream to a `lab-node listen` QUIC node that echoes it, reading as it writes; MB/s is the bytes \
             over the time until the last came back (each byte crossed both ways). Through the tunnel the \
             node's QUIC packets ride the channel's: two congestion controllers nested, two more \
             encryptions, two more processes.{}\n",
            f.plan.quic_bytes,
            f.plan.quic_bytes >> 20,
            match (f.direct.quic_failed, f.tunnel.quic_failed) {
                (0, 0) => String::new(),
                (d, x) => format!(
                    " The dial failed in {d} direct and {x} tunnelled run(s) of {} (the log has why).",
                    f.plan.runs
                ),
            }
        ),
    }
}

/// Each rate's runs, direct | through the tunnel.
fn raw(f: &UdpFigures) -> String {
    let runs = |v: &[(f64, f64)]| {
        v.iter()
            .map(|(mb, loss)| format!("{mb:.1} ({loss:.1}%)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::from("- Datagrams per run, echoed MB/s (loss), direct | through:");
    for (i, rate) in f.plan.rates.iter().enumerate() {
        let offered = rate.map_or("unpaced".into(), |pps| format!("{} k/s", pps / 1000));
        let (d, x) = (&f.direct.raw[i], &f.tunnel.raw[i]);
        s.push_str(&format!(" {offered}: {} | {};", runs(d), runs(x)));
    }
    s.pop();
    s.push_str(".\n");
    s
}

fn table(f: &UdpFigures, direct: &str) -> String {
    let (d, x) = (&f.direct, &f.tunnel);
    let mut s = format!(
        "| figure | {direct} | through gateway+agent | ratio |\n|---|---|---|---|\n\
         | {PING}-byte RTT p50, µs | {:.0} | {:.0} | {:.2}× direct |\n\
         | {PING}-byte RTT p99, µs | {:.0} | {:.0} | {:.2}× direct |\n",
        d.p50_us,
        x.p50_us,
        x.p50_us / d.p50_us,
        d.p99_us,
        x.p99_us,
        x.p99_us / d.p99_us,
    );
    for (i, rate) in f.plan.rates.iter().enumerate() {
        let offered = match rate {
            Some(pps) => format!("{} k/s offered", pps / 1000),
            None => "unpaced".into(),
        };
        let ((dm, dl), (xm, xl)) = (d.rates[i], x.rates[i]);
        s.push_str(&format!(
            "| {DATAGRAM}-byte datagrams, {offered}: echoed MB/s (loss) | {dm:.1} ({dl:.1}%) | {xm:.1} ({xl:.1}%) | {:.0}% of direct |\n",
            xm / dm * 100.0
        ));
    }
    if f.quic_skipped.is_none() {
        let v = |q: Option<f64>| q.map_or("failed".into(), |v| format!("{v:.1}"));
        let ratio = match (d.quic, x.quic) {
            (Some(dq), Some(xq)) => format!("{:.0}% of direct", xq / dq * 100.0),
            _ => String::new(),
        };
        s.push_str(&format!(
            "| QUIC stream echo (rust-libp2p, 1 stream), MB/s | {} | {} | {ratio} |\n",
            v(d.quic),
            v(x.quic)
        ));
    }
    s
}

#[cfg(test)]
mod splice_tests {
    use super::splice;

    #[test]
    fn the_udp_section_is_replaced_in_place_or_appended() {
        let new = "\n## UDP tunnels\n\nnew figures\n";
        let report = "# r\n\n## A\n\na\n\n## UDP tunnels\n\nold\n\n## B\n\nb\n";
        assert_eq!(
            splice(report, new),
            "# r\n\n## A\n\na\n\n## UDP tunnels\n\nnew figures\n\n## B\n\nb\n"
        );
        let last = "# r\n\n## UDP tunnels\n\nold\n";
        assert_eq!(splice(last, new), "# r\n\n## UDP tunnels\n\nnew figures\n");
        assert_eq!(
            splice("# r\n", new),
            "# r\n\n## UDP tunnels\n\nnew figures\n"
        );
    }
}
