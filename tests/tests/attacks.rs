//! Attacks on the pools an unauthenticated peer can reach (issue #15), each
//! run while an honest agent moves real traffic through the same gateway:
//! its round trips must all succeed (each within 5 s: a frozen path holds
//! them for its idle timeout), their p95 stay within twice the baseline plus
//! 100 ms (a starved or locked-out path slows every sample; a 2-core machine
//! running gateway, agents, attacker, the test and other builds at once adds
//! 60-130 ms to one or two samples in a hundred, so the p99 measured the
//! machine, not the gateway),
//! and the attacker must be refused and counted.
//!
//! Two sources on one machine, as the gateway groups them (an IPv4
//! address): the attacker comes from 127.0.0.1 (or 127.0.0.2-4 for raw
//! sockets), the honest side from elsewhere in 127/8: its agent's QUIC
//! session leaves from its hole-punch socket, bound to 127.0.0.5, and its
//! public clients from 127.0.0.6. Its lanes (TCP) come from 127.0.0.1; where
//! that source is banned, its tunnel rides the lane on its QUIC session.
//! One test at a time: each takes most of the machine.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use relaygate_tests::{
    load::ProcStats,
    rawpeer::RawPeer,
    stack::{eventually, here, http_get, metric, Agent, Echo, Gateway, GatewaySpec, Transport},
};

const HONEST_AGENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const HONEST_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// An honest agent with an echo tunnel; its leased port.
fn honest(gw: &Gateway, echo: &Echo) -> (Agent, u16) {
    honest_over(gw, echo, Transport::Quic)
}

fn honest_over(gw: &Gateway, echo: &Echo, t: Transport) -> (Agent, u16) {
    let punch = format!("/ip4/{HONEST_AGENT}/udp/0/quic-v1");
    let extra = ["--set".to_string(), format!("relay.punch_listen={punch}")];
    let agent = Agent::start(&here, gw, t, &[echo.tunnel("echo")], true, &extra);
    let port = agent
        .wait_leased("echo", Duration::from_secs(20))
        .expect("honest lease");
    (agent, port)
}

/// One round trip from the honest client's address.
fn client_round_trip(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((HONEST_CLIENT, 0)).into())?;
    s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let mut s = TcpStream::from(s);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// The baseline: after a warm-up (lanes coming up, first connections).
fn baseline(port: u16) -> Vec<Duration> {
    round_trips(port, 20);
    round_trips(port, 50)
}

/// `n` round trips of 1 KiB through `port`, each within 5 s; their times.
fn round_trips(port: u16, n: usize) -> Vec<Duration> {
    let data = vec![0x42u8; 1024];
    (0..n)
        .map(|i| {
            let started = Instant::now();
            let back = client_round_trip(port, &data).unwrap_or_default();
            let took = started.elapsed();
            assert_eq!(back, data, "honest round trip {i} failed");
            assert!(
                took < Duration::from_secs(5),
                "honest round trip {i} took {took:?}"
            );
            took
        })
        .collect()
}

/// The nearest-rank 95th percentile: of 100 samples, the sixth slowest.
fn p95(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 95).div_ceil(100).saturating_sub(1)]
}

fn within_baseline(what: &str, base: Vec<Duration>, now: Vec<Duration>) {
    let mut slowest = now.clone();
    slowest.sort();
    slowest.reverse();
    slowest.truncate(5);
    eprintln!("{what}: slowest honest round trips during the attack {slowest:?}");
    let (b, n) = (p95(base), p95(now));
    eprintln!("{what}: honest p95 {b:?} before, {n:?} during the attack");
    assert!(
        n <= b * 2 + Duration::from_millis(100),
        "{what}: honest p95 {n:?} against {b:?} before"
    );
}

