//! Bulk TCP transfers across a lab path with the delay line's own `sink` and
//! `send` modes (tests/src/bin/delay-line.rs): a sink that answers every
//! connection with the byte count it read, and a sender that reports its rate.

use std::{path::Path, time::Duration};

use serde_json::Value;

use super::Host;
use crate::procs::Proc;

/// `delay-line sink` in `host`, listening on `listen` (`[::]:5201`).
pub fn sink(delay_line: &Path, host: &Host, listen: &str) -> Proc {
    let mut cmd = host.cmd(delay_line);
    cmd.args(["sink", "--listen", listen]);
    let p = Proc::spawn("sink", cmd);
    p.wait_for(
        |l| l.contains(r#""event":"listening""#),
        Duration::from_secs(10),
    )
    .expect("sink listens");
    p
}

/// `delay-line send` of `bytes` from `host` to `to`; its `sent` report
/// (`gbit_s`, `secs`, `connect_ms`). Panics if the transfer fails.
pub fn send(delay_line: &Path, host: &Host, to: &str, bytes: u64, timeout_secs: u64) -> Value {
    let out = host
        .cmd(delay_line)
        .args(["send", "--to", to, "--bytes", &bytes.to_string()])
        .args(["--timeout-secs", &timeout_secs.to_string()])
        .output()
        .expect("run delay-line send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "send to {to} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "sent")
        .unwrap_or_else(|| panic!("no sent report in {stdout:?}"))
}
