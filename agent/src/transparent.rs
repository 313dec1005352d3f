//! Transparent delivery's host plumbing: the agent's connection to the node
//! leaves from the remote's real address (IP_TRANSPARENT), marked with
//! SO_MARK. The mark is saved in conntrack and restored on the node's replies,
//! and a policy rule sends marked packets to a table whose only route is
//! `local default dev lo`, so replies come back to the agent and nothing else
//! of the node's traffic (its own dials from its listen port) is touched.
//!
//! With CAP_NET_ADMIN the agent installs this at start (its own nftables
//! table, idempotently) and removes it on exit; without it, an init container
//! runs what `relaygate-agent transparent-rules` prints.

use std::{fmt::Write as _, io::Write as _, process::Command};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransparentConfig {
    /// Firewall mark on the agent's delivery sockets and their conntrack entries.
    pub mark: Mark,
    /// Policy routing table holding `local default dev lo`.
    pub table: RouteTable,
    /// `auto`: install when the agent has CAP_NET_ADMIN, else require them present;
    /// `external`: never install, only check (rules come from an init container).
    pub rules: RulesMode,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            mark: Mark(0x5247),
            table: RouteTable(5247),
            rules: RulesMode::Auto,
        }
    }
}

/// A firewall mark: not 0, which every unmarked packet carries (a rule on
/// mark 0 would send all of the host's traffic to the agent's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Mark(u32);

impl Mark {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Mark {
    type Error = String;
    fn try_from(m: u32) -> Result<Self, String> {
        if m == 0 {
            return Err("transparent.mark must not be 0: every unmarked packet has mark 0; pick an unused mark such as 0x5247".into());
        }
        Ok(Mark(m))
    }
}

impl From<Mark> for u32 {
    fn from(m: Mark) -> u32 {
        m.0
    }
}

impl std::fmt::LowerHex for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A policy routing table the agent may own: not 0 (unspec) nor the
/// kernel's 253 (default), 254 (main) or 255 (local), whose routes its
/// `route flush` would wipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct RouteTable(u32);

impl TryFrom<u32> for RouteTable {
    type Error = String;
    fn try_from(t: u32) -> Result<Self, String> {
        if matches!(t, 0 | 253..=255) {
            return Err(format!("transparent.table {t} is reserved (0 unspec, 253 default, 254 main, 255 local) and its routes would be flushed; pick an unused table such as 5247"));
        }
        Ok(RouteTable(t))
    }
}

impl From<RouteTable> for u32 {
    fn from(t: RouteTable) -> u32 {
        t.0
    }
}

impl std::fmt::Display for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RulesMode {
    Auto,
    External,
}

/// nftables table the agent owns.
pub const NFT_TABLE: &str = "relaygate";

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("transparent delivery needs CAP_NET_ADMIN (or CAP_NET_RAW) for IP_TRANSPARENT sockets: {0}; run the agent with that capability, or use deliver = \"proxy-v2\"")]
    NoCapability(std::io::Error),
    #[error("transparent delivery rules are missing ({0}); run the agent with CAP_NET_ADMIN, or run `relaygate-agent transparent-rules | sh` in an init container that has it")]
    RulesMissing(String),
    #[error("cannot install transparent delivery rules: {0}")]
    Install(String),
    #[error("transparent delivery needs the node's own non-loopback address as target (e.g. the pod IP), not {0}: the kernel drops packets from a public source to a loopback address")]
    LoopbackTarget(String),
    #[error("transparent delivery needs an IP address of this host as target (the pod IP, or the node's address on this machine), not {0}: connections to another host would leave with public clients' source addresses; use deliver = \"proxy-v2\" for a target elsewhere")]
    RemoteTarget(String),
}

/// Shell commands that install the rules (idempotent: old ones are removed first).
pub fn install_script(c: &TransparentConfig) -> String {
    let mut s = String::from("set -e\n");
    s.push_str(&remove_script(c));
    let _ = writeln!(
        s,
        "nft -f - <<'EOF'\ntable inet {NFT_TABLE} {{\n  chain output {{\n    type route hook output priority mangle; policy accept;\n    meta mark {m:#x} ct mark set meta mark\n    ct mark {m:#x} meta mark set ct mark\n  }}\n}}\nEOF",
        m = c.mark
    );
    for fam in ["-4", "-6"] {
        let any = if fam == "-4" { "0.0.0.0/0" } else { "::/0" };
        let _ = writeln!(
            s,
            "ip {fam} rule add fwmark {:#x} lookup {} pref {}",
            c.mark, c.table, c.table
        );
        let _ = writeln!(
            s,
            "ip {fam} route replace local {any} dev lo table {}",
            c.table
        );
    }
    s
}

/// Shell commands that remove everything `install_script` adds; safe to run twice.
pub fn remove_script(c: &TransparentConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "nft delete table inet {NFT_TABLE} 2>/dev/null || true");
    for fam in ["-4", "-6"] {
        let _ = writeln!(
            s,
            "while ip {fam} rule del fwmark {:#x} lookup {} 2>/dev/null; do :; done",
            c.mark, c.table
        );
        let _ = writeln!(
            s,
            "ip {fam} route flush table {} 2>/dev/null || true",
            c.table
        );
    }
    s
}

