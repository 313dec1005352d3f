//! delay-line: a userspace WAN between two tun devices, for the WAN lab
//! (tests/src/netlab/wan.rs). This kernel has neither the netem qdisc nor
//! NFQUEUE, so delay and loss are made here: every packet read from one tun
//! device is written into the other one `--delay` later (unless `--loss`
//! drops it), in both directions, so the round trip gains twice the delay.
//!
//!   delay-line --tun-a tunA --tun-b tunB --delay 25ms [--loss 0.01] [--seed 1]
//!              [--queue-bytes 67108864] [--mtu 9000] [--txqueuelen 10000]
//!   delay-line sink --listen 203.0.113.1:5201
//!   delay-line send --to 203.0.113.1:5201 --bytes 200000000
//!
//! The line creates both tun devices itself (TUNSETIFF, IFF_TUN | IFF_NO_PI),
//! sets their MTU and queue length and brings them up, in the network
//! namespace it runs in (`ip netns exec <router> delay-line ...`); they vanish
//! when it exits. Once both move packets it prints `{"event":"ready",...}`.
//! Per direction one thread reads packets and stamps their due time, another
//! sleeps until the oldest is due and writes it: a constant delay keeps the
//! queue in due order. At most `--queue-bytes` wait per direction; beyond
//! that packets are dropped, as a router's full queue drops them.
//!
//! `sink` and `send` are a plain TCP bulk transfer to measure a lab path with:
//! `send` connects (reporting how long the handshake took), writes `--bytes`,
//! half-closes and waits for the sink's count of what arrived, then prints
//! one JSON line with the rate; `sink` answers every connection that way and
//! reports it (with the rate over the second half of the bytes, which on a
//! long path is past TCP's slow start).

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    about = "A userspace delay line between two tun devices, and a TCP bulk sender/sink",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    line: LineArgs,
}

#[derive(Args)]
struct LineArgs {
    /// First tun device (created here).
    #[arg(long, default_value = "tunA")]
    tun_a: String,
    /// Second tun device (created here).
    #[arg(long, default_value = "tunB")]
    tun_b: String,
    /// One-way delay, applied in each direction: "25ms", "0.5s", "800us".
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Probability of dropping a packet, in each direction (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the loss decisions (the same seed drops the same packet numbers).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Most packet bytes waiting in one direction; more are dropped.
    #[arg(long, default_value_t = 64 << 20)]
    queue_bytes: usize,
    /// MTU of both tun devices.
    #[arg(long, default_value_t = 9000)]
    mtu: i32,
    /// Packets the kernel queues towards this process per device before it drops.
    #[arg(long, default_value_t = 10_000)]
    txqueuelen: i32,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept TCP connections; read each to its end, answer with the byte count (8 bytes, big endian).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect, send `bytes`, half-close, wait for the sink's count; print the rate.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Sink { listen }) => sink(listen),
        Some(Cmd::Send {
            to,
            bytes,
            timeout_secs,
        }) => send(to, bytes, Duration::from_secs(timeout_secs)),
        None => delay_line(&cli.line),
    }
}

