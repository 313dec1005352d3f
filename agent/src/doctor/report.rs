//! What a doctor run found: a verdict per check (`Check`), the whole run
//! (`DoctorReport`, what the console shows), how the CLI prints it as it
//! goes, and how it reaches the running agent.

use std::net::SocketAddr;

use relaygate_common::admin::AdminConfig;
use serde::{Deserialize, Serialize};

/// One check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked, in a word or two (`session`, `lease`, `gateway`,
    /// `dial-back`, `advertise`, ...).
    pub name: String,
    pub ok: bool,
    /// What was found; for a failure, followed by `; fix: ` and what to do.
    pub detail: String,
}

/// A whole run: every check, and the verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// When the run ended, in seconds since the UNIX epoch.
    pub ran_at: u64,
    /// Whether every check passed.
    pub healthy: bool,
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// Most checks a report handed over may hold (a fleet of many gateways
    /// and tunnels stays far below).
    pub const MAX_CHECKS: usize = 1000;
    /// Longest name or detail a report handed over may hold.
    pub const MAX_TEXT: usize = 16 * 1024;

    /// Why a report handed over is refused (`None`: it is kept). The agent
    /// sends the last one to every console page each second.
    pub fn refusal(&self) -> Option<String> {
        if self.checks.len() > Self::MAX_CHECKS {
            return Some(format!(
                "{} checks, at most {} are kept",
                self.checks.len(),
                Self::MAX_CHECKS
            ));
        }
        self.checks
            .iter()
            .find(|c| c.name.len() > Self::MAX_TEXT || c.detail.len() > Self::MAX_TEXT)
            .map(|c| {
                format!(
                    "check {:.40}... is longer than {} bytes",
                    c.name,
                    Self::MAX_TEXT
                )
            })
    }
}

/// Collects the verdicts; the CLI also prints each as it comes.
pub(super) struct Report {
    checks: Vec<Check>,
    print: bool,
}

impl Report {
    pub(super) fn new(print: bool) -> Self {
        Report {
            checks: Vec::new(),
            print,
        }
    }
    pub(super) fn ok(&mut self, name: &str, what: &str) {
        if self.print {
            println!("[ ok ] {what}");
        }
        self.checks.push(Check {
            name: name.into(),
            ok: true,
            detail: what.into(),
        });
    }
    pub(super) fn fail(&mut self, name: &str, what: &str, fix: &str) {
        if self.print {
            println!("[FAIL] {what}\n       fix: {fix}");
        }
        self.checks.push(Check {
            name: name.into(),
            ok: false,
            detail: format!("{what}; fix: {fix}"),
        });
    }
    pub(super) fn finish(self) -> DoctorReport {
        DoctorReport {
            ran_at: relaygate_common::clock::unix_now(),
            healthy: self.checks.iter().all(|c| c.ok),
            checks: self.checks,
        }
    }
}

/// Hands `report` to the running agent (`PUT /v1/doctor` on its admin API,
/// with the configured token), so its console shows this run as the last.
pub(super) fn hand_over(
    listen: SocketAddr,
    admin: &AdminConfig,
    report: &DoctorReport,
) -> Result<(), String> {
    let body = serde_json::to_string(report).map_err(|e| e.to_string())?;
    // The binaries' shared admin client: the token, and TLS when the admin API speaks it.
    let (status, _) =
        relaygate_common::admin::request_json(listen, admin, "PUT", "/v1/doctor", Some(&body))?;
    match status {
        200..=299 => Ok(()),
        0 => Err(format!("admin API at {listen} gave no answer")),
        code => Err(format!(
            "admin API at {listen} answered HTTP {code} (an agent from before PUT /v1/doctor?)"
        )),
    }
}
