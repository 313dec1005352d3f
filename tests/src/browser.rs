//! A real browser for the console tests: Debian's chromium, headless, driven
//! by `tests/js/ui.mjs` (playwright-core) one JSON command per line. Tests
//! ask what an operator would see: text in an element, an attribute, a
//! click, and how long the page took to show it.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::{json, Value};

use crate::nodes::js_dir;

/// Chromium's path (`CHROMIUM` overrides).
pub fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// True when node, playwright-core and chromium are installed. Otherwise
/// prints a loud skip line, and under `CI=true` fails: CI must run the test.
pub fn browser_ready(test: &str) -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let modules = js_dir()
        .join("node_modules")
        .join("playwright-core")
        .exists();
    let chromium = std::path::Path::new(&chromium()).exists();
    if node && modules && chromium {
        return true;
    }
    let msg = format!(
        "!!! SKIPPED {test}: needs node, `npm ci --prefix tests/js` and chromium (node: {node}, packages: {modules}, chromium: {chromium}) !!!"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true, and a skipped test must fail CI)");
    }
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

/// One headless browser with one page at a time.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<Value>,
}

/// How long a reply may take beyond the command's own timeout.
const SLACK: Duration = Duration::from_secs(20);

impl Browser {
    pub fn start() -> Browser {
        let mut child = Command::new("node")
            .arg(js_dir().join("ui.mjs"))
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node ui.mjs");
        let stdin = child.stdin.take().expect("driver stdin");
        let stdout: ChildStdout = child.stdout.take().expect("driver stdout");
        let (tx, replies) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[browser] {line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let b = Browser {
            child,
            stdin,
            replies,
        };
        let ready = b
            .replies
            .recv_timeout(Duration::from_secs(60))
            .expect("browser did not start");
        assert_eq!(ready["ready"], json!(true), "{ready}");
        b
    }

    /// Sends one command and returns its reply; panics on a failed one.
    pub fn cmd(&mut self, cmd: Value) -> Value {
        let r = self.try_cmd(cmd.clone());
        assert_eq!(r["ok"], json!(true), "browser command {cmd} failed: {r}");
        r
    }

    /// Sends one command and returns its reply, failed or not.
    pub fn try_cmd(&mut self, cmd: Value) -> Value {
        let timeout = cmd["timeout_ms"].as_u64().unwrap_or(5000);
        writeln!(self.stdin, "{cmd}").expect("write to the browser driver");
        self.stdin.flush().expect("flush");
        self.replies
            .recv_timeout(Duration::from_millis(timeout) + SLACK)
            .unwrap_or_else(|_| panic!("no reply from the browser to {cmd}"))
    }

    pub fn open(&mut self, url: &str, token: Option<&str>, width: u32) {
        self.cmd(json!({"op": "open", "url": url, "token": token,
            "viewport": {"width": width, "height": 800}, "timeout_ms": 15000}));
    }

    /// Waits until an element matching `selector` contains `text`; the
    /// milliseconds it took.
    pub fn wait_text(&mut self, selector: &str, text: &str, timeout: Duration) -> u64 {
        let r = self.cmd(
            json!({"op": "wait_text", "selector": selector, "text": text,
            "timeout_ms": timeout.as_millis() as u64}),
        );
        r["elapsed_ms"].as_u64().unwrap_or(0)
    }

    pub fn wait(&mut self, selector: &str, timeout: Duration) -> u64 {
        let r = self.cmd(
            json!({"op": "wait", "selector": selector, "timeout_ms": timeout.as_millis() as u64}),
        );
        r["elapsed_ms"].as_u64().unwrap_or(0)
    }

    pub fn wait_gone(&mut self, selector: &str, timeout: Duration) {
        self.cmd(json!({"op": "wait_gone", "selector": selector,
            "timeout_ms": timeout.as_millis() as u64}));
    }

    pub fn text(&mut self, selector: &str) -> String {
        let r = self.cmd(json!({"op": "text", "selector": selector}));
        r["text"].as_str().unwrap_or_default().to_string()
    }

    pub fn texts(&mut self, selector: &str) -> Vec<String> {
        let r = self.cmd(json!({"op": "texts", "selector": selector}));
        r["texts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn attr(&mut self, selector: &str, name: &str) -> Option<String> {
        let r = self.cmd(json!({"op": "attr", "selector": selector, "name": name}));
        r["value"].as_str().map(String::from)
    }

    pub fn count(&mut self, selector: &str) -> u64 {
        let r = self.cmd(json!({"op": "count", "selector": selector}));
        r["count"].as_u64().unwrap_or(0)
    }

    pub fn click(&mut self, selector: &str) {
        self.cmd(json!({"op": "click", "selector": selector}));
    }

    pub fn fill(&mut self, selector: &str, value: &str) {
        self.cmd(json!({"op": "fill", "selector": selector, "value": value}));
    }

    /// Whether the page is wider than its viewport (a phone must not scroll sideways).
    pub fn overflows(&mut self) -> bool {
        self.cmd(json!({"op": "overflow"}))["overflow"]
            .as_bool()
            .unwrap_or(true)
    }

    /// Console errors and failed requests of the page so far.
    pub fn errors(&mut self) -> Vec<String> {
        let r = self.cmd(json!({"op": "errors"}));
        r["errors"]
            .as_array()
            .map(|a| a.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default()
    }

    pub fn screenshot(&mut self, path: &str) {
        self.cmd(json!({"op": "screenshot", "path": path}));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // SIGTERM lets the driver close chromium; then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
