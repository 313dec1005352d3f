//! The tunnel stream header the agent reads from the gateway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaygate_common::protocol::StreamHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, used))) = StreamHeader::decode(data) {
        // whatever decodes must encode back to the same bytes
        assert_eq!(h.encode(), &data[..used]);
    }
});
