//! Data/end/reset frames on tunnel streams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prometheus_client::metrics::counter::Counter;
use relaygate_common::{meter::Tally, splice::frames_to_raw};

// The splice waits, with a timer, for a stream's own end after an END frame.
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
    let counter = Counter::default();
    let mut out = Vec::new();
    if let Ok(n) = runtime().block_on(frames_to_raw(data, &mut out, Tally::new(&counter))) {
        assert_eq!(n as usize, out.len());
    }
});