fn refusals(gw: &Gateway, reason: &str) -> f64 {
    metric(
        &gw.metrics(),
        &format!("relaygate_gateway_refusals_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

fn rss_kib(gw: &Gateway) -> u64 {
    ProcStats::of(gw.proc.pid()).map_or(0, |s| s.rss_kib)
}

/// Item 2. One connection opens 300 control streams and sends each a length
/// prefix announcing 64 KiB, then nothing. At 4462fed each got a task and
/// waited 10 s for its hello, with no cap per connection (the announced
/// length is no longer allocated up front since 05fdc5d); now a connection
/// has at most 4 such streams and the rest are refused.
#[test]
fn control_streams_past_four_per_connection_are_refused() {
    let _one = one_at_a_time();
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let (_agent, port) = honest(&gw, &echo);
    let base = baseline(port);
    let rss_before = rss_kib(&gw);

    let attacker = RawPeer::connect(&gw.addr(Transport::Tcp)).expect("attacker connects");
    let held = attacker.hold("/relaygate/control/1", &[0, 1, 0, 0], 300);
    let during = round_trips(port, 100);
    assert!(
        eventually(Duration::from_secs(5), || refusals(
            &gw,
            "control_streams_per_connection"
        ) >= 290.0),
        "streams past four refused and counted: {}",
        refusals(&gw, "control_streams_per_connection")
    );
    let grown = rss_kib(&gw).saturating_sub(rss_before);
    eprintln!(
        "{} streams held open; gateway RSS +{grown} KiB",
        held.0.len()
    );
    assert!(grown < 16 * 1024, "gateway RSS grew {grown} KiB");
    within_baseline("control streams", base, during);
    drop(held);
}

/// Item 3. Three sources open TCP connections to the libp2p port and send
/// nothing: each is held while the port waits for its first bytes (5 s),
/// then by libp2p's handshake (10 s). At 4462fed the first wait had no cap
/// and libp2p's 256 pending places had no share per source (100 per source
/// at the default rate: three sources hold them all), so this test's
/// refusals never happen there. Now a source holds at most its share once
/// half the places are taken, and an agent dialling over TCP gets in.
#[test]
fn silent_connections_leave_room_for_agents() {
    let _one = one_at_a_time();
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let (_agent, port) = honest(&gw, &echo);
    let base = baseline(port);

    let target: SocketAddr = format!("127.0.0.1:{}", tcp_port(&gw)).parse().unwrap();
    let mut silent = Vec::new();
    for source in 2..=4u8 {
        for _ in 0..150 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&SocketAddr::from((Ipv4Addr::new(127, 0, 0, source), 0)).into())
                .expect("bind");
            if s.connect(&target.into()).is_ok() {
                silent.push(TcpStream::from(s));
            }
        }
    }
    // Once the port's wait is over they are libp2p's pending handshakes; a
    // new agent dials over TCP now.
    std::thread::sleep(Duration::from_secs(6));
    let started = Instant::now();
    let (_late, late_port) = honest_over(&gw, &echo, Transport::Tcp);
    let took = started.elapsed();
    eprintln!(
        "a TCP agent leased in {took:?} beside {} silent connections",
        silent.len()
    );
    assert!(
        took < Duration::from_secs(8),
        "the TCP agent waited {took:?} for its lease"
    );
    round_trips(late_port, 20);
    let during = round_trips(port, 100);
    let refused = refusals(&gw, "pending_per_source");
    eprintln!("refused past the sources' shares: {refused}");
    assert!(
        refused >= 100.0,
        "silent connections past the share refused: {refused}"
    );
    within_baseline("silent connections", base, during);
    drop(silent);
}

/// Item 5. One source opens hop streams and sends nothing: each holds a
/// hop-request place for 10 s. At 4462fed 256 places were shared by all
/// with no share per source (this test's refusals never happen there). Now
/// a source holds at most its share (16) once half are taken, and a member
/// reserves beside them.
#[test]
fn silent_hop_requests_from_one_source_leave_room_for_members() {
    let _one = one_at_a_time();
    let gw = Gateway::start(&here, GatewaySpec::default());
    let echo = Echo::start();
    let (_agent, port) = honest(&gw, &echo);
    let base = baseline(port);
    let mut held = Vec::new();
    let mut attackers = Vec::new();
    // Two connections: a QUIC or yamux connection caps its streams too.
    for _ in 0..2 {
        let a = RawPeer::connect(&gw.addr(Transport::Tcp)).expect("attacker connects");
        held.push(a.hold("/libp2p/circuit/relay/0.2.0/hop", &[], 200));
        attackers.push(a);
    }
    // An honest member reserves now, and it must get through.
    let started = Instant::now();
    let (member, _) = honest(&gw, &echo);
    member
        .proc
        .wait_for(
            |l| l.contains("relay reservation active"),
            Duration::from_secs(15),
        )
        .expect("a member reserves during the attack");
    eprintln!(
        "a member reserved in {:?} beside 400 silent hop streams",
        started.elapsed()
    );
    let during = round_trips(port, 100);
    let refused = refusals(&gw, "relay_requests_per_source");
    assert!(
        refused >= 100.0,
        "hop requests past the share refused: {refused}"
    );
    within_baseline("silent hop requests", base, during);
    drop(held);
}

/// Item 7. One source makes a fresh peer id for every connection and sends
/// malformed relay messages until each id is banned. At 4462fed each id was
/// banned alone (`Offender::Ip` was never used) and new ones kept coming;
/// now the third banned id bans its source, whose new connections are then
/// refused before a handshake.
#[test]
fn a_source_of_fresh_peer_ids_is_banned_itself() {
    let _one = one_at_a_time();
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), "guard.violations_before_ban=3".into()],
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let (agent, port) = honest(&gw, &echo);
    let base = baseline(port);
    let garbage = [0x05, 0xff, 0xff, 0xff, 0xff, 0x00];
    let mut during = Vec::new();
    for id in 0..3 {
        let a = RawPeer::connect(&gw.addr(Transport::Tcp))
            .unwrap_or_else(|e| panic!("attacker id {id} connects: {e}"));
        for _ in 0..3 {
            let _ = a.exchange("/libp2p/circuit/relay/0.2.0/hop", &garbage);
        }
        during.extend(round_trips(port, 20));
    }
    assert!(
        eventually(Duration::from_secs(5), || http_get(
            gw.admin,
            "/v1/blacklist"
        )
        .1
        .contains("127.0.0.1/32")),
        "the source is banned: {}",
        http_get(gw.admin, "/v1/blacklist").1
    );
    let again = RawPeer::connect(&gw.addr(Transport::Tcp));
    assert!(
        again.is_err(),
        "a fourth id from the banned source is refused"
    );
    assert!(refusals(&gw, "banned") >= 1.0);
    // The honest agent, on another address, keeps its session and tunnel.
    assert!(!http_get(gw.admin, "/v1/blacklist").1.contains("127.0.0.5"));
    during.extend(round_trips(port, 40));
    let _ = agent;
    within_baseline("fresh peer ids", base, during);
}

/// The gateway's libp2p TCP port, from its address.
fn tcp_port(gw: &Gateway) -> u16 {
    let addr = gw.addr(Transport::Tcp);
    addr.split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("tcp port in the gateway address")
}
