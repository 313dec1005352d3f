//! The WAN lab: two hosts a real internet apart, in network namespaces.
//!
//! ```text
//!   near 198.51.100.1          router                          far 203.0.113.1
//!     eth0 ------------------ near 198.51.100.254               203.0.113.254 far ---------- eth0
//!                               | iif near -> table 100 -> tunA     ^
//!                               |   delay-line: tunA -> +delay -> tunB -> main table
//!                               | iif far  -> table 101 -> tunB     |
//!                               |   delay-line: tunB -> +delay -> tunA -> main table
//! ```
//!
//! Why userspace: this kernel has no netem qdisc and no NFQUEUE, so nothing in
//! the kernel can hold packets back for a while. Policy routing in the router
//! namespace sends everything the near veth brings into tun device `tunA` and
//! everything the far veth brings into `tunB`; the `delay-line` binary
//! (tests/src/bin/delay-line.rs) reads each packet from one tun device and
//! writes it into the other `delay` later (or drops it with probability
//! `loss`), and a packet written into a tun device arrives as if received on
//! it and takes the main table to the other veth. Each direction is delayed
//! once: RTT = 2 * delay. IPv4 and IPv6 (2001:db8:100::/64, 2001:db8:113::/64)
//! both go through it.
//!
//! The path is jumbo (MTU 9000) with GRO/GSO/TSO off on every veth, so the
//! delay line sees wire-sized packets, not 64 KiB aggregates, and the hosts'
//! TCP buffers may grow to `WanPath::tcp_buffer_max`: a new namespace copies
//! the host's net.ipv4.tcp_wmem, whose usual max of 4 MiB holds one
//! connection to about 0.45 Gbit/s at 50 ms RTT. Measured here (2 CPUs, debug
//! build) with the defaults, one direct TCP connection: about 5 Gbit/s at
//! 50 ms RTT, 2.3 Gbit/s at 150 ms (there the 64 MiB buffers bound it).
//!
//! What it owns: the namespaces come from a [`Lab`] (its id, marker and
//! cleanup, also of stale labs), and the delay line runs inside the router
//! namespace as a child process. Dropping the `WanLab` kills the delay line
//! (its tun devices vanish with it), then the `Lab` deletes the namespaces.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use super::{cmd, Host, Lab, HOST_IFACE};
use crate::procs::Proc;

/// The router's veth towards the near host, and towards the far one.
const NEAR_IFACE: &str = "near";
const FAR_IFACE: &str = "far";
/// The delay line's tun devices: what the near side sends enters `tunA`.
const TUN_A: &str = "tunA";
const TUN_B: &str = "tunB";
/// Jumbo frames on the whole path.
const WAN_MTU: u32 = 9000;

const NEAR_TABLE: u32 = 100;
const FAR_TABLE: u32 = 101;

/// What the path between near and far does to packets.
#[derive(Clone, Debug)]
pub struct WanPath {
    /// One-way delay, applied once in each direction: RTT = 2 * delay.
    pub delay: Duration,
    /// Probability of dropping a packet, in each direction (0.0..=1.0).
    pub loss: f64,
    /// Seed of the loss decisions.
    pub seed: u64,
    /// Most bytes the delay line holds per direction; beyond it packets are
    /// dropped, like a router's full queue.
    pub queue_bytes: usize,
    /// The max of net.ipv4.tcp_rmem and tcp_wmem in both hosts (`None`: what
    /// a new namespace copies from the host). Bandwidth * RTT must fit, with
    /// room for the kernel's overhead: 64 MiB held one connection to about
    /// 2.3 Gbit/s at 150 ms RTT; 256 MiB (and `queue_bytes` 256 MiB) to more
    /// than 4 Gbit/s.
    pub tcp_buffer_max: Option<usize>,
}

impl Default for WanPath {
    /// 25 ms each way (50 ms RTT), no loss, 64 MiB queues and TCP buffers.
    fn default() -> Self {
        WanPath {
            delay: Duration::from_millis(25),
            loss: 0.0,
            seed: 1,
            queue_bytes: 64 << 20,
            tcp_buffer_max: Some(64 << 20),
        }
    }
}

impl WanPath {
    /// `delay` each way, everything else default.
    pub fn one_way(delay: Duration) -> WanPath {
        WanPath {
            delay,
            ..WanPath::default()
        }
    }

