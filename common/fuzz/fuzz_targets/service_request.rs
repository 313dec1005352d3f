//! The service request a visitor agent sends first on a service stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaygate_common::protocol::ServiceRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((r, used))) = ServiceRequest::decode(data) {
        assert_eq!(r.encode(), &data[..used]);
    }
});
