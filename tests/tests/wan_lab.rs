//! Self-tests of the WAN lab (tests/src/netlab/wan.rs): the delay line really
//! delays (a TCP handshake takes one round trip), a bulk TCP transfer crosses
//! it (its rate is printed, the floor is only a sanity check), and a lossy
//! path still delivers. Real namespaces and tun devices; they need root and
//! skip loudly without it.

use std::{sync::Mutex, time::Duration};

use relaygate_tests::{
    netlab::{bulk, require_root, Host, WanLab, WanPath},
    procs::Proc,
};
use serde_json::Value;

const DELAY_LINE: &str = env!("CARGO_BIN_EXE_delay-line");
const SINK_PORT: u16 = 5201;

/// Transfers measure a rate: one at a time, not sharing the CPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lab(tag: &str, path: WanPath) -> WanLab {
    WanLab::with_binary(tag, path, DELAY_LINE.as_ref()).expect("WAN lab")
}

/// `delay-line sink` listening in `host` on every address.
fn sink(host: &Host) -> Proc {
    bulk::sink(DELAY_LINE.as_ref(), host, &format!("[::]:{SINK_PORT}"))
}

/// `delay-line send` of `bytes` from `host` to `to`; its `sent` report.
fn send(host: &Host, to: &str, bytes: u64, timeout_secs: u64) -> Value {
    bulk::send(DELAY_LINE.as_ref(), host, to, bytes, timeout_secs)
}

fn sysctl(host: &Host, key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = host.sh(&format!("cat {path}")).expect("read sysctl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .replace('\t', " ")
}

/// Moves `mb` megabytes near -> far, prints and returns Gbit/s (the average
/// over the whole transfer, slow start included).
fn transfer(wan: &WanLab, mb: u64, what: &str) -> f64 {
    let sink = sink(wan.far());
    let to = format!("{}:{SINK_PORT}", wan.far().ip());
    let sent = send(wan.near(), &to, mb * 1_000_000, 60);
    let gbit = sent["gbit_s"].as_f64().unwrap();
    let received = sink
        .wait_for(
            |l| l.contains(r#""event":"received""#),
            Duration::from_secs(5),
        )
        .expect("the sink reports");
    let received: Value = serde_json::from_str(&received).unwrap();
    let second_half = received["second_half_gbit_s"]
        .as_f64()
        .map(|g| format!(" ({g:.2} Gbit/s over the second half)"))
        .unwrap_or_default();
    eprintln!(
        "wan_lab: {what}: {mb} MB near -> far in {:.2} s: {gbit:.2} Gbit/s direct TCP{second_half}",
        sent["secs"].as_f64().unwrap(),
    );
    // The delay line reports its counters once a second.
    std::thread::sleep(Duration::from_millis(1100));
    if let Some(stats) = last_stats(wan) {
        eprintln!("wan_lab: delay line: {stats}");
    }
    gbit
}

#[test]
fn handshake_takes_a_round_trip_and_bulk_tcp_crosses_50ms() {
    if !require_root("handshake_takes_a_round_trip_and_bulk_tcp_crosses_50ms") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let wan = lab("wan50", WanPath::one_way(Duration::from_millis(25)));
    for key in [
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_congestion_control",
    ] {
        eprintln!("wan_lab: near ns {key} = {}", sysctl(wan.near(), key));
    }

    let listener = sink(wan.far());
    // A handshake (SYN out, SYN-ACK back) is one round trip: 2 * 25 ms.
    for to in [
        format!("{}:{SINK_PORT}", wan.far().ip()),
        format!("[{}]:{SINK_PORT}", wan.far().ip6()),
    ] {
        let sent = send(wan.near(), &to, 1000, 10);
        let ms = sent["connect_ms"].as_f64().unwrap();
        eprintln!("wan_lab: TCP connect to {to} took {ms:.1} ms");
        assert!(
            (50.0..200.0).contains(&ms),
            "a handshake over 25 ms each way took {ms} ms"
        );
    }
    drop(listener);

    let gbit = transfer(&wan, 500, "50 ms RTT");
    assert!(gbit > 0.1, "{gbit} Gbit/s: the path hardly works");
}

#[test]
fn bulk_tcp_crosses_150ms() {
    if !require_root("bulk_tcp_crosses_150ms") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Default TCP buffers (64 MiB): one connection's window, not the delay
    // line, bounds the rate here (about 2.3 Gbit/s).
    let wan = lab("wan150", WanPath::rtt(Duration::from_millis(150)));
    let gbit = transfer(&wan, 500, "150 ms RTT");
    assert!(gbit > 0.1, "{gbit} Gbit/s: the path hardly works");
}

#[test]
fn transfer_completes_at_one_percent_loss() {
    if !require_root("transfer_completes_at_one_percent_loss") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let wan = lab(
        "wanloss",
        WanPath::one_way(Duration::from_millis(25)).with_loss(0.01),
    );
    transfer(&wan, 20, "50 ms RTT, 1% loss");
    let stats = last_stats(&wan).expect("the delay line reports");
    let lost = stats["a_to_b"]["lost"].as_u64().unwrap();
    let packets = stats["a_to_b"]["packets"].as_u64().unwrap();
    assert!(
        lost > 0 && lost < packets / 20,
        "{lost} lost of {} at 1% loss",
        lost + packets
    );
}

/// The delay line's latest counters.
fn last_stats(wan: &WanLab) -> Option<Value> {
    wan.line_output()
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "stats")
}
