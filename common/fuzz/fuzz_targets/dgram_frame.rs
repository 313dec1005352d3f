//! The datagram channel's frames (UDP tunnels), as either end reads them,
//! and the QUIC connection ids the gateway reads from remotes' datagrams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaygate_common::dgram::{quic_ids, Frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        // whatever decodes must encode to bytes that decode to the same frame
        let again = f.encode();
        assert_eq!(Frame::decode(&again).ok(), Some(f));
    }
    let scid = quic_ids::long_scid(data);
    if let Some(id) = scid {
        assert!(!id.is_empty());
        let _ = quic_ids::addressed_to(data, [id].into_iter());
    }
    let _ = quic_ids::addressed_to(data, [&b"12345678"[..]].into_iter());
});
