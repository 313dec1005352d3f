//! The NAT lab: real network namespaces wired into a small internet.
//!
//! ```text
//!   internet host (203.0.113.X)     internet host ...
//!          \ eth0                       / eth0
//!           +------ br0 in "<id>0-net" ---------+
//!                                 | wan 203.0.113.(100+i)
//!                           LAN router "<id>N-name" (nftables NAT + firewall)
//!                                 | bridge "lan" 198.18.i.1, fd00:i::1
//!                           LAN hosts 198.18.i.X (eth0, default route via router)
//! ```
//!
//! IPv6 mirrors IPv4: the decimal digits of an octet are reused as hex digits,
//! so 203.0.113.101 is 2001:db8:1::101 and LAN 3 is fd00:3::/64 (NAT66 too).
//! Every name comes from a unique lab id; dropping the `Lab` (also while a test
//! panics) kills what runs inside and deletes every namespace it made.
//!
//! [`WanLab`] (wan.rs) is a second topology on the same namespaces and cleanup:
//! two hosts with a userspace delay line (delay, loss) between them.

pub mod bulk;
mod cmd;
mod owner;
mod router;
mod wan;

pub use wan::{WanLab, WanPath};

use std::{
    ffi::OsStr,
    io::{self, Write},
    net::{Ipv4Addr, Ipv6Addr},
    process::{Command, Output},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
};

/// Interface of a host (internet or LAN side) towards its segment.
pub const HOST_IFACE: &str = "eth0";
/// A LAN router's interface on the internet.
pub const WAN: &str = "wan";
/// A LAN router's bridge that its LAN hosts plug into.
pub const LAN_BRIDGE: &str = "lan";
/// The switch of the internet segment (inside the lab's `-net` namespace).
pub const INTERNET_BRIDGE: &str = "br0";

/// True when the lab can run here. Otherwise prints a loud skip line and
/// returns false; under `CI=true` it panics instead, so a skip fails CI.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if root && cmd::have("ip") && cmd::have("nft") {
        return true;
    }
    let msg = format!("!!! SKIPPED {test}: needs root, ip and nft (run as root) !!!");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true, and a skipped test must fail CI)");
    }
    // Straight to fd 2: libtest captures eprintln! of passing tests, and a
    // skip must be seen.
    let _ = writeln!(io::stderr(), "{msg}");
    false
}

/// How a LAN router maps its hosts' connections to its WAN address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: keeps source ports where it can (endpoint-independent mapping).
    Masquerade,
    /// `masquerade random,fully-random`: a random port per connection (symmetric NAT).
    Symmetric,
}

/// A namespace with one address on the internet or on a LAN.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    iface: &'static str,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace, for `ip netns exec` and `ip -n`.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The interface its traffic leaves by (`eth0`, or `wan` on a router).
    pub fn iface(&self) -> &str {
        self.iface
    }

    /// `program` run inside the namespace. `ip netns exec` execs it, so the
    /// child's pid is the program's own (signals reach it directly).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `f` on a thread that entered the namespace: sockets it makes are
    /// the host's (the admin API of a process running there, say).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                let file = std::fs::File::open(&path).expect("the lab's namespace file");
                // SAFETY: setns(2) on an open namespace file; it changes only
                // this thread's network namespace, and the thread ends with f.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns into {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the closure in the namespace panicked")
        })
    }

    /// `sh -c script` inside the namespace, output captured (status unchecked).
    pub fn sh(&self, script: &str) -> io::Result<Output> {
        self.cmd("sh").args(["-c", script]).output()
    }
}

impl AsRef<Host> for Host {
    fn as_ref(&self) -> &Host {
        self
    }
}

/// A LAN behind a NAT router. `AsRef<Host>` gives the router (e.g. for `rate_limit`).
#[derive(Clone, Debug)]
pub struct Lan {
    index: u8,
    nat: Nat,
    router: Host,
}

impl Lan {
    pub fn name(&self) -> &str {
        self.router.name()
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// The router as a host: its namespace, `wan` iface and WAN addresses.
    pub fn router(&self) -> &Host {
        &self.router
    }

    /// The public address its hosts appear from: 203.0.113.(100+index).
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.router.ip
    }

    pub fn wan_ip6(&self) -> Ipv6Addr {
        self.router.ip6
    }

