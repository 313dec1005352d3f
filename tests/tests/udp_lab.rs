//! UDP tunnels across a real NAT (issue #19): a rust-libp2p node listening
//! on QUIC behind a masquerading router is reached at the gateway's
//! `/udp/<port>/quic-v1` by a dialer on the internet; with transparent
//! delivery it sees the dialer's real address (its private-source gater
//! lets it in), with plain delivery a private one (the gater refuses). A
//! spoofed-source flood at the leased port stays bounded (flows, bytes back,
//! memory) and counted, while an honest QUIC connection keeps working.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use relaygate_tests::{
    labworld::{field, nft_counter, snmp, world, World},
    load::ProcStats,
    netlab::{require_root, Host},
    procs::Proc,
    stack::{eventually, metric, Gateway},
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");
const UDP_TOOL: &str = env!("CARGO_BIN_EXE_udp-tool");
const T: Duration = Duration::from_secs(30);
/// The node's QUIC port, and the leased public port of its tunnel.
const PORT: u16 = 9905;
const SPOOFED: &str = "198.51.100.0/24";
const G: &str = "relaygate_gateway_";
/// Reasons a datagram read from a remote is refused for, before it is
/// carried (all but `bandwidth` at a new flow's admission).
const ADMISSION: &str =
    "stopping no_channel refused new_flow_rate flows_per_tunnel flows_per_source flows_total bandwidth";

/// `lab-node listen` on the node host's QUIC port, refusing private
/// sources; returns it and its peer id.
fn quic_node(w: &World) -> (Proc, String) {
    let mut node = w.node_host.cmd(LAB_NODE);
    node.args([
        "listen",
        "--listen",
        &format!("/ip4/{}/udp/{PORT}/quic-v1", w.node_host.ip()),
        "--deny-private-sources",
        "--seed",
        "7",
    ]);
    let node = Proc::spawn("node", node);
    let up = node
        .wait_for(|l| l.contains("\"listening\""), T)
        .expect("node up");
    (node, field(&up, "peer_id"))
}

/// The gateway, with its lease range on the node's port, and an agent with
/// `tunnels`, once each tunnel is leased and the datagram channel is up.
fn gateway_and_agent(w: &World, tunnels: &[String]) -> (Gateway, relaygate_tests::stack::Agent) {
    let gw = w.gateway(Some(&format!("{PORT}-{}", PORT + 1)), &[]);
    let a = w.agent(&gw, tunnels);
    for t in tunnels {
        let name = t.split('=').next().unwrap_or_default();
        a.wait_leased(name, T).expect("lease");
    }
    a.proc
        .wait_for(|l| l.contains("datagram channel up"), T)
        .expect("the agent's datagram channel comes up");
    assert!(
        eventually(Duration::from_secs(10), || gauge(
            &w.gateway_metrics(&gw),
            "udp_channels_active"
        ) == 1.0),
        "the gateway holds the datagram channel"
    );
    (gw, a)
}

/// `lab-node dial` from `host` to the node at the gateway's `port`, with
/// `extra` arguments (split at spaces).
fn dial(w: &World, host: &Host, label: &str, port: u16, node: &str, extra: &str) -> Proc {
    let mut d = host.cmd(LAB_NODE);
    d.args([
        "dial",
        "--addr",
        &format!("/ip4/{}/udp/{port}/quic-v1/p2p/{node}", w.gw_host.ip()),
    ])
    .args(extra.split_whitespace());
    Proc::spawn(label, d)
}

