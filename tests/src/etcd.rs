//! A real etcd (Debian's `etcd-server`) for tests: its own data directory and
//! free loopback ports, killed and removed on every exit path (drop).

use std::{path::PathBuf, time::Duration};

use crate::{
    procs::{free_tcp_port, Proc},
    stack::Launch,
};

pub struct Etcd {
    pub proc: Proc,
    /// The address it listens on (loopback, or a lab host's).
    ip: String,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    name: String,
    /// `--initial-cluster`: every member's name and peer URL.
    cluster: String,
}

/// Where `etcd` is, or None (the caller prints a loud SKIPPED line).
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_at(&crate::stack::here, "127.0.0.1")
    }

    /// One member listening on `ip`, started through `launch` (inside a
    /// lab host's namespace, say).
    pub fn start_at(launch: Launch, ip: &str) -> Etcd {
        let dir = tempfile::tempdir().expect("etcd dir");
        let (client_port, peer_port) = (free_tcp_port(), free_tcp_port());
        let cluster = format!("t=http://{ip}:{peer_port}");
        let proc = spawn(launch, ip, &dir, "t", client_port, peer_port, &cluster);
        proc.wait_for(
            |l| l.contains("ready to serve client requests"),
            Duration::from_secs(20),
        )
        .expect("etcd up");
        Etcd {
            proc,
            ip: ip.into(),
            dir,
            client_port,
            peer_port,
            name: "t".into(),
            cluster,
        }
    }

    /// A cluster of `n` members on loopback, each with its own data dir.
    pub fn cluster(n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_tcp_port(), free_tcp_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                let dir = tempfile::tempdir().expect("etcd dir");
                let name = format!("m{i}");
                let proc = spawn(
                    &crate::stack::here,
                    "127.0.0.1",
                    &dir,
                    &name,
                    *c,
                    *p,
                    &cluster,
                );
                Etcd {
                    proc,
                    ip: "127.0.0.1".into(),
                    dir,
                    client_port: *c,
                    peer_port: *p,
                    name,
                    cluster: cluster.clone(),
                }
            })
            .collect();
        for m in &members {
            m.proc
                .wait_for(
                    |l| l.contains("ready to serve client requests"),
                    Duration::from_secs(30),
                )
                .expect("etcd member up");
        }
        members
    }

    /// `<ip>:<port>`, what `store.etcd.endpoints` takes.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.client_port)
    }

    /// SIGKILL: gone at once, as a crashed member.
    pub fn kill(&mut self) {
        self.proc.kill_hard();
    }

    /// Starts it again on the same data and ports.
    pub fn restart(&mut self) {
        self.proc.kill_hard();
        self.proc = spawn(
            &crate::stack::here,
            &self.ip,
            &self.dir,
            &self.name,
            self.client_port,
            self.peer_port,
            &self.cluster,
        );
        self.proc
            .wait_for(
                |l| l.contains("ready to serve client requests"),
                Duration::from_secs(20),
            )
            .expect("etcd up again");
    }
}

fn spawn(
    launch: Launch,
    ip: &str,
    dir: &tempfile::TempDir,
    name: &str,
    client: u16,
    peer: u16,
    cluster: &str,
) -> Proc {
    let bin = binary().expect("etcd installed (apt-get install etcd-server)");
    let mut cmd = launch(&bin);
    let (c, p) = (
        format!("http://{ip}:{client}"),
        format!("http://{ip}:{peer}"),
    );
    cmd.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", cluster])
        .env("ETCD_UNSUPPORTED_ARCH", "arm64");
    Proc::spawn(name, cmd)
}

/// True when etcd is installed. Otherwise prints a loud skip line and
/// returns false; under `CI=true` it panics, so a skip fails CI.
pub fn require_etcd(test: &str) -> bool {
    if binary().is_some() {
        return true;
    }
    let msg = format!("!!! SKIPPED {test}: needs etcd (apt-get install etcd-server) !!!");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true, and a skipped test must fail CI)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}