    /// The router's LAN address, its hosts' default gateway: 198.18.<index>.1.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        lan_v4(self.index, 1)
    }

    pub fn gateway_ip6(&self) -> Ipv6Addr {
        lan_v6(self.index, 1)
    }

    /// Cuts (`true`) or restores (`false`) everything between the LAN and the
    /// internet, established connections included.
    pub fn partition(&self, on: bool) -> io::Result<()> {
        cmd::nft_in(self.router.ns(), &router::partition_ruleset(on))
    }
}

impl AsRef<Host> for Lan {
    fn as_ref(&self) -> &Host {
        &self.router
    }
}

/// One lab topology; owns every namespace it creates.
pub struct Lab {
    id: String,
    net_ns: String,
    namespaces: Mutex<Vec<String>>,
    addresses: Mutex<Vec<Ipv4Addr>>,
    seq: AtomicUsize,
}

impl Lab {
    /// An empty internet (a bridge in its own namespace). `tag` names the
    /// lab in logs and in its marker (/run/relaygate-netlab/<id>).
    pub fn new(tag: &str) -> io::Result<Lab> {
        let mut lab = Lab::empty(tag)?;
        // From here on a failure drops `lab`, which removes what was made.
        lab.net_ns = lab.add_ns("net", &[])?;
        cmd::ip_batch(
            Some(&lab.net_ns),
            &[
                // No STP and no multicast snooping: ports forward at once and
                // IPv6 neighbour discovery is always flooded.
                format!("link add {INTERNET_BRIDGE} type bridge forward_delay 0 mcast_snooping 0"),
                format!("link set {INTERNET_BRIDGE} up"),
            ],
        )?;
        Ok(lab)
    }

    /// A lab id and no namespace yet (no internet either: `internet_ns` is
    /// empty), for topologies of their own such as the WAN lab.
    fn empty(tag: &str) -> io::Result<Lab> {
        // Leftovers of killed test runs, once per process.
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(|| match Lab::cleanup_stale() {
            Ok(gone) if !gone.is_empty() => eprintln!("netlab: removed stale namespaces {gone:?}"),
            Ok(_) => {}
            Err(e) => eprintln!("netlab: stale cleanup failed: {e}"),
        });
        let id = owner::claim_id(tag)?;
        eprintln!("netlab: lab {id} for {tag}");
        Ok(Lab {
            id,
            net_ns: String::new(),
            namespaces: Mutex::default(),
            addresses: Mutex::default(),
            seq: AtomicUsize::new(0),
        })
    }

    /// Deletes namespaces left by labs whose process is gone (a test killed
    /// by a timeout cannot run its drops). Safe at any time; `Lab::new` calls
    /// it once per process. Returns the namespaces removed.
    pub fn cleanup_stale() -> io::Result<Vec<String>> {
        owner::cleanup_stale()
    }

