//! Real relaygate processes for end-to-end tests and benchmarks: a gateway,
//! agents and an echo target, each on its own free ports and temp dir.
//! A `Launch` decides where a process runs (here, or inside a lab namespace).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::procs::{free_tcp_port, free_tcp_range, free_udp_port, workspace_bin, Proc};

/// Builds the command that runs a binary (directly, or through `ip netns exec`).
pub type Launch<'a> = &'a dyn Fn(&Path) -> Command;

pub fn here(bin: &Path) -> Command {
    Command::new(bin)
}

/// Which session transport an agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
}

pub struct GatewaySpec {
    /// Address libp2p and leased ports bind to.
    pub bind: String,
    /// Host others use to reach it (`127.0.0.1`, or the lab address).
    pub public_ip: String,
    pub port_range: Option<String>,
    pub extra: Vec<String>,
    /// Data dir to use instead of a fresh temporary one.
    pub data_dir: Option<PathBuf>,
    /// Host part to advertise (e.g. `/dns4/127.0.0.1`), with the gateway's
    /// own ports; by default `public_ip`'s, when it differs from `bind`.
    pub advertise_host: Option<String>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1".into(),
            public_ip: "127.0.0.1".into(),
            port_range: None,
            extra: Vec::new(),
            data_dir: None,
            advertise_host: None,
        }
    }
}

pub struct Gateway {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub tcp: u16,
    pub quic: u16,
    pub admin: SocketAddr,
    pub peer_id: String,
    pub token: String,
    pub public_ip: String,
    args: Vec<String>,
}

impl Gateway {
    pub fn start(launch: Launch, spec: GatewaySpec) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = spec
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().to_path_buf());
        let (tcp, quic, admin_port) = (free_tcp_port(), free_udp_port(), free_tcp_port());
        let range = spec.port_range.clone().unwrap_or_else(|| {
            let p = free_tcp_range(10);
            format!("{p}-{}", p + 9)
        });
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}")
            .parse()
            .expect("admin addr");
        let mut args = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("/ip4/{}/tcp/{tcp}", spec.bind),
            "--listen".into(),
            format!("/ip4/{}/udp/{quic}/quic-v1", spec.bind),
            "--admin-listen".into(),
            admin.to_string(),
            "--port-range".into(),
            range,
            "--set".into(),
            format!("leases.bind={}", spec.bind),
            // Its own channel port: tests run several gateways at once.
            "--set".into(),
            format!("udp.listen={}:{}", spec.bind, free_udp_port()),
            "--log-level".into(),
            "info,relaygate_gateway=debug".into(),
        ];
        let advertise = spec
            .advertise_host
            .clone()
            .or_else(|| (spec.public_ip != spec.bind).then(|| format!("/ip4/{}", spec.public_ip)));
        if let Some(host) = advertise {
            args.push("--advertise".into());
            args.push(format!("{host}/tcp/{tcp}"));
            args.push("--advertise".into());
            args.push(format!("{host}/udp/{quic}/quic-v1"));
        }
        args.extend(spec.extra.iter().cloned());
        let mut gw = Gateway {
            proc: spawn_gateway(launch, &args),
            dir,
            tcp,
            quic,
            admin,
            peer_id: String::new(),
            token: String::new(),
            public_ip: spec.public_ip,
            args,
        };
        gw.await_up();
        gw.token = std::fs::read_to_string(data_dir.join("join-token"))
            .unwrap_or_default()
            .trim()
            .to_string();
        gw
    }

    fn await_up(&mut self) {
        self.proc
            .wait_for(|l| l.contains(" is up"), Duration::from_secs(20))
            .expect("gateway did not come up");
        let line = self
            .proc
            .wait_for(
                |l| l.trim_start().starts_with("peer id"),
                Duration::from_secs(5),
            )
            .expect("peer id line");
        self.peer_id = line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
    }

    /// Kills the gateway with SIGKILL and starts it again on the same dir and ports.
    pub fn crash_and_restart(&mut self, launch: Launch) {
        self.proc.kill_hard();
        self.proc = spawn_gateway(launch, &self.args);
        self.await_up();
    }

    pub fn addr(&self, t: Transport) -> String {
        match t {
            Transport::Quic => format!(
                "/ip4/{}/udp/{}/quic-v1/p2p/{}",
                self.public_ip, self.quic, self.peer_id
            ),
            Transport::Tcp => format!(
                "/ip4/{}/tcp/{}/p2p/{}",
                self.public_ip, self.tcp, self.peer_id
            ),
        }
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").1
    }
}