fn emit(v: serde_json::Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- the line

/// Counters of one direction, printed while they change.
#[derive(Default)]
struct Stats {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    overflow: AtomicU64,
    write_errors: AtomicU64,
    /// Bytes waiting now.
    queued: AtomicUsize,
    /// Most bytes that ever waited at once.
    queued_max: AtomicUsize,
}

impl Stats {
    fn snapshot(&self) -> [u64; 6] {
        [
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.overflow.load(Ordering::Relaxed),
            self.write_errors.load(Ordering::Relaxed),
            self.queued_max.load(Ordering::Relaxed) as u64,
        ]
    }
}

fn delay_line(args: &LineArgs) -> anyhow::Result<()> {
    let Some(delay) = args.delay else {
        bail!("--delay is required (e.g. --delay 25ms)");
    };
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss must be within 0.0..=1.0, not {}", args.loss);
    }
    let a = Arc::new(open_tun(&args.tun_a, args.mtu, args.txqueuelen)?);
    let b = Arc::new(open_tun(&args.tun_b, args.mtu, args.txqueuelen)?);
    let ab = Arc::new(Stats::default());
    let ba = Arc::new(Stats::default());
    let lanes = [
        (&a, &b, &ab, "a_to_b", args.seed),
        (&b, &a, &ba, "b_to_a", args.seed ^ 0x9e37_79b9_7f4a_7c15),
    ];
    for (from, to, stats, name, seed) in lanes {
        let (tx, rx) = mpsc::channel::<(Instant, Box<[u8]>)>();
        let (from, to, s) = (from.clone(), to.clone(), stats.clone());
        let (loss, cap) = (args.loss, args.queue_bytes);
        thread::Builder::new()
            .name(format!("{name}-read"))
            .spawn(move || read_side(&from, &tx, delay, loss, seed, cap, &s))?;
        let s = stats.clone();
        thread::Builder::new()
            .name(format!("{name}-write"))
            .spawn(move || write_side(&to, &rx, &s))?;
    }
    emit(json!({
        "event": "ready",
        "tun_a": args.tun_a,
        "tun_b": args.tun_b,
        "delay_us": delay.as_micros() as u64,
        "loss": args.loss,
        "queue_bytes": args.queue_bytes,
    }));
    // Report the counters once a second while traffic moves.
    let mut last = ([0u64; 6], [0u64; 6]);
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = (ab.snapshot(), ba.snapshot());
        if now != last {
            let fields = |s: [u64; 6]| {
                json!({"packets": s[0], "bytes": s[1], "lost": s[2], "overflow": s[3],
                       "write_errors": s[4], "queued_max": s[5]})
            };
            emit(json!({"event": "stats", "a_to_b": fields(now.0), "b_to_a": fields(now.1)}));
            last = now;
        }
    }
}

/// Reads packets from `from` until it fails, stamps them due `delay` from
/// now and hands them to the writer; drops by `loss` and beyond `cap` bytes.
fn read_side(
    from: &File,
    tx: &mpsc::Sender<(Instant, Box<[u8]>)>,
    delay: Duration,
    loss: f64,
    seed: u64,
    cap: usize,
    stats: &Stats,
) {
    let mut rng = SplitMix64(seed);
    // Drop when a uniform u64 falls below this (loss 1.0 drops all).
    let threshold = (loss * u64::MAX as f64) as u64;
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match (&*from).read(&mut buf) {
            Ok(n) if n > 0 => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The device is gone: a line that carries one direction only
            // would just confuse, so stop altogether.
            other => {
                eprintln!("delay-line: reading a tun device failed ({other:?}); exiting");
                std::process::exit(1);
            }
        };
        let due = Instant::now() + delay;
        if loss > 0.0 && rng.next() < threshold {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let queued = stats.queued.fetch_add(n, Ordering::Relaxed) + n;
        if queued > cap {
            stats.queued.fetch_sub(n, Ordering::Relaxed);
            stats.overflow.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stats.queued_max.fetch_max(queued, Ordering::Relaxed);
        if tx.send((due, buf[..n].into())).is_err() {
            return; // the writer is gone
        }
    }
}

/// Writes each packet into `to` once it is due.
fn write_side(to: &File, rx: &mpsc::Receiver<(Instant, Box<[u8]>)>, stats: &Stats) {
    for (due, packet) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        match (&*to).write(&packet) {
            Ok(_) => {
                stats.packets.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            // A packet the kernel refuses (malformed, device down) is lost, like on a wire.
            Err(_) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        stats.queued.fetch_sub(packet.len(), Ordering::Relaxed);
    }
}

/// A tun device `name` (IFF_TUN | IFF_NO_PI: bare IP packets) owned by this
/// process, with `mtu` and `txqueuelen` set and up.
fn open_tun(name: &str, mtu: i32, txqueuelen: i32) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("open /dev/net/tun (needs root, and the tun module)")?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    // Interface settings go through any socket of the namespace.
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error()).context("socket for interface ioctls");
    }
    // SAFETY: `sock` is a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    let set = |request: libc::c_ulong, what: &str, req: &mut libc::ifreq| -> anyhow::Result<()> {
        // SAFETY: these SIOC* requests read and write one ifreq, alive across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error()).context(format!("{what} on {name}"));
        }
        Ok(())
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = mtu;
    set(libc::SIOCSIFMTU, "set MTU", &mut req)?;
    let mut req = ifreq(name)?;
    // ifr_qlen shares the union slot with ifr_mtu (both ints).
    req.ifr_ifru.ifru_mtu = txqueuelen;
    set(libc::SIOCSIFTXQLEN, "set txqueuelen", &mut req)?;
    let mut req = ifreq(name)?;
    set(libc::SIOCGIFFLAGS, "get flags", &mut req)?;
    // SAFETY: SIOCGIFFLAGS just filled the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    set(libc::SIOCSIFFLAGS, "bring up", &mut req)?;
    Ok(file)
}