fn sh(script: &str) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|v| v.trim().to_string())
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Checks that IP_TRANSPARENT sockets can be made here.
pub fn check_socket() -> Result<(), TransparentError> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(TransparentError::NoCapability)?;
    s.set_ip_transparent_v4(true)
        .map_err(TransparentError::NoCapability)
}

/// Checks that the policy rule and the local route exist (readable without privileges).
pub fn check_rules(c: &TransparentConfig) -> Result<(), TransparentError> {
    for fam in ["-4", "-6"] {
        let rules = run(&["ip", fam, "rule", "show"]).map_err(TransparentError::RulesMissing)?;
        let want = format!("fwmark {:#x} lookup {}", c.mark, c.table);
        if !rules.contains(&want) {
            return Err(TransparentError::RulesMissing(format!(
                "no `ip {fam} rule` with {want}"
            )));
        }
        let routes = run(&["ip", fam, "route", "show", "table", &c.table.to_string()])
            .map_err(TransparentError::RulesMissing)?;
        if !routes.contains("local default dev lo") {
            return Err(TransparentError::RulesMissing(format!(
                "no `local default dev lo` in `ip {fam}` table {}",
                c.table
            )));
        }
    }
    Ok(())
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Rules this process installed or found, held through a shared lock on a
/// file named after the namespace, mark and table: agents in one network
/// namespace share one set of rules, and the last one to leave (the one that
/// can take the lock exclusively) removes them.
pub struct InstalledRules {
    cfg: TransparentConfig,
    lock: std::fs::File,
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        // `install` first, as a starting agent takes it: one order, no deadlock,
        // and no agent starting now finds the rules half gone.
        let install = open_lock(&self.cfg, "install").ok();
        if let Some(f) = &install {
            let _ = f.lock();
        }
        if self.lock.try_lock().is_err() {
            tracing::info!(
                "transparent delivery rules left in place: another agent here uses them"
            );
            return;
        }
        match sh(&remove_script(&self.cfg)) {
            Ok(()) => tracing::info!("transparent delivery rules removed"),
            Err(e) => tracing::warn!(error = %e, "could not remove transparent delivery rules"),
        }
    }
}

/// Where agents of this network namespace using `c`'s rules take their lock.
fn lock_path(c: &TransparentConfig) -> std::path::PathBuf {
    let netns = std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            let inode = l.trim_start_matches("net:[").trim_end_matches(']');
            inode.parse::<u64>().ok()
        })
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "relaygate-transparent-{netns}-{:x}-{}",
        c.mark.get(),
        c.table
    ))
}

fn open_lock(c: &TransparentConfig, what: &str) -> Result<std::fs::File, TransparentError> {
    let path = lock_path(c).with_extension(what);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TransparentError::Install(format!("cannot open {}: {e}", path.display())))
}

fn table_present() -> bool {
    run(&["nft", "list", "table", "inet", NFT_TABLE]).is_ok()
}

/// Makes transparent delivery ready: checks the socket option, installs the
/// rules (unless another agent here already did) or checks them.
pub fn prepare(c: &TransparentConfig) -> Result<Option<InstalledRules>, TransparentError> {
    check_socket()?;
    if c.rules == RulesMode::Auto && has_net_admin() {
        let locked = |e: std::io::Error| TransparentError::Install(format!("cannot lock: {e}"));
        // Users hold `users` shared while they run; `install` is held only
        // while looking and installing, so two agents starting at once do
        // not remove each other's half-installed rules.
        let (install, lock) = (open_lock(c, "install")?, open_lock(c, "users")?);
        install.lock().map_err(locked)?;
        lock.lock_shared().map_err(locked)?;
        let present = check_rules(c).is_ok() && table_present();
        if !present {
            sh(&install_script(c)).map_err(TransparentError::Install)?;
        }
        check_rules(c)?;
        drop(install);
        tracing::info!(
            mark = format!("{:#x}", c.mark),
            table = %c.table,
            shared = present,
            "transparent delivery rules installed"
        );
        return Ok(Some(InstalledRules {
            cfg: c.clone(),
            lock,
        }));
    }
    check_rules(c)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_marks_and_tables_are_refused_with_a_fix() {
        let parse = |s: &str| serde_json::from_str::<TransparentConfig>(s);
        for bad in [
            r#"{"mark":0}"#,
            r#"{"table":0}"#,
            r#"{"table":253}"#,
            r#"{"table":254}"#,
            r#"{"table":255}"#,
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("5247"), "{bad}: the error names a fix: {e}");
        }
        let ok = parse(r#"{"mark":1,"table":100}"#).unwrap();
        assert_eq!((ok.mark.get(), ok.table.to_string()), (1, "100".into()));
        assert!(install_script(&TransparentConfig::default()).contains("fwmark 0x5247 lookup 5247"));
    }
}
