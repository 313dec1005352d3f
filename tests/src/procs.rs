//! Child processes for end-to-end tests: the workspace's binaries, spawned
//! with their output captured (and echoed, so a failing test shows its logs),
//! and killed when dropped so no process outlives a test.

use std::{
    io::{BufRead, BufReader},
    net::{TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

/// Path of a binary of another workspace package, built once per test process.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/<test-exe> -> target/<profile>
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "relaygate-gateway",
            "-p",
            "relaygate-agent",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build");
        assert!(
            out.status.success(),
            "building the binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    dir.join(name)
}

/// A running child process with captured output lines.
pub struct Proc {
    label: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Output readers that reached the end of their pipe, of `readers`.
    drained: Arc<std::sync::atomic::AtomicUsize>,
    readers: usize,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let drained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut readers = 0;
        let out = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let (lines, drained, label) = (lines.clone(), drained.clone(), label.to_string());
            readers += 1;
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{label}] {line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
                drained.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
        Proc {
            label: label.to_string(),
            child,
            lines,
            drained,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// First line (stdout or stderr) matching `pred`, waiting up to `timeout`.
    pub fn wait_for(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                let all = self.lines();
                let tail = all[all.len().saturating_sub(40)..].join("\n");
                return Err(format!(
                    "{}: no matching line within {timeout:?}; last lines:\n{tail}",
                    self.label
                ));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status once the process ended, with every line it wrote
    /// collected (up to 2 s more for its pipes to drain: a child of its own
    /// may still hold them), or `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let drain = Instant::now() + Duration::from_secs(2);
                while self.drained.load(std::sync::atomic::Ordering::Acquire) < self.readers
                    && Instant::now() < drain
                {
                    thread::sleep(Duration::from_millis(5));
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Ports tests pick come from here: below the kernel's ephemeral range
/// (32768-60999), so no outgoing connection or port-0 listener of another
/// process can take one between its pick and its use; above the default
/// lease range and the 200-agent test's 21000-21499.
const PICK_FROM: std::ops::Range<u16> = 22_000..32_000;

/// Ports already handed out by this test process.
fn taken() -> &'static Mutex<std::collections::HashSet<u16>> {
    static TAKEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    TAKEN.get_or_init(Default::default)
}

/// `n` consecutive ports, free now for `usable`, never handed out before.
fn pick(n: u16, usable: impl Fn(u16) -> bool) -> u16 {
    use rand::Rng;
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let base = rand::rng().random_range(PICK_FROM.start..PICK_FROM.end - n);
        let ports = base..base + n;
        if ports.clone().all(|p| !taken.contains(&p) && usable(p)) {
            taken.extend(ports);
            return base;
        }
    }
    panic!("no {n} free ports in {PICK_FROM:?}");
}

fn tcp_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("0.0.0.0", p)).is_ok()
}

fn udp_free(p: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("0.0.0.0", p)).is_ok()
}

pub fn free_tcp_port() -> u16 {
    pick(1, tcp_free)
}

pub fn free_udp_port() -> u16 {
    pick(1, udp_free)
}

/// The first of `n` consecutive free TCP ports (a lease range).
pub fn free_tcp_range(n: u16) -> u16 {
    pick(n, tcp_free)
}
