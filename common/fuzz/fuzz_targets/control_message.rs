//! Control frames (hello / welcome / refused) both ends read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaygate_common::protocol::{decode_control, read_control};

fuzz_target!(|data: &[u8]| {
    let _ = decode_control(data);
    // the framed reader too: length prefix + body
    let _ = futures::executor::block_on(read_control(&mut &data[..]));
});