fn spawn_gateway(launch: Launch, args: &[String]) -> Proc {
    let mut cmd = launch(&workspace_bin("relaygate-gateway"));
    cmd.args(args);
    Proc::spawn("gateway", cmd)
}

pub struct Agent {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    /// Its command line (without the binary), and the join token it was given.
    args: Vec<std::ffi::OsString>,
    token: Option<String>,
}

impl Agent {
    /// Starts an agent with `tunnels` (`name=host:port[@port]`), presenting the join token when `token`.
    pub fn start(
        launch: Launch,
        gw: &Gateway,
        t: Transport,
        tunnels: &[String],
        token: bool,
        extra: &[String],
    ) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(launch, gw, t, tunnels, token, extra, dir)
    }

    /// Same, reusing an existing data dir (same identity).
    pub fn start_in(
        launch: Launch,
        gw: &Gateway,
        t: Transport,
        tunnels: &[String],
        token: bool,
        extra: &[String],
        dir: tempfile::TempDir,
    ) -> Agent {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
            .parse()
            .expect("admin addr");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--data-dir".into(),
            dir.path().into(),
            "--gateway".into(),
            gw.addr(t).into(),
            "--admin-listen".into(),
            admin.to_string().into(),
            "--set".into(),
            "reconnect.max=2s".into(),
            "--log-level".into(),
            "info,relaygate_agent=debug".into(),
        ];
        for tun in tunnels {
            args.push("--tunnel".into());
            args.push(tun.into());
        }
        args.extend(extra.iter().map(Into::into));
        let token = token.then(|| gw.token.clone());
        let mut cmd = launch(&workspace_bin("relaygate-agent"));
        cmd.args(&args);
        if let Some(t) = &token {
            cmd.env("RELAYGATE_GATEWAY__TOKEN", t);
        }
        Agent {
            proc: Proc::spawn("agent", cmd),
            dir,
            admin,
            args,
            token,
        }
    }

    /// Runs `relaygate-agent` with this agent's own command line and
    /// `subcommand` (e.g. `doctor`: same data dir, gateway, admin API and
    /// tunnels) until it exits: (success, every line it wrote). Panics
    /// after `timeout`.
    pub fn run_cli(
        &self,
        launch: Launch,
        subcommand: &[&str],
        timeout: Duration,
    ) -> (bool, String) {
        let mut cmd = launch(&workspace_bin("relaygate-agent"));
        cmd.args(&self.args).args(subcommand);
        if let Some(t) = &self.token {
            cmd.env("RELAYGATE_GATEWAY__TOKEN", t);
        }
        let label = format!("agent {}", subcommand.join(" "));
        let mut p = Proc::spawn(&label, cmd);
        let st = p
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("{label} did not finish within {timeout:?}"));
        (st.success(), p.lines().join("\n"))
    }

    /// Waits for the log line announcing tunnel `name`'s lease; returns the port.
    pub fn wait_leased(&self, name: &str, timeout: Duration) -> Result<u16, String> {
        let needle = format!("tunnel={name} ");
        let line = self.proc.wait_for(
            |l| l.contains("tunnel leased") && l.contains(&needle),
            timeout,
        )?;
        leased_port(&line).ok_or_else(|| format!("no port in {line}"))
    }

    /// Waits until a lease line appears after `skip` earlier ones (for reconnects).
    pub fn wait_leased_again(
        &self,
        name: &str,
        seen: usize,
        timeout: Duration,
    ) -> Result<u16, String> {
        let needle = format!("tunnel={name} ");
        let deadline = Instant::now() + timeout;
        loop {
            let lines: Vec<String> = self
                .proc
                .lines()
                .into_iter()
                .filter(|l| l.contains("tunnel leased") && l.contains(&needle))
                .collect();
            if lines.len() > seen {
                return leased_port(&lines[seen]).ok_or_else(|| "no port".into());
            }
            if Instant::now() > deadline {
                return Err(format!("no new lease for {name} after {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn lease_count(&self, name: &str) -> usize {
        let needle = format!("tunnel={name} ");
        self.proc
            .lines()
            .iter()
            .filter(|l| l.contains("tunnel leased") && l.contains(&needle))
            .count()
    }
}

fn leased_port(line: &str) -> Option<u16> {
    // strip ANSI colour codes before looking for `port=`
    let plain = strip_ansi(line);
    plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A thread-per-connection echo server that records who connected.
pub struct Echo {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    pub fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = l.local_addr().expect("echo addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (p, a) = (peers.clone(), accepted.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                if let Ok(peer) = c.peer_addr() {
                    p.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                }
                thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Echo {
            addr,
            peers,
            accepted,
        }
    }

    pub fn tunnel(&self, name: &str) -> String {
        format!("{name}={}", self.addr)
    }
}

/// A connection to `127.0.0.1:port` from `from`, a loopback address of the
/// test's choosing (`127.0.0.3`): a source a ban or a share can tell apart.
pub fn connect_from(from: &str, port: u16) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("{from}:0").parse().map_err(std::io::Error::other)?;
    sock.bind(&local.into())?;
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    sock.connect(&to.into())?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// One echo round trip on an open connection: whether `what` came back.
pub fn echoes(s: &mut TcpStream, what: &[u8]) -> bool {
    if s.write_all(what).is_err() {
        return false;
    }
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).is_ok() && back == what
}

/// Sends `data`, half-closes, and reads everything back.
pub fn round_trip(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut writer = s.try_clone()?;
    let payload = data.to_vec();
    let w = thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    w.join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    Ok(out)
}

/// GET against an admin API without a token: (status, body), or (0, "") when it
/// cannot be reached. The binaries' own client, so tests speak to it as `health` does.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    relaygate_common::admin::get(addr, &relaygate_common::admin::AdminConfig::default(), path)
        .unwrap_or((0, String::new()))
}

/// A request with a body against an admin API without a token (the
/// binaries' own client only does GET): (status, body), or (0, "").
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

/// GET with the response's headers: (status, headers with lower-case names,
/// body), or (0, [], "") when it cannot be reached.
pub fn http_get_headers(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, Vec::new(), String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, Vec::new(), String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// Server-sent events from `path`: `(event, data)` of each frame (comments
/// skipped), read until `want` frames came or `timeout` passed.
pub fn sse_frames(
    addr: SocketAddr,
    path: &str,
    want: usize,
    timeout: Duration,
) -> Vec<(String, String)> {
    let mut frames = Vec::new();
    let Ok(mut s) = TcpStream::connect(addr) else {
        return frames;
    };
    // HTTP/1.0: the stream comes unchunked, and ends when the server closes.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return frames;
    }
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut parsed = 0; // bytes of `buf` already parsed
    while frames.len() < want && Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        let Some(start) = find(&buf, b"\r\n\r\n").map(|i| i + 4) else {
            continue;
        };
        parsed = parsed.max(start);
        while let Some(end) = find(&buf[parsed..], b"\n\n") {
            let frame = String::from_utf8_lossy(&buf[parsed..parsed + end]).into_owned();
            parsed += end + 2;
            let mut event = String::from("message");
            let mut data: Vec<&str> = Vec::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !data.is_empty() {
                frames.push((event, data.join("\n")));
            }
        }
    }
    frames
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one sample of a metric (`name{labels} value`) from a Prometheus text body.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sum of every sample of a metric family whose line starts with `prefix`.
pub fn metric_sum(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// `--set key=value` arguments for each setting.
pub fn settings(kv: &[&str]) -> Vec<String> {
    kv.iter()
        .flat_map(|kv| ["--set".to_string(), kv.to_string()])
        .collect()
}

/// The peer id of the agent identity in `dir` (created if missing).
pub fn agent_peer_id(dir: &Path) -> String {
    let out = std::process::Command::new(workspace_bin("relaygate-agent"))
        .arg("--data-dir")
        .arg(dir)
        .arg("peer-id")
        .output()
        .expect("relaygate-agent peer-id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The peer id of `lab-node --seed N`.
pub fn seed_peer_id(seed: u8) -> String {
    libp2p::identity::Keypair::ed25519_from_bytes([seed; 32])
        .expect("seed key")
        .public()
        .to_peer_id()
        .to_string()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Where the test binaries live (for tools run inside namespaces).
pub fn bin_dir() -> PathBuf {
    workspace_bin("relaygate-gateway")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
