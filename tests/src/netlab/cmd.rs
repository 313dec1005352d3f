//! Running the lab's tools (`ip`, `nft`, `tc`, `sh`): every failure becomes an
//! `io::Error` that names the command and carries its stderr, so a broken
//! topology says why instead of failing later as a mysterious timeout.

use std::{
    ffi::OsStr,
    io::{self, Write},
    path::Path,
    process::{Command, Output, Stdio},
};

/// Runs `prog args..`, feeding `stdin` if given; Ok(stdout) on exit status 0.
pub(crate) fn run<I, S>(prog: &str, args: I, stdin: Option<&str>) -> io::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let out = output(&mut cmd, stdin)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin
                .map(|s| format!("\ninput was:\n{s}"))
                .unwrap_or_default(),
        )))
    }
}

/// `ip [-n ns] -batch -`: many iproute2 commands in one process, stopping at
/// the first failure (one spawn instead of a dozen per host).
pub(crate) fn ip_batch(ns: Option<&str>, lines: &[String]) -> io::Result<()> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    run("ip", args, Some(&(lines.join("\n") + "\n"))).map(drop)
}

/// A shell script run inside namespace `ns` (for /proc/sys writes and tc).
pub(crate) fn sh_in(ns: &str, script: &str) -> io::Result<String> {
    run("ip", ["netns", "exec", ns, "sh", "-c", script], None)
}

/// One nftables transaction applied inside namespace `ns`.
pub(crate) fn nft_in(ns: &str, script: &str) -> io::Result<()> {
    run("ip", ["netns", "exec", ns, "nft", "-f", "-"], Some(script)).map(drop)
}

fn output(cmd: &mut Command, stdin: Option<&str>) -> io::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {cmd:?}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}

/// Whether `prog` is an executable on PATH (or in the sbin dirs, which a
/// non-login root shell may lack on PATH).
pub(crate) fn have(prog: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| is_executable(&dir.join(prog)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
