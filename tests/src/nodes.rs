//! Plain libp2p nodes for tests: a rust-libp2p `lab-node` listening on
//! loopback, and the js-libp2p harness in tests/js (installed by `npm ci`).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::procs::Proc;

/// `lab-node listen` on 127.0.0.1:`port` with the identity of `seed`
/// (`lab_node`: the caller's `env!("CARGO_BIN_EXE_lab-node")`), once up.
pub fn rust_node(lab_node: &str, seed: u8, port: u16) -> Proc {
    let mut cmd = Command::new(lab_node);
    cmd.args([
        "listen",
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{port}"),
        "--seed",
        &seed.to_string(),
    ]);
    let p = Proc::spawn("node", cmd);
    p.wait_for(|l| l.contains("\"listening\""), Duration::from_secs(20))
        .expect("node up");
    p
}

/// The js harness's directory.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// The js harness's script.
pub fn interop() -> PathBuf {
    js_dir().join("interop.mjs")
}

/// True when node and the harness's packages are installed. Otherwise prints
/// a loud skip line, and under `CI=true` fails: CI must run the test.
pub fn js_ready(test: &str) -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let modules = js_dir().join("node_modules").join("libp2p").exists();
    if node && modules {
        return true;
    }
    let msg = format!(
        "!!! SKIPPED {test}: needs node and `npm ci --prefix tests/js` (node: {node}, packages: {modules}) !!!"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true, and a skipped test must fail CI)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}
