//! PROXY v1/v2 headers the gateway reads from trusted balancers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaygate_common::proxy;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, used))) = proxy::decode(data) {
        assert!(used <= data.len() && used <= proxy::MAX_HEADER);
        // a decoded v2 header re-encodes to something that decodes to the same source
        if let (Some(s), Some(d)) = (h.source, h.destination) {
            let again = proxy::encode(proxy::ProxyVersion::V2, s, d, h.peer_id.as_ref());
            let (h2, _) = proxy::decode(&again).expect("re-encoded header decodes").expect("complete");
            assert_eq!(h2.source.map(proxy::canonical), Some(proxy::canonical(s)));
        }
    }
    let _ = futures::executor::block_on(proxy::read_header(&mut &data[..]));
});
