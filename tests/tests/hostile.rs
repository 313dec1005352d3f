//! The hostile-input matrix: garbage, truncated and oversized frames, a
//! byte-per-second client, half-open connections and abrupt resets against
//! every gateway listener (libp2p TCP and QUIC, a leased port, the admin
//! API), all while an honest transfer runs. The gateway stays up, its memory
//! stays bounded, and the honest transfer completes byte-exact.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use relaygate_tests::{
    procs::Proc,
    stack::{
        here, http_get, metric_sum, round_trip, settings, Agent, Echo, Gateway, GatewaySpec,
        Transport,
    },
};

const LAB_NODE: &str = env!("CARGO_BIN_EXE_lab-node");

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Every TCP abuse against one address, for `secs` seconds.
fn tcp_abuse(addr: SocketAddr, secs: u64, seed: u64) {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut held = Vec::new();
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        // Garbage, then close.
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(&noise(64 * 1024, seed + round));
        }
        // Truncated: the start of a multistream header, then nothing.
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"\x13/multistream/1.0");
            held.push(s);
        }
        // An oversized length prefix (uvarint of ~4 GiB).
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
            let _ = s.write_all(&noise(1024, seed ^ round));
        }
        // Half-open: connect and never speak.
        if let Ok(s) = TcpStream::connect(addr) {
            held.push(s);
        }
        // Abrupt reset.
        if let Ok(s) = TcpStream::connect(addr) {
            let s2 = socket2::Socket::from(s);
            let _ = s2.set_linger(Some(Duration::ZERO));
            drop(s2);
        }
        // Keep a bounded number of idle sockets open.
        if held.len() > 200 {
            held.drain(..100);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client that sends one byte per 200 ms for `secs` seconds.
fn trickle(addr: SocketAddr, secs: u64) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(secs);
    let mut b = 0u8;
    while Instant::now() < until {
        if s.write_all(&[b]).is_err() {
            return;
        }
        b = b.wrapping_add(1);
        thread::sleep(Duration::from_millis(200));
    }
}

fn udp_garbage(addr: SocketAddr, secs: u64) {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(secs);
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let len = 1 + (i as usize * 97) % 1400;
        let mut d = noise(len, i);
        // Every other one looks like a QUIC long header (Initial, version 1).
        if i.is_multiple_of(2) && d.len() > 6 {
            d[0] = 0xc0;
            d[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        let _ = sock.send_to(&d, addr);
        if i.is_multiple_of(50) {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn every_listener_survives_hostile_input_while_an_honest_transfer_completes() {
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            // The attacks come from 127.0.0.1, like the honest client: lift the
            // per-IP buckets so the test measures robustness, not rate limiting.
            extra: settings(&[
                "guard.connections_per_ip.per_second=0",
                "guard.tunnel_connections_per_ip.per_second=0",
                "limits.max_connections_per_ip=100000",
                "limits.max_connections_per_source=100000",
            ]),
            ..Default::default()
        },
    );
    let echo = Echo::start();
    let agent = Agent::start(
        &here,
        &gw,
        Transport::Quic,
        &[echo.tunnel("node")],
        true,
        &[],
    );
    let port = agent
        .wait_leased("node", Duration::from_secs(20))
        .expect("lease");
    let pid = gw.proc.pid();
    let rss_before = rss_kib(pid);

    let mut honest = std::process::Command::new(LAB_NODE);
    honest.args([
        "tcp-stream",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--seconds",
        "12",
        "--kib-per-sec",
        "2048",
    ]);
    let honest = Proc::spawn("honest", honest);
    honest
        .wait_for(|l| l.contains("progress"), Duration::from_secs(10))
        .expect("honest transfer flowing");

    let libp2p_tcp: SocketAddr = format!("127.0.0.1:{}", gw.tcp).parse().expect("addr");
    let quic: SocketAddr = format!("127.0.0.1:{}", gw.quic).parse().expect("addr");
    let leased: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let admin = gw.admin;
    let attacks = vec![
        thread::spawn(move || tcp_abuse(libp2p_tcp, 8, 1)),
        thread::spawn(move || tcp_abuse(leased, 8, 2)),
        thread::spawn(move || tcp_abuse(admin, 8, 3)),
        thread::spawn(move || udp_garbage(quic, 8)),
        thread::spawn(move || trickle(libp2p_tcp, 8)),
        thread::spawn(move || trickle(leased, 8)),
        thread::spawn(move || trickle(admin, 8)),
        thread::spawn(move || {
            // An endless HTTP header line on the admin API.
            if let Ok(mut s) = TcpStream::connect(admin) {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nX-Long: ");
                for _ in 0..256 {
                    if s.write_all(&[b'a'; 4096]).is_err() {
                        break;
                    }
                }
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }),
    ];
    for a in attacks {
        let _ = a.join();
    }

    let done = honest
        .wait_for(|l| l.contains("stream_done"), Duration::from_secs(40))
        .expect("honest transfer finished");
    assert!(
        done.contains("\"ok\":true"),
        "byte-exact under attack: {done}"
    );
    assert_eq!(
        http_get(gw.admin, "/health/live").0,
        200,
        "gateway still up"
    );
    assert_eq!(
        round_trip(port, b"still serving").expect("round trip"),
        b"still serving"
    );
    let m = gw.metrics();
    let refused = metric_sum(&m, "relaygate_gateway_refusals_total");
    println!("gateway refused {refused} connections or requests during the attacks");
    assert!(refused > 100.0, "the attacks reached the gateway:\n{m}");
    let rss_after = rss_kib(pid);
    println!("gateway RSS {rss_before} KiB before, {rss_after} KiB after the attacks");
    assert!(
        rss_after < rss_before + 128 * 1024,
        "memory stayed bounded: {rss_before} -> {rss_after} KiB"
    );
}