/// The round trips of the successful pings a `lab-node` reported.
fn ping_rtts(p: &Proc) -> Vec<u64> {
    p.lines()
        .iter()
        .filter(|l| l.contains("\"event\":\"ping\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["rtt_us"].as_u64())
        .collect()
}

fn gauge(m: &str, name: &str) -> f64 {
    metric(m, &format!("{G}{name}")).unwrap_or(0.0)
}

fn dropped(m: &str, reason: &str) -> f64 {
    gauge(m, &format!("udp_dropped_total{{reason=\"{reason}\"}}"))
}

fn by_direction(m: &str, family: &str, dir: &str) -> f64 {
    gauge(m, &format!("{family}{{direction=\"{dir}\"}}"))
}

#[test]
fn a_quic_node_behind_a_nat_is_reached_over_udp_and_sees_the_real_address() {
    if !require_root("a_quic_node_behind_a_nat_is_reached_over_udp_and_sees_the_real_address") {
        return;
    }
    let w = world("udp");
    let (node, peer) = quic_node(&w);
    let ip = w.node_host.ip();
    let (gw, a) = gateway_and_agent(
        &w,
        &[
            format!("tnode={ip}:{PORT}@{PORT},proto=udp,deliver=transparent"),
            format!("pnode={ip}:{PORT}@{},proto=udp,deliver=plain", PORT + 1),
        ],
    );
    a.proc
        .wait_for(|l| l.contains("transparent delivery rules installed"), T)
        .expect("rules installed");

    // Transparent: the node's gater sees the dialer's public address.
    let started = Instant::now();
    let mut d = dial(
        &w,
        &w.remote,
        "remote",
        PORT,
        &peer,
        "--pings 1 --echo-bytes 1000000",
    );
    let st = d.wait_exit(T).expect("the dial ends");
    let lines = d.lines().join("\n");
    assert!(st.success(), "transparent dial failed: {lines}");
    eprintln!(
        "udp_lab: transparent dial with a 1 MB echo took {:?}",
        started.elapsed()
    );
    assert!(lines.contains("\"identify\""), "identify: {lines}");
    let echo = d
        .lines()
        .into_iter()
        .find(|l| l.contains("\"event\":\"echo\""))
        .expect("echo event");
    assert!(echo.contains("\"same\":true"), "{echo}");
    let remote_prefix = format!("/ip4/{}/udp/", w.remote.ip());
    let connected = node
        .wait_for(
            |l| l.contains("\"connected\"") && field(l, "remote_addr").starts_with(&remote_prefix),
            T,
        )
        .expect("the node sees the dialer's real address");
    assert!(connected.contains("/quic-v1"), "{connected}");
    let observed = format!("/ip4/{}/udp/{PORT}/quic-v1", w.gw_host.ip());
    node.wait_for(
        |l| l.contains("\"identify\"") && field(l, "observed_addr") == observed,
        T,
    )
    .expect("the dialer observed the node at the gateway's public address and port");
    assert!(
        !node.lines().iter().any(|l| l.contains("\"denied\"")),
        "transparent delivery must pass the private-source gater"
    );
    let m = w.gateway_metrics(&gw);
    eprintln!(
        "udp_lab: after the transparent dial, dropped: {:?}",
        drop_reasons(&m)
    );
    assert!(
        gauge(&m, "udp_flows_validated") >= 1.0,
        "the QUIC flow proved its address"
    );
    let (uin, uout) = (
        by_direction(&m, "udp_unvalidated_bytes_total", "inbound"),
        by_direction(&m, "udp_unvalidated_bytes_total", "outbound"),
    );
    assert!(uout <= uin, "no amplification: {uout} out for {uin} in");

    // Plain: the node sees the agent's own (private) address, and refuses it.
    let mut d = dial(
        &w,
        &w.remote,
        "remote-plain",
        PORT + 1,
        &peer,
        "--pings 1 --timeout-secs 10",
    );
    let st = d.wait_exit(T).expect("the plain dial ends");
    assert!(
        !st.success(),
        "plain delivery comes from a private address and must be refused"
    );
    let private_prefix = format!("/ip4/{ip}/udp/");
    node.wait_for(
        |l| l.contains("\"denied\"") && field(l, "remote_addr").starts_with(&private_prefix),
        T,
    )
    .expect("the gater refused the agent's private address");
}

/// The figures the flood test reads before and after it.
#[derive(Debug, Default, Clone, Copy)]
struct Snapshot {
    /// nftables on the gateway host: packets and bytes in from the spoofed
    /// prefix to the port, bytes out to that prefix, packets in from
    /// elsewhere to the port.
    flood_in: f64,
    flood_in_bytes: f64,
    flood_out_bytes: f64,
    other_in: f64,
    /// The gateway host's UDP receive-buffer drops (/proc/net/snmp).
    rcvbuf_errors: f64,
    /// The gateway's own counts.
    carried_in: f64,
    admission_drops: f64,
    opened: f64,
    unvalidated_in: f64,
    unvalidated_out: f64,
}

fn snapshot(w: &World, gw: &Gateway) -> Snapshot {
    let m = w.gateway_metrics(gw);
    let counter = |name: &str| nft_counter(&w.gw_host, "inet udplab", name);
    let ((fin, fin_b), (_, fout_b), (oin, _)) = (
        counter("flood_in"),
        counter("flood_out"),
        counter("other_in"),
    );
    Snapshot {
        flood_in: fin as f64,
        flood_in_bytes: fin_b as f64,
        flood_out_bytes: fout_b as f64,
        other_in: oin as f64,
        rcvbuf_errors: snmp(&w.gw_host, "Udp", "RcvbufErrors") as f64,
        carried_in: by_direction(&m, "udp_datagrams_total", "inbound"),
        admission_drops: ADMISSION.split(' ').map(|r| dropped(&m, r)).sum(),
        opened: gauge(&m, "udp_flows_opened_total"),
        unvalidated_in: by_direction(&m, "udp_unvalidated_bytes_total", "inbound"),
        unvalidated_out: by_direction(&m, "udp_unvalidated_bytes_total", "outbound"),
    }
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;

    fn sub(self, b: Snapshot) -> Snapshot {
        Snapshot {
            flood_in: self.flood_in - b.flood_in,
            flood_in_bytes: self.flood_in_bytes - b.flood_in_bytes,
            flood_out_bytes: self.flood_out_bytes - b.flood_out_bytes,
            other_in: self.other_in - b.other_in,
            rcvbuf_errors: self.rcvbuf_errors - b.rcvbuf_errors,
            carried_in: self.carried_in - b.carried_in,
            admission_drops: self.admission_drops - b.admission_drops,
            opened: self.opened - b.opened,
            unvalidated_in: self.unvalidated_in - b.unvalidated_in,
            unvalidated_out: self.unvalidated_out - b.unvalidated_out,
        }
    }
}

/// Every `udp_dropped_total{reason}` sample, as `reason="..."} n`.
fn drop_reasons(m: &str) -> Vec<String> {
    let family = format!("{G}udp_dropped_total{{");
    m.lines()
        .filter_map(|l| l.strip_prefix(&family))
        .map(str::to_string)
        .collect()
}

/// Largest and smallest gauges seen while sampling.
#[derive(Debug, Default)]
struct Samples {
    n: usize,
    max_unvalidated: f64,
    min_validated: f64,
    max_rss_kib: u64,
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Samples the gateway's flow gauges and RSS every 100 ms until `stop`.
fn sample(w: &World, gw: &Gateway, stop: &AtomicBool) -> Samples {
    let mut s = Samples {
        min_validated: f64::MAX,
        ..Default::default()
    };
    while !stop.load(Ordering::Relaxed) {
        let m = w.gateway_metrics(gw);
        if !m.is_empty() {
            s.n += 1;
            s.max_unvalidated = s.max_unvalidated.max(gauge(&m, "udp_flows_unvalidated"));
            s.min_validated = s.min_validated.min(gauge(&m, "udp_flows_validated"));
        }
        let rss = ProcStats::of(gw.proc.pid()).map_or(0, |p| p.rss_kib);
        s.max_rss_kib = s.max_rss_kib.max(rss);
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

#[test]
fn a_spoofed_flood_is_bounded_and_counted_while_an_honest_flow_works() {
    if !require_root("a_spoofed_flood_is_bounded_and_counted_while_an_honest_flow_works") {
        return;
    }
    let (pps, secs) = (20_000u64, 5u64);
    let w = world("uf");
    let flood = w.lab.internet_host("flood", 30);
    // The gateway answers spoofed sources through the flood host, which
    // drops what it gets: a reverse path, so rp_filter (even strict) passes
    // them, and a count of every byte sent back.
    let script = format!(
        "set -e
ip route add {SPOOFED} via {}
nft -f - <<'EOF'
table inet udplab {{
  counter flood_in {{}}
  counter flood_out {{}}
  counter other_in {{}}
  chain input {{ type filter hook input priority 0; policy accept;
    ip saddr {SPOOFED} udp dport {PORT} counter name flood_in
    ip saddr != {SPOOFED} udp dport {PORT} counter name other_in
  }}
  chain output {{ type filter hook output priority 0; policy accept;
    ip daddr {SPOOFED} counter name flood_out
  }}
}}
EOF
cat /proc/sys/net/ipv4/conf/all/rp_filter /proc/sys/net/ipv4/conf/eth0/rp_filter",
        flood.ip()
    );
    let out = w.gw_host.sh(&script).expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "udp_lab: gateway host rp_filter all/eth0: {:?}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
    );

    let (_node, peer) = quic_node(&w);
    let ip = w.node_host.ip();
    let (gw, _agent) = gateway_and_agent(
        &w,
        &[format!(
            "tnode={ip}:{PORT}@{PORT},proto=udp,deliver=transparent"
        )],
    );
    // The honest connection: 40 pings 250 ms apart, spanning the flood.
    let mut honest = dial(
        &w,
        &w.remote,
        "honest",
        PORT,
        &peer,
        "--pings 40 --ping-interval-ms 250 --timeout-secs 60",
    );
    assert!(
        eventually(T, || ping_rtts(&honest).len() >= 2),
        "the honest connection pings before the flood"
    );
    let before = snapshot(&w, &gw);
    let gw_before = ProcStats::of(gw.proc.pid()).unwrap_or_default();
    let rss_before = gw_before.rss_kib;
    eprintln!(
        "udp_lab: before the flood, dropped: {:?}",
        drop_reasons(&w.gateway_metrics(&gw))
    );

    let stop = AtomicBool::new(false);
    let (samples, sent, flood_took, new_dial) = std::thread::scope(|s| {
        // Stops the sampler on every way out, a panic included (the scope
        // would wait for it forever).
        let stopper = StopOnDrop(&stop);
        let sampler = s.spawn(|| w.gw_host.run_in(|| sample(&w, &gw, &stop)));
        // A new honest dial in the middle of the flood: how long it takes
        // to get through the new-flow rate (reported, not asserted).
        let late = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            let started = Instant::now();
            let args = "--pings 1 --timeout-secs 20";
            let mut late = dial(&w, &w.remote, "late", PORT, &peer, args);
            let ok = late.wait_exit(T).is_some_and(|s| s.success());
            (ok, started.elapsed())
        });
        let started = Instant::now();
        let mut f = flood.cmd(UDP_TOOL);
        let target = format!("{}:{PORT}", w.gw_host.ip());
        f.args(["flood", "--target", &target, "--from", SPOOFED])
            .args(["--pps", &pps.to_string(), "--secs", &secs.to_string()]);
        let mut f = Proc::spawn("flood", f);
        let st = f.wait_exit(T).expect("the flood ends");
        let took = started.elapsed();
        let sent = f
            .lines()
            .iter()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["sent"].as_u64())
            .unwrap_or_else(|| panic!("flood failed ({st}): {:?}", f.lines()));
        let new_dial = late.join().expect("late dial");
        // Let the gateway drain its socket before the last samples.
        std::thread::sleep(Duration::from_secs(1));
        drop(stopper);
        let samples = sampler.join().expect("sampler");
        (samples, sent, took, new_dial)
    });

    let st = honest.wait_exit(T).expect("the honest dial ends");
    let lines = honest.lines();
    let rtts = ping_rtts(&honest);
    let d = snapshot(&w, &gw) - before;
    let m = w.gateway_metrics(&gw);
    let cpu = ProcStats::of(gw.proc.pid()).map_or(0.0, |p| p.cpu_secs) - gw_before.cpu_secs;
    let mut sorted = rtts.clone();
    sorted.sort_unstable();
    eprintln!(
        "udp_lab: flood sent {sent} datagrams in {flood_took:?} ({pps}/s for {secs} s asked)"
    );
    eprintln!(
        "udp_lab: at the gateway host: flood in {} pkts / {} B, out to the spoofed prefix {} B; \
         honest in {} pkts; UDP rcvbuf drops {}",
        d.flood_in, d.flood_in_bytes, d.flood_out_bytes, d.other_in, d.rcvbuf_errors
    );
    eprintln!(
        "udp_lab: read by the gateway: {} carried + {} refused at admission; {} flows opened; \
         dropped in all: {:?}",
        d.carried_in,
        d.admission_drops,
        d.opened,
        drop_reasons(&m)
    );
    eprintln!(
        "udp_lab: unvalidated bytes in {} out {}; max unvalidated flows {} (over {} samples), \
         min validated {}; gateway RSS {rss_before} KiB -> max {} KiB, CPU {cpu:.1} s",
        d.unvalidated_in,
        d.unvalidated_out,
        samples.max_unvalidated,
        samples.n,
        samples.min_validated,
        samples.max_rss_kib,
    );
    eprintln!(
        "udp_lab: honest: {} pings, rtt p50 {} us max {} us; a new dial during the flood: ok={} in {:?}",
        rtts.len(),
        sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        sorted.last().copied().unwrap_or(0),
        new_dial.0,
        new_dial.1
    );

    assert!(
        st.success() && !lines.iter().any(|l| l.contains("ping_failed")),
        "the honest connection kept working: {lines:?}"
    );
    assert!(
        rtts.len() >= 40,
        "every honest ping came back: {}",
        rtts.len()
    );
    assert!(
        sent >= pps * secs * 9 / 10,
        "the flood ran at its rate: {sent}"
    );
    let sent = sent as f64;
    assert!(
        d.flood_in >= sent * 0.95,
        "the spoofed datagrams reached the gateway (rp_filter): {} of {sent}",
        d.flood_in
    );
    assert!(
        d.flood_out_bytes <= d.flood_in_bytes,
        "no amplification: {} B out for {} B in",
        d.flood_out_bytes,
        d.flood_in_bytes
    );
    assert!(
        d.unvalidated_out <= d.unvalidated_in,
        "no amplification by the gateway's own count"
    );
    assert!(samples.n >= 10, "sampled during the flood: {}", samples.n);
    assert!(
        samples.max_unvalidated <= 512.0,
        "unvalidated flows bounded: {}",
        samples.max_unvalidated
    );
    assert!(
        samples.min_validated >= 1.0,
        "the honest flow stayed validated"
    );
    // Every datagram that reached the port was carried or refused, or the
    // kernel dropped it for a full receive buffer (then it was never read).
    let arrived = d.flood_in + d.other_in;
    let accounted = d.carried_in + d.admission_drops + d.rcvbuf_errors;
    assert!(
        (arrived - accounted).abs() <= (arrived * 0.002).max(20.0),
        "accounted {accounted} of {arrived} datagrams"
    );
    // Each spoofed datagram read opened a flow of its own or was refused;
    // new flows are bounded by the unkeyed rate, 2000 burst + 1000/s.
    let flood_read = d.flood_in - d.rcvbuf_errors;
    assert!(
        (d.opened + d.admission_drops - flood_read).abs() <= d.other_in + 20.0,
        "{} flows + {} refused for {flood_read} spoofed datagrams read",
        d.opened,
        d.admission_drops
    );
    let bound = 2000.0 + 1000.0 * (flood_took.as_secs_f64() + 2.0);
    assert!(
        d.opened <= bound,
        "{} new flows, over the rate's {bound}",
        d.opened
    );
    let growth = samples.max_rss_kib.saturating_sub(rss_before);
    assert!(growth < 64 * 1024, "gateway RSS grew {growth} KiB");
}