    /// The unique prefix of every namespace of this lab.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Namespaces made so far (the internet's first).
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.namespaces).clone()
    }

    /// The namespace holding the internet bridge.
    pub fn internet_ns(&self) -> &str {
        &self.net_ns
    }

    /// A host on the internet: 203.0.113.<last_octet>/24, 2001:db8:1::<last_octet>/64.
    /// Panics if the lab cannot be built (a test failure anyway).
    pub fn internet_host(&self, name: &str, last_octet: u8) -> Host {
        self.try_internet_host(name, last_octet)
            .unwrap_or_else(|e| panic!("netlab {}: internet host {name}: {e}", self.id))
    }

    /// A router at 203.0.113.(100+index) with LAN 198.18.<index>.0/24 and
    /// fd00:<index>::/64 behind `nat`. Index 0..=154.
    pub fn lan(&self, name: &str, nat: Nat, index: u8) -> Lan {
        self.try_lan(name, nat, index)
            .unwrap_or_else(|e| panic!("netlab {}: lan {name}: {e}", self.id))
    }

    /// A host on `lan`: 198.18.<index>.<last_octet>/24, default route via the router.
    pub fn lan_host(&self, lan: &Lan, name: &str, last_octet: u8) -> Host {
        self.try_lan_host(lan, name, last_octet)
            .unwrap_or_else(|e| panic!("netlab {}: lan host {name}: {e}", self.id))
    }

    /// Limits what leaves `node` (a host, or a LAN's router via its WAN) to
    /// `rate` (`"500kbit"`, `"10mbit"`, `"1gbit"`) with a tbf qdisc. This
    /// kernel has no netem: rates work, delay and loss emulation do not.
    pub fn rate_limit(&self, node: &impl AsRef<Host>, rate: &str) -> io::Result<()> {
        let host = node.as_ref();
        let bits = rate_bits(rate).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("rate {rate:?}: want <n>[k|m|g]bit"),
            )
        })?;
        // 10 ms worth of bytes, but at least two full frames.
        let burst = (bits / 8 / 100).max(3028);
        cmd::run(
            "tc",
            [
                "-n",
                host.ns(),
                "qdisc",
                "replace",
                "dev",
                host.iface(),
                "root",
                "tbf",
            ]
            .into_iter()
            .map(str::to_string)
            .chain(
                [
                    "rate",
                    rate,
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "100ms",
                ]
                .map(str::to_string),
            ),
            None,
        )
        .map(drop)
    }

    /// Removes a `rate_limit` from `node`.
    pub fn clear_rate_limit(&self, node: &impl AsRef<Host>) -> io::Result<()> {
        let host = node.as_ref();
        cmd::run(
            "tc",
            ["-n", host.ns(), "qdisc", "del", "dev", host.iface(), "root"],
            None,
        )
        .map(drop)
    }

    fn try_internet_host(&self, name: &str, last_octet: u8) -> io::Result<Host> {
        let ip = Ipv4Addr::new(203, 0, 113, last_octet);
        self.reserve(ip)?;
        let ns = self.add_ns(name, &[])?;
        self.plug(&ns, HOST_IFACE, &self.net_ns, INTERNET_BRIDGE)?;
        let ip6 = internet_v6(last_octet);
        cmd::ip_batch(Some(&ns), &addresses(HOST_IFACE, ip, ip6))?;
        Ok(Host {
            name: name.into(),
            ns,
            ip,
            ip6,
            iface: HOST_IFACE,
        })
    }

    fn try_lan(&self, name: &str, nat: Nat, index: u8) -> io::Result<Lan> {
        let octet = index.checked_add(100).filter(|o| *o < 255).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "LAN index must be 0..=154")
        })?;
        let ip = Ipv4Addr::new(203, 0, 113, octet);
        self.reserve(ip)?;
        self.reserve(lan_v4(index, 1))?;
        let ns = self.add_ns(
            name,
            &["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"],
        )?;
        self.plug(&ns, WAN, &self.net_ns, INTERNET_BRIDGE)?;
        let ip6 = internet_v6(octet);
        let mut batch = addresses(WAN, ip, ip6);
        batch.push(format!(
            "link add {LAN_BRIDGE} type bridge forward_delay 0 mcast_snooping 0"
        ));
        batch.extend(addresses(LAN_BRIDGE, lan_v4(index, 1), lan_v6(index, 1)));
        cmd::ip_batch(Some(&ns), &batch)?;
        cmd::nft_in(&ns, &router::nat_ruleset(nat))?;
        let router = Host {
            name: name.into(),
            ns,
            ip,
            ip6,
            iface: WAN,
        };
        Ok(Lan { index, nat, router })
    }

    fn try_lan_host(&self, lan: &Lan, name: &str, last_octet: u8) -> io::Result<Host> {
        let (ip, ip6) = (lan_v4(lan.index, last_octet), lan_v6(lan.index, last_octet));
        self.reserve(ip)?;
        let ns = self.add_ns(name, &[])?;
        self.plug(&ns, HOST_IFACE, lan.router.ns(), LAN_BRIDGE)?;
        let mut batch = addresses(HOST_IFACE, ip, ip6);
        batch.push(format!("route add default via {}", lan.gateway_ip()));
        batch.push(format!("route add ::/0 via {}", lan.gateway_ip6()));
        cmd::ip_batch(Some(&ns), &batch)?;
        Ok(Host {
            name: name.into(),
            ns,
            ip,
            ip6,
            iface: HOST_IFACE,
        })
    }

    /// Creates and registers a namespace, `lo` up, no IPv6 duplicate address
    /// detection (it would keep new addresses unusable for ~1 s), and the
    /// `switches_on` sysctls (paths under /proc/sys) set to 1.
    fn add_ns(&self, name: &str, switches_on: &[&str]) -> io::Result<String> {
        // Concurrent first `ip netns add`s race to mount /run/netns.
        static CREATE: Mutex<()> = Mutex::new(());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ns = ns_name(&self.id, seq, name);
        {
            let _one_at_a_time = lock(&CREATE);
            cmd::run("ip", ["netns", "add", &ns], None)?;
        }
        lock(&self.namespaces).push(ns.clone());
        // /proc/sys/net shows the namespace of the process reading it.
        // br_netfilter (loaded here, and on by default in every new namespace)
        // would run bridged frames through conntrack and the router's chains:
        // switches should just switch.
        let mut script = String::from(
            "ip link set lo up && echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad && \
             for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ ! -e \"$f\" ] || echo 0 > \"$f\"; done",
        );
        for path in switches_on {
            script += &format!(" && echo 1 > /proc/sys/{path}");
        }
        cmd::sh_in(&ns, &script)?;
        Ok(ns)
    }

    /// A veth from `ns` (named `iface`) into `bridge` in `bridge_ns`. Created
    /// directly inside the namespaces, so nothing appears in the host's own.
    fn plug(&self, ns: &str, iface: &str, bridge_ns: &str, bridge: &str) -> io::Result<()> {
        // Port names only need to be unique inside the bridge's namespace.
        let port = format!("p{}", self.seq.fetch_add(1, Ordering::Relaxed));
        cmd::ip_batch(
            Some(ns),
            &[format!(
                "link add {iface} type veth peer name {port} netns {bridge_ns}"
            )],
        )?;
        cmd::ip_batch(
            Some(bridge_ns),
            &[format!("link set {port} master {bridge} up")],
        )
    }

    /// Refuses a second host on one address (a silent ARP fight otherwise)
    /// and the /24's network and broadcast addresses.
    fn reserve(&self, ip: Ipv4Addr) -> io::Result<()> {
        if matches!(ip.octets()[3], 0 | 255) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{ip} is not a host address"),
            ));
        }
        let mut used = lock(&self.addresses);
        if used.contains(&ip) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{ip} is taken in this lab"),
            ));
        }
        used.push(ip);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        owner::remove_namespaces(&lock(&self.namespaces));
        owner::release(&self.id);
    }
}

