//! Load tooling: raise the open-files limit, read a process's resident
//! memory, CPU time and descriptors from /proc, and many held connections
//! through a leased port.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Raises this process's open-files limit (soft and, as root, hard) to at
/// least `want`, so it and the children it starts can hold that many.
/// Returns the limit now in force, or why it cannot be had.
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        if lim.rlim_cur >= want {
            return Ok(lim.rlim_cur);
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Ok(want);
        }
        // Not root: the soft limit can still go up to the hard one.
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        if lim.rlim_max >= want {
            return Ok(lim.rlim_max);
        }
        Err(format!(
            "open-files hard limit is {} and raising it to {want} needs root",
            lim.rlim_max
        ))
    }
}

/// True when the open-files limit could be raised to `want`. Otherwise
/// prints a loud skip line and returns false; under `CI=true` it panics, so
/// a skip fails CI.
pub fn require_nofile(want: u64, test: &str) -> bool {
    match raise_nofile(want) {
        Ok(_) => true,
        Err(why) => {
            let msg = format!("!!! SKIPPED {test}: {why} (run as root) !!!");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg} (CI=true, and a skipped test must fail CI)");
            }
            use std::io::Write;
            let _ = writeln!(io::stderr(), "{msg}");
            false
        }
    }
}

/// What a process holds, read from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    pub rss_kib: u64,
    /// User plus system CPU time since it started.
    pub cpu_secs: f64,
    pub fds: usize,
}

impl ProcStats {
    pub fn of(pid: u32) -> io::Result<ProcStats> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which may hold spaces: ") S ppid ...".
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_secs = (ticks(11) + ticks(12)) as f64 / hz;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        Ok(ProcStats {
            rss_kib,
            cpu_secs,
            fds,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "RSS {:.1} MiB, CPU {:.1} s, {} fds",
            self.rss_kib as f64 / 1024.0,
            self.cpu_secs,
            self.fds
        )
    }
}

/// One byte there and back: proves the connection reaches the target.
pub async fn ping(s: &mut TcpStream, byte: u8) -> io::Result<()> {
    s.write_all(&[byte]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut b))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo within 30 s"))??;
    if b[0] != byte {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong echo"));
    }
    Ok(())
}

/// Opens `n` connections to `addr`, `parallel` at a time, each proven by a
/// ping, and returns them all open.
pub async fn open_many(addr: SocketAddr, n: usize, parallel: usize) -> io::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut started = 0;
    while held.len() < n {
        while started < n && set.len() < parallel {
            started += 1;
            set.spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                ping(&mut s, b'o').await?;
                Ok::<_, io::Error>(s)
            });
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => held.push(s),
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => break,
        }
    }
    Ok(held)
}

/// Pings every held connection once more, `parallel` at a time; returns
/// how many answered.
pub async fn ping_all(held: Vec<TcpStream>, parallel: usize) -> (usize, Vec<TcpStream>) {
    let mut set = JoinSet::new();
    let mut ok = 0;
    let mut back = Vec::with_capacity(held.len());
    let mut it = held.into_iter();
    loop {
        while set.len() < parallel {
            let Some(mut s) = it.next() else { break };
            set.spawn(async move {
                let r = ping(&mut s, b'a').await;
                (r.is_ok(), s)
            });
        }
        match set.join_next().await {
            Some(Ok((good, s))) => {
                ok += usize::from(good);
                back.push(s);
            }
            Some(Err(_)) => {}
            None => break,
        }
    }
    (ok, back)
}

/// A target that floods every connection whose first byte is `F` and
/// echoes every other one.
pub async fn flood_or_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                if first[0] == b'F' {
                    let chunk = vec![0x46u8; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                } else {
                    let _ = s.write_all(&first).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    addr
}

/// `n` round trips of 1 KiB on fresh connections to `host:port`, each within a
/// second; returns their times, sorted.
pub async fn round_trips(host: &str, port: u16, first: u8, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = std::time::Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(1), async {
            let mut s = TcpStream::connect((host, port)).await?;
            s.set_nodelay(true)?;
            let mut msg = vec![first];
            msg.extend((0..1023).map(|k| ((i + k) % 251) as u8));
            s.write_all(&msg).await?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await?;
            assert_eq!(back, msg, "round trip {i} came back changed");
            Ok::<_, std::io::Error>(())
        })
        .await;
        match done {
            Ok(Ok(())) => times.push(started.elapsed()),
            Ok(Err(e)) => panic!("round trip {i} through port {port} failed: {e}"),
            Err(_) => panic!("round trip {i} through port {port} took over a second"),
        }
    }
    times.sort();
    times
}
