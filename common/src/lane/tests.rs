//! The lane's multiplexer and flow control over in-memory connections.

use std::{io, sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SECRET: [u8; 32] = [3; 32];

fn keys(role: Role) -> LaneKeys {
    LaneKeys::from_secret(&SECRET, role)
}

fn pair(cfg: LaneConfig) -> (Arc<Lane>, Arc<Lane>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (
        Lane::start(a, keys(Role::Dialer), cfg, LaneLink::alone(1 << 30)),
        Lane::start(b, keys(Role::Listener), cfg, LaneLink::alone(1 << 30)),
    )
}

#[tokio::test]
async fn streams_carry_bytes_both_ways_with_half_close() {
    let (agent, gateway) = pair(LaneConfig::default());
    let mut s = gateway.open().await.unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        s.write_all(&sent).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut t = agent.accept().await.unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, payload);
    // the other direction still works after the half-close
    t.write_all(b"done").await.unwrap();
    t.shutdown().await.unwrap();
    assert_eq!(writer.await.unwrap(), b"done");
    drop(t);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((agent.streams(), gateway.streams()), (0, 0));
}

#[tokio::test]
async fn a_dropped_stream_resets_the_peer() {
    let (agent, gateway) = pair(LaneConfig::default());
    let s = gateway.open().await.unwrap();
    let mut t = agent.accept().await.unwrap();
    drop(s);
    let mut buf = [0u8; 8];
    let e = t.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn a_slow_reader_stalls_only_its_own_stream() {
    let (agent, gateway) = pair(LaneConfig::default());
    let mut slow = gateway.open().await.unwrap();
    let mut fast = gateway.open().await.unwrap();
    let _slow_peer = agent.accept().await.unwrap();
    let mut fast_peer = agent.accept().await.unwrap();
    // the slow stream's window fills, and its writer waits
    let blocked = tokio::time::timeout(Duration::from_millis(300), async {
        slow.write_all(&vec![1u8; 2 << 20]).await
    })
    .await;
    assert!(blocked.is_err(), "a full window must stop the writer");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        fast_peer.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    fast.write_all(&vec![2u8; 1 << 20]).await.unwrap();
    fast.shutdown().await.unwrap();
    assert_eq!(reader.await.unwrap(), 1 << 20);
}

#[tokio::test]
async fn a_closed_lane_resets_its_streams() {
    let (agent, gateway) = pair(LaneConfig::default());
    let mut s = gateway.open().await.unwrap();
    let _t = agent.accept().await.unwrap();
    agent.close();
    let mut buf = [0u8; 4];
    let e = s.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        gateway.open().await.is_err() || gateway.is_closed() || {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gateway.is_closed()
        }
    );
}

#[tokio::test]
async fn the_gateway_takes_no_streams_from_an_agent() {
    // An agent that opens anyway (it claims the opener's side for itself).
    let (a, b) = tokio::io::duplex(1 << 20);
    let rogue = LaneConfig {
        opener: Role::Dialer,
        ..LaneConfig::default()
    };
    let agent = Lane::start(a, keys(Role::Dialer), rogue, LaneLink::alone(1 << 30));
    let gateway = Lane::start(
        b,
        keys(Role::Listener),
        LaneConfig::default(),
        LaneLink::alone(1 << 30),
    );
    let _s = agent.open().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), gateway.closed())
        .await
        .expect("an agent's open ends the lane");
    // A well-behaved agent's side refuses to open at all.
    let (agent, _gateway) = pair(LaneConfig::default());
    assert!(matches!(agent.open().await, Err(LaneError::Protocol(_))));
}

#[tokio::test]
async fn between_gateways_the_dialer_opens_and_the_listener_serves() {
    let (dialer, listener) = pair(LaneConfig {
        opener: Role::Dialer,
        ..LaneConfig::default()
    });
    let mut s = dialer.open().await.unwrap();
    s.write_all(b"forwarded").await.unwrap();
    s.shutdown().await.unwrap();
    let mut t = listener.accept().await.unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"forwarded");
    t.write_all(b"back").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"back");
    assert!(matches!(listener.open().await, Err(LaneError::Protocol(_))));
    assert!(!dialer.is_closed() && !listener.is_closed());
}

