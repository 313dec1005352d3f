//! Data/end/reset frames on tunnel streams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prometheus_client::metrics::counter::Counter;
use relaygate_common::splice::frames_to_raw;

fuzz_target!(|data: &[u8]| {
    let counter = Counter::default();
    let mut out = Vec::new();
    if let Ok(n) = futures::executor::block_on(frames_to_raw(data, &mut out, &counter)) {
        assert_eq!(n as usize, out.len());
    }
});