    /// `rtt` round trip (half of it each way).
    pub fn rtt(rtt: Duration) -> WanPath {
        WanPath::one_way(rtt / 2)
    }

    pub fn with_loss(self, loss: f64) -> WanPath {
        WanPath { loss, ..self }
    }
}

/// Two hosts with a delaying, lossy router between them; owns its namespaces
/// and the delay line.
pub struct WanLab {
    // Declared first so that it is also dropped first (after `Drop::drop`
    // has stopped it already): nothing may run in a namespace being deleted.
    line: Proc,
    near: Host,
    far: Host,
    router: Host,
    path: WanPath,
    lab: Lab,
}

impl WanLab {
    /// Builds the lab with the `delay-line` binary found next to the running
    /// test (`target/<profile>/delay-line`, which cargo builds for the tests
    /// package's integration tests) or at `$RELAYGATE_DELAY_LINE`.
    pub fn new(tag: &str, path: WanPath) -> io::Result<WanLab> {
        WanLab::with_binary(tag, path, &delay_line_bin()?)
    }

    /// Builds the lab running `delay_line` (e.g. `env!("CARGO_BIN_EXE_delay-line")`).
    pub fn with_binary(tag: &str, path: WanPath, delay_line: &Path) -> io::Result<WanLab> {
        if !(0.0..=1.0).contains(&path.loss) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loss {} is not a probability", path.loss),
            ));
        }
        if !cmd::have("ethtool") {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the WAN lab needs ethtool (apt-get install ethtool)",
            ));
        }
        let lab = Lab::empty(tag)?;
        // From here on a failure drops `lab`, which removes what was made.
        let router_ns = lab.add_ns(
            "router",
            &["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"],
        )?;
        let near_ns = lab.add_ns("near", &[])?;
        let far_ns = lab.add_ns("far", &[])?;
        let near = Host {
            name: "near".into(),
            ns: near_ns,
            ip: Ipv4Addr::new(198, 51, 100, 1),
            ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
            iface: HOST_IFACE,
        };
        let far = Host {
            name: "far".into(),
            ns: far_ns,
            ip: Ipv4Addr::new(203, 0, 113, 1),
            ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 1),
            iface: HOST_IFACE,
        };
        let router = Host {
            name: "router".into(),
            ns: router_ns,
            ip: Ipv4Addr::new(198, 51, 100, 254),
            ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x254),
            iface: NEAR_IFACE,
        };
        let far_gw = (
            Ipv4Addr::new(203, 0, 113, 254),
            Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x254),
        );
        wire(&near, &router, NEAR_IFACE, (router.ip, router.ip6))?;
        wire(&far, &router, FAR_IFACE, far_gw)?;
        if let Some(max) = path.tcp_buffer_max {
            for host in [&near, &far] {
                set_tcp_buffers(host, max)?;
            }
        }

        let mut line = router.cmd(delay_line);
        line.args(["--tun-a", TUN_A, "--tun-b", TUN_B])
            .arg("--delay")
            .arg(format!("{}us", path.delay.as_micros()))
            .arg("--loss")
            .arg(path.loss.to_string())
            .arg("--seed")
            .arg(path.seed.to_string())
            .arg("--queue-bytes")
            .arg(path.queue_bytes.to_string())
            .arg("--mtu")
            .arg(WAN_MTU.to_string());
        let mut line = Proc::spawn(&format!("delay-line {}", lab.id()), line);
        wait_ready(&mut line, Duration::from_secs(10))?;

        // A packet written into a tun device comes in on it, so its source
        // is "wrong" for the interface: no reverse-path filter anywhere.
        cmd::sh_in(
            router.ns(),
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > \"$f\"; done",
        )?;
        // What a veth brings goes into "its" tun device; what comes out of a
        // tun device takes the main table. IPv4 and IPv6 alike.
        let mut batch = String::new();
        for (iface, table, tun) in [
            (NEAR_IFACE, NEAR_TABLE, TUN_A),
            (FAR_IFACE, FAR_TABLE, TUN_B),
        ] {
            batch += &format!(
                "route add default dev {tun} table {table}\n\
                 rule add iif {iface} lookup {table} priority {table}\n"
            );
        }
        for family in ["-4", "-6"] {
            cmd::run(
                "ip",
                ["-n", router.ns(), family, "-batch", "-"],
                Some(&batch),
            )?;
        }
        Ok(WanLab {
            line,
            near,
            far,
            router,
            path,
            lab,
        })
    }

    /// The host on the near side: 198.51.100.1, 2001:db8:100::1.
    pub fn near(&self) -> &Host {
        &self.near
    }

    /// The host on the far side: 203.0.113.1, 2001:db8:113::1.
    pub fn far(&self) -> &Host {
        &self.far
    }

    /// The router namespace running the delay line (its `ip` is the near
    /// host's gateway, 198.51.100.254; the far one's is 203.0.113.254).
    pub fn router(&self) -> &Host {
        &self.router
    }

    pub fn path(&self) -> &WanPath {
        &self.path
    }

    /// The underlying lab id (prefix of every namespace name).
    pub fn id(&self) -> &str {
        self.lab.id()
    }

    /// Lines the delay line printed so far (`ready`, then `stats` each
    /// second while packets move: packets, lost, overflow per direction).
    pub fn line_output(&self) -> Vec<String> {
        self.line.lines()
    }
}