#[tokio::test]
async fn the_wire_carries_sealed_records_and_a_tampered_one_ends_the_lane() {
    let (a, mut from_gateway) = tokio::io::duplex(1 << 20);
    let (b, mut to_agent) = tokio::io::duplex(1 << 20);
    let gateway = Lane::start(
        a,
        keys(Role::Listener),
        LaneConfig::default(),
        LaneLink::alone(1 << 30),
    );
    let agent = Lane::start(
        b,
        keys(Role::Dialer),
        LaneConfig::default(),
        LaneLink::alone(1 << 30),
    );
    let text = b"a recognisable plaintext; ".repeat(150);
    let mut s = gateway.open().await.unwrap();
    s.write_all(&text).await.unwrap();
    // Its open (gathered into a record), then its data (a record of its own).
    let expected = (RECORD_HEADER + HEADER_LEN + TAG_LEN) * 2 + text.len();
    let mut wire = vec![0u8; expected];
    from_gateway.read_exact(&mut wire).await.unwrap();
    assert!(!wire.windows(16).any(|w| w == &text[..16]));
    to_agent.write_all(&wire).await.unwrap();
    let mut t = agent.accept().await.unwrap();
    let mut got = vec![0u8; text.len()];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(got, text);

    // One flipped bit in the next record ends the lane.
    s.write_all(b"more").await.unwrap();
    let mut wire = vec![0u8; RECORD_HEADER + HEADER_LEN + 4 + TAG_LEN];
    from_gateway.read_exact(&mut wire).await.unwrap();
    wire[RECORD_HEADER + 2] ^= 1;
    to_agent.write_all(&wire).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), agent.closed())
        .await
        .expect("a tampered record ends the lane");
    let e = t.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn garbage_ends_the_lane() {
    let (a, mut b) = tokio::io::duplex(4096);
    let lane = Lane::start(
        a,
        keys(Role::Listener),
        LaneConfig::default(),
        LaneLink::alone(1 << 30),
    );
    b.write_all(&[0xff; 9]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), lane.closed())
        .await
        .unwrap();
}

/// A pair whose gateway side has `budget` bytes of windows and whose
/// keep-alive is `keep_alive`.
fn pair_with(budget: u64, keep_alive: Duration) -> (Arc<Lane>, Arc<Lane>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let cfg = LaneConfig {
        keep_alive,
        ..LaneConfig::default()
    };
    (
        Lane::start(a, keys(Role::Dialer), cfg, LaneLink::alone(1 << 30)),
        Lane::start(b, keys(Role::Listener), cfg, LaneLink::alone(budget)),
    )
}

