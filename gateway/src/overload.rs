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

/// Resident set size of this process, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The cgroup v2 memory limit when there is one, else MemTotal.
fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
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
}