/// `<id><seq>-<name>`, cut to 15 chars: the id and sequence keep it unique,
/// the name is only a hint for someone reading `ip netns list`.
fn ns_name(id: &str, seq: usize, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut ns = format!("{id}{seq:x}-{clean}");
    ns.truncate(15);
    ns
}

/// Bring `iface` up with both addresses (`nodad`: usable at once).
fn addresses(iface: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Vec<String> {
    vec![
        format!("link set {iface} up"),
        format!("addr add {ip}/24 dev {iface}"),
        format!("addr add {ip6}/64 dev {iface} nodad"),
    ]
}

fn lan_v4(index: u8, octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, index, octet)
}

fn lan_v6(index: u8, octet: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, dec_as_hex(index), 0, 0, 0, 0, 0, dec_as_hex(octet))
}

fn internet_v6(octet: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, dec_as_hex(octet))
}

/// 101 -> 0x101, so IPv6 addresses read like their IPv4 twins.
fn dec_as_hex(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

/// Bits per second of a tc rate like "10mbit".
fn rate_bits(rate: &str) -> Option<u64> {
    let num = rate.to_ascii_lowercase().strip_suffix("bit")?.to_string();
    let (digits, mult) = match num.chars().last()? {
        'k' => (&num[..num.len() - 1], 1_000),
        'm' => (&num[..num.len() - 1], 1_000_000),
        'g' => (&num[..num.len() - 1], 1_000_000_000),
        _ => (&num[..], 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .map(|n| n * mult)
        .filter(|b| *b > 0)
}

/// A poisoned lock still holds valid names; cleanup must go on after a panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits() {
        assert_eq!(ns_name("rg0042a", 3, "gateway"), "rg0042a3-gatewa");
        assert_eq!(ns_name("rg0042a", 0, "net"), "rg0042a0-net");
        assert_eq!(ns_name("rg0042a", 1, "a b"), "rg0042a1-a_b");
    }

    #[test]
    fn v6_twins_read_like_v4() {
        assert_eq!(internet_v6(101).to_string(), "2001:db8:1::101");
        assert_eq!(lan_v6(3, 1).to_string(), "fd00:3::1");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(rate_bits("10mbit"), Some(10_000_000));
        assert_eq!(rate_bits("500kbit"), Some(500_000));
        assert_eq!(rate_bits("1gbit"), Some(1_000_000_000));
        assert_eq!(rate_bits("10mbps"), None);
        assert_eq!(rate_bits("mbit"), None);
    }
}
