//! Relay circuits whose reader stops (issue #14). A stranger opens circuits
//! to a member that sends on them, and never reads. The gateway cannot pass
//! the member's bytes on, so it stops reading them, and they wait unread in
//! the member's QUIC connection to the gateway, counted against its
//! connection window (4 MiB per stream, 16 MiB per connection: four such
//! circuits exhaust it). At 4462fed that froze every other circuit to the
//! member, and its session, until the two-minute idle timeout: this test's
//! honest round trips all timed out. Now a peer may have two circuits stalled
//! at once (half its connection window); one more ends the oldest, so the
//! member freezes at most for the 500 ms it takes to see a write wait.

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use relaygate_tests::{
    circuitpeer::{CircuitPeer, CircuitStream},
    stack::{eventually, here, metric_sum, Gateway, GatewaySpec, Transport},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(5);

async fn echo(mut s: CircuitStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// Sends until the circuit ends, once `go` is set: what a member serving a download does.
async fn flood(mut s: CircuitStream, mut go: tokio::sync::watch::Receiver<bool>) {
    if go.wait_for(|go| *go).await.is_err() {
        return;
    }
    let chunk = vec![0x5au8; 64 * 1024];
    while s.write_all(&chunk).await.is_ok() {}
}

/// `n` round trips of 64 bytes; the time of each, or an error naming the one that failed.
async fn round_trips(c: &mut CircuitStream, n: usize) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let msg = [i as u8; 64];
        let started = Instant::now();
        let trip = async {
            c.write_all(&msg).await?;
            c.flush().await?;
            let mut back = [0u8; 64];
            c.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        match tokio::time::timeout(ROUND_TRIP_LIMIT, trip).await {
            Ok(Ok(back)) if back == msg => times.push(started.elapsed()),
            Ok(Ok(_)) => return Err(format!("round trip {i}: wrong bytes back")),
            Ok(Err(e)) => return Err(format!("round trip {i}: {e}")),
            Err(_) => {
                return Err(format!(
                    "round trip {i}: nothing back in {ROUND_TRIP_LIMIT:?}"
                ))
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(times)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn a_stranger_that_stops_reading_its_circuits_cannot_freeze_a_members_connection() {
    let member_key = Keypair::generate_ed25519();
    let member_id = member_key.public().to_peer_id();
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: vec!["--set".into(), format!("admission.allow={member_id}")],
            ..Default::default()
        },
    );
    let relay = gw.addr(Transport::Quic);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stalled_closed = || {
        metric_sum(
            &gw.metrics(),
            "relaygate_gateway_relay_circuits_closed_total{reason=\"stalled\"}",
        )
    };
    let (baseline, onset, steady, fresh) = rt.block_on(async {
        let mut member = CircuitPeer::connect(&relay, member_key)
            .await
            .expect("member");
        member.reserve().await.expect("member reserves");
        let attacker = CircuitPeer::connect(&relay, Keypair::generate_ed25519())
            .await
            .expect("attacker");
        let honest = CircuitPeer::connect(&relay, Keypair::generate_ed25519())
            .await
            .expect("honest peer");
        let attacker_id = attacker.id;
        // The floods start once all attack circuits are open: they fill the
        // attacker's own connection window too, which would stop its next CONNECT.
        let (go, ready) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((src, s)) = member.next_circuit().await {
                if src == attacker_id {
                    tokio::spawn(flood(s, ready.clone()));
                } else {
                    tokio::spawn(echo(s));
                }
            }
        });

        let mut c = honest.circuit_to(member_id).await.expect("honest circuit");
        let baseline = round_trips(&mut c, 100)
            .await
            .expect("baseline round trips");

        // Eight circuits the member fills and the attacker never reads: 32 MiB
        // of the member's stream windows against its 16 MiB connection window.
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(
                attacker
                    .circuit_to(member_id)
                    .await
                    .expect("attack circuit"),
            );
        }
        let _ = go.send(true);
        // The onset: the member sends what the windows allow, at loopback
        // speed, until the gateway sees writes wait (500 ms) and ends the
        // circuits past the member's share.
        let onset = round_trips(&mut c, 50).await;
        let settled = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(10), || stalled_closed() >= 6.0)
        });
        // Two stalled circuits stay, holding half the member's connection window.
        let steady = round_trips(&mut c, 100).await;
        let mut c2 = honest.circuit_to(member_id).await.expect("a new circuit");
        let fresh = round_trips(&mut c2, 20).await;
        drop(held);
        assert!(
            settled,
            "the attacker's circuits past the share of two were ended and counted"
        );
        (baseline, onset, steady, fresh)
    });
    let onset = onset.expect("every honest round trip at the attack's onset");
    let steady = steady.expect("every honest round trip while stalled circuits are held");
    fresh.expect("a circuit opened during the attack works");
    let worst_onset = onset.iter().max().copied().unwrap_or_default();
    let (base, attacked) = (p99(baseline), p99(steady));
    eprintln!(
        "honest round trips: p99 {base:?} before the attack, {attacked:?} while it holds \
         two stalled circuits; slowest at its onset {worst_onset:?}"
    );
    assert!(
        worst_onset < Duration::from_secs(2),
        "a round trip at the onset took {worst_onset:?}"
    );
    // Loopback round trips take about a millisecond; 50 ms over twice the
    // baseline keeps the comparison about stalls (seconds), not scheduler
    // noise on two cores running everything at once.
    assert!(
        attacked <= base * 2 + Duration::from_millis(50),
        "p99 {attacked:?} during the attack, {base:?} before"
    );
}
