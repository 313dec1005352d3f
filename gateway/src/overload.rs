//! Memory overload protection. Above `limits.max_memory` resident, the
//! gateway takes no new work (libp2p connections, leased-port connections,
//! reservations, circuits) until it is back under 90% of it; what is open
//! keeps running. Per connection, the session windows bound what one peer can
//! make the gateway buffer; this bounds the sum.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Share of the limit to fall under before new work is taken again.
const RESUME_AT: f64 = 0.9;

pub struct Overload {
    limit: u64,
    on: AtomicBool,
}

impl Overload {
    /// `configured` bytes, or when zero three quarters of what this process
    /// may use (its cgroup's memory.max, else the machine's memory).
    pub fn new(configured: u64) -> Self {
        let limit = if configured > 0 {
            configured
        } else {
            available_memory().map_or(0, |m| m / 4 * 3)
        };
        Self {
            limit,
            on: AtomicBool::new(false),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Takes a new reading; returns the new state when it changed.
    pub fn update(&self, resident: u64) -> Option<bool> {
        if self.limit == 0 {
            return None;
        }
        let was = self.is_on();
        let now = if was {
            (resident as f64) >= (self.limit as f64) * RESUME_AT
        } else {
            resident >= self.limit
        };
        (now != was).then(|| {
            self.on.store(now, Ordering::Relaxed);
            now
        })
    }

    /// Samples this process's resident memory every `every`.
    pub async fn watch(&self, every: Duration, gauge: prometheus_client::metrics::gauge::Gauge) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(rss) = resident_bytes() else {
                continue;
            };
            match self.update(rss) {
                Some(true) => tracing::warn!(
                    resident_mib = rss >> 20,
                    limit_mib = self.limit >> 20,
                    "memory over limits.max_memory: refusing new connections, circuits and reservations until it falls"
                ),
                Some(false) => tracing::info!(resident_mib = rss >> 20, "memory back under its limit; taking new connections"),
                None => {}
            }
            gauge.set(i64::from(self.is_on()));
        }
    }
}

/// Resident set size of this process, from /proc/self/statm (in pages of
/// this machine's size: 4 KiB on x86, often 16 or 64 KiB on arm64).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The memory limit of this process's cgroup (v2 or v1) when there is one,
/// else MemTotal, whichever is smaller.
fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_limit(std::path::Path::new("/sys/fs/cgroup"), &own));
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

/// The tightest memory limit among this process's cgroup and the root of
/// the cgroup tree as mounted (what a container sees), for v2 (`memory.max`,
/// `max` when unlimited) and v1 (`memory/memory.limit_in_bytes`, a huge
/// number when unlimited). `own` is the text of /proc/self/cgroup.
fn cgroup_limit(root: &std::path::Path, own: &str) -> Option<u64> {
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let mut candidates = vec![
        read(root.join("memory.max")),
        read(root.join("memory/memory.limit_in_bytes")),
    ];
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(read(root.join(path).join("memory.max")));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(read(
                root.join("memory").join(path).join("memory.limit_in_bytes"),
            ));
        }
    }
    candidates.into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_above_the_limit_and_resumes_below_ninety_percent() {
        let o = Overload::new(1000);
        assert_eq!(o.update(999), None);
        assert_eq!(o.update(1000), Some(true));
        assert!(o.is_on());
        assert_eq!(o.update(950), None, "still above 90%");
        assert_eq!(o.update(899), Some(false));
        assert!(!o.is_on());
    }

    #[test]
    fn a_default_limit_comes_from_the_machine() {
        let o = Overload::new(0);
        assert!(o.limit() > 0, "MemTotal is readable on Linux");
        assert!(resident_bytes().is_some_and(|r| r > 0));
    }

    #[test]
    fn cgroup_limits_v2_and_v1_own_group_or_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2, nested group with a limit, root unlimited.
        std::fs::create_dir_all(r.join("kubepods/pod1")).unwrap();
        std::fs::write(r.join("memory.max"), "max\n").unwrap();
        std::fs::write(r.join("kubepods/pod1/memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_limit(r, "0::/kubepods/pod1\n"), Some(512 << 20));
        // v1, limit on the own group; the unlimited root is a huge number.
        std::fs::create_dir_all(r.join("memory/docker/abc")).unwrap();
        std::fs::write(
            r.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(
            r.join("memory/docker/abc/memory.limit_in_bytes"),
            "268435456\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_limit(r, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"),
            Some(256 << 20)
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_limit(empty.path(), "0::/\n"), None);
        assert!(page_size() >= 4096);
    }
}
