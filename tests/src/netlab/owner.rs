//! Who owns which lab: unique lab ids, claimed with a marker file that names
//! the creating process, and removal of namespaces (own ones on drop, stale
//! ones whose creator died, e.g. a test killed by a timeout).
//!
//! Ids look like `rg4821a`: "rg", the pid modulo 10000 and one base-36 char,
//! so namespace names stay within 15 chars. pid%10000 alone is not unique,
//! hence the marker in /run (tmpfs, so it vanishes with the namespaces on reboot),
//! created with O_EXCL before any namespace exists.

use std::{
    fs, io,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use super::cmd;

const MARKERS: &str = "/run/relaygate-netlab";
const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
pub(crate) const ID_LEN: usize = 7;

/// Claims a fresh lab id for this process.
pub(crate) fn claim_id(tag: &str) -> io::Result<String> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    fs::create_dir_all(MARKERS)?;
    let me = std::process::id();
    for _ in 0..ALPHABET.len() {
        let c = ALPHABET[NEXT.fetch_add(1, Ordering::Relaxed) % ALPHABET.len()] as char;
        let id = format!("rg{:04}{c}", me % 10_000);
        for _ in 0..2 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(marker(&id))
            {
                Ok(f) => {
                    use io::Write;
                    let start = start_time(me).unwrap_or(0);
                    writeln!(&f, "{me} {start} {tag}")?;
                    return Ok(id);
                }
                // Taken by a dead process: clean its leftovers and take the id over.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !owner_alive(&id) => {
                    remove_namespaces(&namespaces_of(&id)?);
                    let _ = fs::remove_file(marker(&id));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => break,
                Err(e) => return Err(e),
            }
        }
    }
    Err(io::Error::other(
        "no free lab id for this process (36 labs alive?)",
    ))
}

/// Forgets a lab id once its namespaces are gone.
pub(crate) fn release(id: &str) {
    let _ = fs::remove_file(marker(id));
}

/// Deletes namespaces of labs whose creator is gone; returns their names.
pub(crate) fn cleanup_stale() -> io::Result<Vec<String>> {
    let stale: Vec<String> = list_namespaces()?
        .into_iter()
        .filter(|ns| lab_id(ns).is_some_and(|id| !owner_alive(id)))
        .collect();
    remove_namespaces(&stale);
    let mut ids: Vec<&str> = stale.iter().filter_map(|ns| lab_id(ns)).collect();
    ids.dedup();
    ids.into_iter().for_each(release);
    // Markers whose labs left no namespace behind.
    for entry in fs::read_dir(MARKERS).into_iter().flatten().flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        if lab_id(&id).is_some() && !owner_alive(&id) {
            release(&id);
        }
    }
    Ok(stale)
}

/// Kills every process inside the namespaces, then deletes them (which also
/// deletes their veths). Best effort: a drop must not panic.
pub(crate) fn remove_namespaces(namespaces: &[String]) {
    for ns in namespaces {
        kill_all_in(ns);
    }
    // A netns outlives `ip netns del` while a process is still inside, so wait
    // for SIGKILL to land before deleting.
    let deadline = Instant::now() + Duration::from_secs(3);
    while namespaces.iter().any(|ns| !pids_in(ns).is_empty()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for ns in namespaces {
        if let Err(e) = cmd::run("ip", ["netns", "del", ns], None) {
            if list_namespaces().is_ok_and(|all| all.contains(ns)) {
                eprintln!("netlab: cannot delete namespace {ns}: {e}");
            }
        }
    }
}

pub(crate) fn list_namespaces() -> io::Result<Vec<String>> {
    // Lines look like "name (id: 3)" or just "name".
    let out = cmd::run("ip", ["netns", "list"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

fn namespaces_of(id: &str) -> io::Result<Vec<String>> {
    Ok(list_namespaces()?
        .into_iter()
        .filter(|ns| lab_id(ns) == Some(id))
        .collect())
}

fn kill_all_in(ns: &str) {
    for pid in pids_in(ns) {
        // SAFETY: kill(2) has no memory effects; the pid came from `ip netns pids`.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn pids_in(ns: &str) -> Vec<i32> {
    cmd::run("ip", ["netns", "pids", ns], None)
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The lab id a namespace name starts with, if it is one of ours.
fn lab_id(ns: &str) -> Option<&str> {
    let id = ns.get(..ID_LEN)?;
    let b = id.as_bytes();
    let ours =
        id.starts_with("rg") && b[2..6].iter().all(u8::is_ascii_digit) && ALPHABET.contains(&b[6]);
    ours.then_some(id)
}

fn marker(id: &str) -> String {
    format!("{MARKERS}/{id}")
}

/// Alive = the marker's pid runs and started when the marker says (pids get reused).
fn owner_alive(id: &str) -> bool {
    let Ok(text) = fs::read_to_string(marker(id)) else {
        return false; // no marker: nobody owns these namespaces
    };
    let mut f = text.split_whitespace();
    let pid = f.next().and_then(|p| p.parse::<u32>().ok());
    let start = f.next().and_then(|s| s.parse::<u64>().ok());
    match (pid, start) {
        (Some(pid), Some(start)) => start_time(pid).is_some_and(|now| start == 0 || now == start),
        // Marker being written right now by its owner: treat as alive.
        _ => true,
    }
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces; fields after its ')' start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_ids_are_recognised() {
        assert_eq!(lab_id("rg0042a1-gateway"), Some("rg0042a"));
        assert_eq!(lab_id("rg0042a"), Some("rg0042a"));
        assert_eq!(lab_id("rgx042a-net"), None);
        assert_eq!(lab_id("cni-1234"), None);
        assert_eq!(lab_id("rg"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id()).is_some());
    }
}