/// A zeroed ifreq naming `name`.
fn ifreq(name: &str) -> anyhow::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        bail!("bad interface name {name:?}");
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Small, seedable and good enough to decide drops.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// "25ms", "1.5s", "800us", "0".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, ""), |i| s.split_at(i));
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: want a number and ms, s or us"))?;
    let secs = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "us" => value / 1e6,
        "" if value == 0.0 => 0.0,
        _ => return Err(format!("{s:?}: unit must be s, ms or us")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

// ------------------------------------------------------------ bulk TCP

const CHUNK: usize = 1 << 20;
/// The sink notes the time every this many bytes.
const MARK_STEP: u64 = 10_000_000;

fn sink(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
    emit(json!({"event": "listening", "addr": listener.local_addr()?.to_string()}));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        thread::spawn(move || drain(conn));
    }
    Ok(())
}

/// Reads `conn` to its end, answers with the count and reports it, with the
/// rate over the second half of the bytes (past slow start on a long path).
fn drain(mut conn: TcpStream) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    // (bytes so far, time) at the first read past every MARK_STEP bytes.
    let mut marks: Vec<(u64, Duration)> = Vec::new();
    let result = loop {
        match conn.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                total += n as u64;
                if total >= (marks.len() as u64 + 1) * MARK_STEP {
                    marks.push((total, start.elapsed()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let elapsed = start.elapsed();
    let second_half = marks
        .get(marks.len() / 2)
        .filter(|(bytes, at)| *bytes < total && *at < elapsed)
        .map(|(bytes, at)| (total - bytes) as f64 * 8.0 / (elapsed - *at).as_secs_f64() / 1e9);
    match result.and_then(|()| conn.write_all(&total.to_be_bytes())) {
        Ok(()) => emit(json!({
            "event": "received",
            "peer": peer,
            "bytes": total,
            "secs": elapsed.as_secs_f64(),
            "second_half_gbit_s": second_half,
        })),
        Err(e) => emit(json!({
            "event": "sink_error",
            "peer": peer,
            "bytes": total,
            "error": e.to_string(),
        })),
    }
}

fn send(to: SocketAddr, bytes: u64, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut conn =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect to {to}"))?;
    let connect = start.elapsed();
    conn.set_write_timeout(Some(timeout))?;
    conn.set_read_timeout(Some(timeout))?;
    let buf = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        conn.write_all(&buf[..n]).context("send")?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .context("read the sink's byte count")?;
    // From the first byte sent to the sink's answer: every byte has arrived.
    let secs = (start.elapsed() - connect).as_secs_f64();
    let received = u64::from_be_bytes(count);
    emit(json!({
        "event": "sent",
        "connect_ms": connect.as_secs_f64() * 1e3,
        "bytes": bytes,
        "received": received,
        "secs": secs,
        "gbit_s": bytes as f64 * 8.0 / secs / 1e9,
    }));
    if received != bytes {
        bail!("the sink counted {received} bytes, {bytes} were sent");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("800us"), Ok(Duration::from_micros(800)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("25").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("-1ms").is_err());
    }

    #[test]
    fn loss_rng_is_roughly_uniform() {
        let mut r = SplitMix64(7);
        let threshold = (0.01 * u64::MAX as f64) as u64;
        let drops = (0..100_000).filter(|_| r.next() < threshold).count();
        assert!((800..1200).contains(&drops), "{drops} of 100000 at 1%");
    }
}