impl Drop for WanLab {
    fn drop(&mut self) {
        // Before the namespaces go (the fields drop after this).
        self.line.kill_hard();
    }
}

/// A veth from `host` (`eth0`) to `router` (`router_iface`), addresses on
/// both ends, the host's default routes via `gw`, jumbo MTU, no offloads.
fn wire(
    host: &Host,
    router: &Host,
    router_iface: &str,
    gw: (Ipv4Addr, Ipv6Addr),
) -> io::Result<()> {
    let (iface, ns) = (host.iface(), host.ns());
    cmd::ip_batch(
        Some(ns),
        &[
            format!(
                "link add {iface} mtu {WAN_MTU} type veth peer name {router_iface} mtu {WAN_MTU} netns {}",
                router.ns()
            ),
            format!("link set {iface} up"),
            format!("addr add {}/24 dev {iface}", host.ip()),
            format!("addr add {}/64 dev {iface} nodad", host.ip6()),
            format!("route add default via {}", gw.0),
            format!("route add ::/0 via {}", gw.1),
        ],
    )?;
    cmd::ip_batch(
        Some(router.ns()),
        &[
            format!("link set {router_iface} up"),
            format!("addr add {}/24 dev {router_iface}", gw.0),
            format!("addr add {}/64 dev {router_iface} nodad", gw.1),
        ],
    )?;
    for (ns, iface) in [(ns, iface), (router.ns(), router_iface)] {
        cmd::run(
            "ip",
            [
                "netns", "exec", ns, "ethtool", "-K", iface, "gro", "off", "gso", "off", "tso",
                "off",
            ],
            None,
        )?;
    }
    Ok(())
}

/// tcp_rmem and tcp_wmem of `host`'s namespace: kernel minimum and default,
/// `max` as the ceiling autotuning may grow a connection's buffer to.
fn set_tcp_buffers(host: &Host, max: usize) -> io::Result<()> {
    cmd::sh_in(
        host.ns(),
        &format!(
            "echo '4096 131072 {max}' > /proc/sys/net/ipv4/tcp_rmem && \
             echo '4096 131072 {max}' > /proc/sys/net/ipv4/tcp_wmem"
        ),
    )
    .map(drop)
}

/// Waits for the delay line's `ready` line; an error (with its output) if it
/// exits or stays silent.
fn wait_ready(line: &mut Proc, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if line
            .lines()
            .iter()
            .any(|l| l.contains(r#""event":"ready""#))
        {
            return Ok(());
        }
        let exited = line.wait_exit(Duration::ZERO);
        if exited.is_some() || Instant::now() > deadline {
            // Let the reader threads catch the last lines.
            thread::sleep(Duration::from_millis(100));
            return Err(io::Error::other(format!(
                "the delay line {}:\n{}",
                exited.map_or(format!("was not ready within {timeout:?}"), |st| {
                    format!("exited ({st}) before it was ready")
                }),
                line.lines().join("\n")
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `$RELAYGATE_DELAY_LINE`, or `delay-line` in the running test's target dir.
fn delay_line_bin() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("RELAYGATE_DELAY_LINE") {
        return Ok(p.into());
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/delay-line
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| io::Error::other("the running executable has no directory"))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("delay-line");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is missing (cargo build -p relaygate-tests --bin delay-line, or set RELAYGATE_DELAY_LINE)",
                bin.display()
            ),
        ))
    }
}
