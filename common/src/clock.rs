//! Wall-clock times as the admin API and etcd records carry them: whole
//! seconds since the Unix epoch (0 for a clock set before it).

use std::time::SystemTime;

/// `t` in seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}
