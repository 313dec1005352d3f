//! The tunnel across a real WAN path: the gateway on one host, the agent and
//! its target on another, 50 ms of round trip between them (the WAN lab's
//! delay line). One and eight bulk streams through gateway+agent against
//! direct TCP over the same path, measured in the same test: a ratio, not a
//! timed figure (the benchmark's `--wan` table has the release figures).
//! Before window tuning one stream got 5% of direct here (1 MiB per round
//! trip).

use std::{path::Path, thread, time::Duration};

use relaygate_tests::{
    netlab::{bulk, require_root, Host, WanLab, WanPath},
    stack::{eventually, settings, Agent, Gateway, GatewaySpec, Transport},
};

const DELAY_LINE: &str = env!("CARGO_BIN_EXE_delay-line");
const SINK_PORT: u16 = 5201;

/// `streams` bulk transfers of `bytes` each from `host` to `to` at once;
/// their rates added up, in Gbit/s (each over its whole transfer, slow
/// start included).
fn push(host: &Host, to: &str, streams: usize, bytes: u64) -> f64 {
    let runs: Vec<_> = (0..streams)
        .map(|_| {
            let (host, to) = (host.clone(), to.to_string());
            thread::spawn(move || bulk::send(DELAY_LINE.as_ref(), &host, &to, bytes, 120))
        })
        .collect();
    runs.into_iter()
        .map(|r| {
            let sent = r.join().expect("sender thread");
            sent["gbit_s"].as_f64().expect("gbit_s")
        })
        .sum()
}

#[test]
fn one_and_eight_streams_fill_a_50ms_path() {
    if !require_root("one_and_eight_streams_fill_a_50ms_path") {
        return;
    }
    let wan = WanLab::with_binary(
        "wantun",
        WanPath::rtt(Duration::from_millis(50)),
        DELAY_LINE.as_ref(),
    )
    .expect("WAN lab");
    let (near, far) = (wan.near(), wan.far());
    let in_near = |b: &Path| near.cmd(b);
    let in_far = |b: &Path| far.cmd(b);
    let _sink = bulk::sink(DELAY_LINE.as_ref(), far, &format!("0.0.0.0:{SINK_PORT}"));
    let gw = Gateway::start(
        &in_near,
        GatewaySpec {
            bind: "0.0.0.0".into(),
            public_ip: near.ip().to_string(),
            extra: settings(&["log.level=info", "autonat.only_global_ips=false"]),
            ..Default::default()
        },
    );
    let agent = Agent::start(
        &in_far,
        &gw,
        Transport::Quic,
        &[format!("sink=127.0.0.1:{SINK_PORT}")],
        true,
        &settings(&["log.level=info"]),
    );
    let port = agent
        .wait_leased("sink", Duration::from_secs(60))
        .expect("lease");
    assert!(
        eventually(Duration::from_secs(30), || agent
            .proc
            .lines()
            .iter()
            .filter(|l| l.contains("lane up"))
            .count()
            >= 4),
        "the agent's lanes came up"
    );
    let direct = format!("{}:{SINK_PORT}", far.ip());
    let tunnel = format!("127.0.0.1:{port}");
    // Debug builds seal and copy slower than the path moves bytes: a ratio
    // far above the 5% of fixed 1 MiB windows, not the release figure.
    for (streams, bytes, floor) in [(1, 400_000_000, 0.3), (8, 60_000_000, 0.3)] {
        let d = push(near, &direct, streams, bytes);
        let t = push(near, &tunnel, streams, bytes);
        eprintln!(
            "wan_tunnel: {streams} stream(s) at 50 ms RTT: direct {d:.2} Gbit/s, \
             through gateway+agent {t:.2} Gbit/s ({:.0}%)",
            t / d * 100.0
        );
        assert!(
            t >= d * floor,
            "{streams} stream(s): {t:.2} Gbit/s through the tunnel against {d:.2} direct"
        );
    }
}
