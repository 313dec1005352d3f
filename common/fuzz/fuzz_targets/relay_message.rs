//! Circuit relay v2 hop and stop messages, as the gateway's relay hop reads
//! them from any connected peer (and stop answers from reserved peers).
#![no_main]
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use relaygate_common::circuit::{decode_frame, read_message, HopMessage, StopMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_frame::<HopMessage>(data) {
        let _ = (m.kind(), m.peer_id());
        // What decodes must encode and decode to the same message. Not through
        // decode_frame: re-encoding may grow past MAX_MESSAGE (a 5-byte
        // negative enum becomes 10 bytes, omitted required fields appear).
        let again = prost::Message::encode_length_delimited_to_vec(&m);
        let back = <HopMessage as prost::Message>::decode_length_delimited(again.as_slice());
        assert_eq!(back.ok(), Some(m));
    }
    if let Ok(m) = decode_frame::<StopMessage>(data) {
        let _ = m.status_answer();
    }
    // The streaming reader must agree with the in-memory decoder.
    let mut cur = futures::io::Cursor::new(data);
    let streamed = block_on(read_message::<HopMessage, _>(&mut cur)).ok();
    if let Some(m) = streamed {
        assert_eq!(decode_frame::<HopMessage>(data).ok(), Some(m));
    }
});