/// One echo round trip of `n` bytes on a fresh stream.
async fn round_trip(agent: &Lane, gateway: &Lane, n: usize) -> Vec<u8> {
    let mut s = gateway.open().await.unwrap();
    let mut t = agent.accept().await.unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let echo = tokio::spawn(async move {
        let mut got = Vec::new();
        t.read_to_end(&mut got).await.unwrap();
        t.write_all(&got).await.unwrap();
        t.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    echo.await.unwrap();
    assert_eq!(back, data);
    back
}

#[tokio::test]
async fn stalled_readers_cost_their_windows_and_never_the_lane() {
    // 300 streams whose gateway-side readers never read, each sent more
    // than any window by the agent: the gateway's reader keeps reading,
    // its windows stay inside the budget (plus the small floor of streams
    // opened with it spent), and other streams keep making round trips.
    let budget = 8 << 20;
    let (agent, gateway) = pair_with(budget, Duration::from_secs(10));
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let s = gateway.open().await.unwrap();
        let mut t = agent.accept().await.unwrap();
        tokio::spawn(async move {
            let _ = t.write_all(&vec![7u8; 4 << 20]).await;
            std::future::pending::<()>().await;
            drop(t);
        });
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = gateway.committed();
    assert!(
        committed <= budget + 300 * u64::from(MIN_WINDOW),
        "windows committed {committed} past the budget"
    );
    for i in 0..20 {
        tokio::time::timeout(
            Duration::from_secs(2),
            round_trip(&agent, &gateway, 1000 + i * 5000),
        )
        .await
        .expect("a round trip beside the stalled streams");
    }
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        gateway.committed(),
        0,
        "closed streams give their windows back"
    );
}

#[tokio::test]
async fn a_reset_never_overtakes_its_own_open_or_data() {
    // Connect-and-reset, many times: the agent sees every stream it accepts
    // end (its data, then the reset), none left open for a stream the
    // gateway forgot.
    let (agent, gateway) = pair(LaneConfig::default());
    for _ in 0..200 {
        let mut s = gateway.open().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        drop(s);
    }
    for _ in 0..200 {
        let mut t = tokio::time::timeout(Duration::from_secs(2), agent.accept())
            .await
            .expect("every open arrives")
            .unwrap();
        let mut got = [0u8; 5];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let end = tokio::time::timeout(Duration::from_secs(2), t.read(&mut got))
            .await
            .expect("the reset arrives after the data");
        assert!(end.is_err(), "a reset, not {end:?}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((agent.streams(), gateway.streams()), (0, 0));
}

#[tokio::test]
async fn a_response_ends_whole_when_its_side_closes_first() {
    // The target answers and closes while the client still sends: the
    // agent's stream is dropped before the gateway's side finished, so it
    // resets, but after its data and fin.
    let (agent, gateway) = pair(LaneConfig::default());
    let mut s = gateway.open().await.unwrap();
    s.write_all(b"request that never ends").await.unwrap();
    let mut t = agent.accept().await.unwrap();
    let response: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let sent = response.clone();
    tokio::spawn(async move {
        t.write_all(&sent).await.unwrap();
        t.shutdown().await.unwrap();
        drop(t);
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), response.len());
    assert!(got == response);
}

#[tokio::test]
async fn a_closing_lane_sends_what_was_queued() {
    let (agent, gateway) = pair(LaneConfig::default());
    let mut s = gateway.open().await.unwrap();
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    gateway.close();
    let mut t = agent.accept().await.expect("the open was sent");
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
}

#[tokio::test]
async fn back_pressure_longer_than_the_silence_limit_keeps_the_lane() {
    // Silence limit 300 ms; a stream stalled for 1.5 s while the agent keeps
    // pushing into it, and another stream used after.
    let (agent, gateway) = pair_with(64 << 20, Duration::from_millis(100));
    let stalled = gateway.open().await.unwrap();
    let mut t = agent.accept().await.unwrap();
    tokio::spawn(async move {
        let _ = t.write_all(&vec![1u8; 8 << 20]).await;
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!gateway.is_closed() && !agent.is_closed());
    round_trip(&agent, &gateway, 100_000).await;
    drop(stalled);
}

#[tokio::test]
async fn a_peer_opening_past_the_limit_without_reading_ends_the_lane() {
    // The gateway's side opens stream after stream past the agent's limit
    // and never reads the refusals: the agent's queue is bounded, so the
    // lane ends (on ecf9cf7 the refusals went on an unbounded queue and the
    // agent's memory grew with every open).
    let (ours, mut theirs) = tokio::io::duplex(4096);
    let cfg = LaneConfig {
        max_streams: 1,
        ..LaneConfig::default()
    };
    let agent = Lane::start(ours, keys(Role::Dialer), cfg, LaneLink::alone(1 << 30));
    let mut gateway = keys(Role::Listener);
    let opens = tokio::spawn(async move {
        for batch in 0..200u32 {
            let mut plain = Vec::new();
            for i in 0..100u32 {
                let id = 2 * (batch * 100 + i + 1);
                plain.extend_from_slice(&Header::new(id, Kind::Open, 65536).encode());
            }
            let record = gateway.seal_copy(&plain).unwrap();
            if theirs.write_all(&record).await.is_err() {
                break;
            }
        }
        theirs
    });
    tokio::time::timeout(Duration::from_secs(5), agent.closed())
        .await
        .expect("the lane ends instead of queueing refusals without end");
    drop(opens);
}
