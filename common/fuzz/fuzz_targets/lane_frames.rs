//! Bytes from the other end of a lane (frames of many streams), sealed into
//! records with the peer's keys, into a real lane on the agent's side, which
//! accepts streams: it must end cleanly or with an error, never panic or
//! hang. The first byte sizes the records, so frames also straddle them; with
//! its top bit set the rest goes unsealed, as garbage from a stranger.
#![no_main]
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use relaygate_common::lane::{Lane, LaneConfig, LaneKeys, LaneLink, Role, MAX_RECORD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let secret = [9u8; 32];
        let lane = Lane::start(
            ours,
            LaneKeys::from_secret(&secret, Role::Dialer),
            LaneConfig::default(),
            LaneLink::alone(64 << 20),
        );
        let mut peer = LaneKeys::from_secret(&secret, Role::Listener);
        let (first, frames) = data.split_first().map_or((0, data), |(f, r)| (*f, r));
        if first & 0x80 != 0 {
            let _ = theirs.write_all(frames).await;
        } else {
            let size = 1 + usize::from(first & 0x7f) * 64;
            for plain in frames.chunks(size.min(MAX_RECORD)) {
                let Ok(record) = peer.seal_copy(plain) else {
                    break;
                };
                if theirs.write_all(&record).await.is_err() {
                    break;
                }
            }
        }
        drop(theirs);
        // Every stream the bytes opened is read to its end or reset.
        let drain = async {
            while let Some(mut s) = lane.accept().await {
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), drain).await;
        assert!(ended.is_ok(), "the lane did not end after its connection did");
    });
});
