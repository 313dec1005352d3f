//! Wire format tests: round trips, limits, malformed input.

use tokio::io::AsyncWriteExt;

use super::*;
use crate::{
    lane::{LaneCount, MAX_LANES},
    names::LeasePort,
};

#[tokio::test]
async fn a_control_frame_is_read_as_it_arrives_and_a_short_one_is_truncated() {
    let msg = ControlMessage::DialbackResult {
        reachable: true,
        detail: "ok".into(),
    };
    let body = serde_json::to_vec(&msg).unwrap();
    let (mut a, mut b) = tokio::io::duplex(64);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let writer = tokio::spawn(async move {
        for byte in frame {
            b.write_all(&[byte]).await.unwrap();
        }
        // A frame that announces 64 KiB and ends after 10 bytes.
        b.write_all(&(64u32 * 1024).to_be_bytes()).await.unwrap();
        b.write_all(&[b'{'; 10]).await.unwrap();
    });
    assert_eq!(read_control(&mut a).await.unwrap(), msg);
    writer.await.unwrap();
    assert!(matches!(
        read_control(&mut a).await,
        Err(WireError::Truncated)
    ));
}

#[test]
fn a_logged_hello_hides_its_token() {
    let hello = ControlMessage::Hello(Hello {
        version: WIRE_VERSION,
        token: Some("rgt_supersecret".into()),
        tunnels: vec![],
        fleet: true,
        lease_lifecycle: true,
        paused: vec![],
    });
    let shown = format!("{hello:?}");
    assert!(
        !shown.contains("supersecret") && shown.contains("***"),
        "{shown}"
    );
}

fn header(src: &str, dst: &str) -> StreamHeader {
    StreamHeader {
        tunnel: "node".parse().unwrap(),
        source: src.parse().unwrap(),
        destination: dst.parse().unwrap(),
        peer: None,
    }
}

#[tokio::test]
async fn header_round_trips_v4_and_v6() {
    for h in [
        header("203.0.113.5:40000", "198.51.100.1:20001"),
        header("[2001:db8::5]:40000", "[2001:db8::1]:20001"),
        header("203.0.113.5:1", "[2001:db8::1]:65535"),
    ] {
        let mut bytes = h.encode();
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        assert_eq!(StreamHeader::read(&mut r).await.unwrap(), h);
        assert_eq!(r, b"payload", "header reader must not consume payload");
        // every strict prefix asks for more
        for cut in 0..h.encode().len() {
            assert!(
                StreamHeader::decode(&bytes[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
        }
    }
}

#[tokio::test]
async fn a_header_naming_the_dialers_peer_id_round_trips() {
    let peer = libp2p::PeerId::random();
    for h in [
        StreamHeader {
            peer: Some(peer),
            ..header("203.0.113.5:40000", "198.51.100.1:20001")
        },
        StreamHeader {
            peer: Some(peer),
            ..header("[2001:db8::5]:40000", "[2001:db8::1]:20001")
        },
    ] {
        let mut bytes = h.encode();
        assert_eq!(bytes[0], WIRE_VERSION as u8 | PEER_FLAG);
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        assert_eq!(StreamHeader::read(&mut r).await.unwrap(), h);
        assert_eq!(r, b"payload", "header reader must not consume payload");
        for cut in 0..h.encode().len() {
            assert!(
                StreamHeader::decode(&bytes[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
        }
    }
    // A peer id that is not one, or a length out of range, is refused.
    let good = StreamHeader {
        peer: Some(peer),
        ..header("203.0.113.5:40000", "198.51.100.1:20001")
    }
    .encode();
    let len_at = good.len() - peer.to_bytes().len() - 1;
    let mut v = good.clone();
    v[len_at] = 0;
    assert!(StreamHeader::decode(&v).is_err());
    let mut v = good.clone();
    v[len_at + 1] ^= 0xff;
    assert!(StreamHeader::decode(&v).is_err());
    // A service request never carries the flag.
    let mut req = ServiceRequest {
        service: "ssh".parse().unwrap(),
    }
    .encode();
    req[0] |= PEER_FLAG;
    assert!(matches!(
        ServiceRequest::decode(&req),
        Err(WireError::Version(_))
    ));
}

#[tokio::test]
async fn bad_headers_are_refused() {
    let good = header("203.0.113.5:40000", "198.51.100.1:20001").encode();
    let mut v = good.clone();
    v[0] = 9;
    assert!(matches!(
        StreamHeader::decode(&v),
        Err(WireError::Version(9))
    ));
    let mut v = good.clone();
    v[1] = 0;
    assert!(StreamHeader::decode(&v).is_err());
    let mut v = good.clone();
    v[2] = b' ';
    assert!(matches!(StreamHeader::decode(&v), Err(WireError::Name(_))));
    let mut v = good.clone();
    v[6] = 5; // family
    assert!(StreamHeader::decode(&v).is_err());
    let mut r = &good[..good.len() - 1];
    assert!(matches!(
        StreamHeader::read(&mut r).await,
        Err(WireError::Truncated)
    ));
}

#[tokio::test]
async fn control_frames_round_trip_and_reject_garbage() {
    let hello = ControlMessage::Hello(Hello {
        version: WIRE_VERSION,
        fleet: false,
        token: Some("t".into()),
        tunnels: vec![TunnelRequest {
            name: "node".parse().unwrap(),
            port: LeasePort::new(9905),
            proto: Proto::Tcp,
        }],
        lease_lifecycle: true,
        paused: vec!["off".parse().unwrap()],
    });
    let mut buf = Vec::new();
    write_control(&mut buf, &hello).await.unwrap();
    assert_eq!(read_control(&mut &buf[..]).await.unwrap(), hello);

    let mut r = &buf[..buf.len() - 1];
    assert!(matches!(
        read_control(&mut r).await,
        Err(WireError::Truncated)
    ));

    let welcome = ControlMessage::Welcome(Welcome {
        fleet: vec![FleetGateway {
            peer_id: "12D3KooWexample".into(),
            addresses: vec!["/ip4/203.0.113.7/udp/4001/quic-v1/p2p/12D3KooWexample".into()],
        }],
        fleet_hosts: vec![],
        node_claims: true,
        udp: Some(UdpOffer { port: 4002 }),
        version: WIRE_VERSION,
        public_hosts: vec!["/dns4/gw.example.com".into()],
        leases: vec![
            LeaseGrant {
                name: "a".parse().unwrap(),
                outcome: LeaseOutcome::Granted {
                    port: LeasePort::new(20000).unwrap(),
                },
            },
            LeaseGrant {
                name: "b".parse().unwrap(),
                outcome: LeaseOutcome::Refused {
                    code: LeaseRefusal::PortHeld,
                    message: "held".into(),
                },
            },
        ],
        lane_port: Some(4001),
        lanes: Some(4),
        lane_flow: Some(2),
        lease_retry: true,
    });
    let mut buf = Vec::new();
    write_control(&mut buf, &welcome).await.unwrap();
    assert_eq!(read_control(&mut &buf[..]).await.unwrap(), welcome);
    // Asked again after the welcome, and answered.
    for msg in [
        ControlMessage::Lease {
            tunnels: vec![TunnelRequest {
                name: "b".parse().unwrap(),
                port: None,
                proto: Proto::Tcp,
            }],
        },
        ControlMessage::Leases { leases: vec![] },
        ControlMessage::LeaseRevoked {
            tunnel: "b".parse().unwrap(),
            reason: "revoked by the operator".into(),
        },
    ] {
        let mut buf = Vec::new();
        write_control(&mut buf, &msg).await.unwrap();
        assert_eq!(read_control(&mut &buf[..]).await.unwrap(), msg);
    }
    assert!(LeaseRefusal::StoreFailed.is_transient() && !LeaseRefusal::PortHeld.is_transient());

    let huge = (MAX_CONTROL_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        read_control(&mut &huge[..]).await,
        Err(WireError::Oversized(_))
    ));

    assert!(matches!(
        decode_control(b"{\"type\":\"hello\"}"),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        decode_control(b"\xff\x00garbage"),
        Err(WireError::Malformed(_))
    ));
    // A welcome from an older gateway (no lane fields) and from a newer
    // one (fields this build does not know, a larger lane limit) decode.
    let older = br#"{"type":"welcome","version":1,"public_hosts":[],"leases":[]}"#;
    match decode_control(older) {
        Ok(ControlMessage::Welcome(w)) => assert_eq!((w.lane_port, w.lanes), (None, None)),
        other => panic!("older welcome: {other:?}"),
    }
    let newer = br#"{"type":"welcome","version":1,"public_hosts":[],"leases":[],"lane_port":4001,"lanes":12,"later":{"x":1}}"#;
    match decode_control(newer) {
        Ok(ControlMessage::Welcome(w)) => {
            assert_eq!(w.lanes.map(LaneCount::clamped), LaneCount::new(MAX_LANES))
        }
        other => panic!("newer welcome: {other:?}"),
    }
    // A hello from an agent before lease lifecycle: neither flag nor paused.
    let plain = br#"{"type":"hello","version":1,"tunnels":[]}"#;
    match decode_control(plain) {
        Ok(ControlMessage::Hello(h)) => assert!(!h.lease_lifecycle && h.paused.is_empty()),
        other => panic!("older hello: {other:?}"),
    }
    let v2 = br#"{"type":"hello","version":2,"tunnels":[]}"#;
    assert!(matches!(decode_control(v2), Err(WireError::Version(2))));
    let bad_name = br#"{"type":"hello","version":1,"tunnels":[{"name":"a b"}]}"#;
    assert!(matches!(
        decode_control(bad_name),
        Err(WireError::Malformed(_))
    ));
}

#[tokio::test]
async fn service_request_round_trips_and_rejects_bad_names() {
    let req = ServiceRequest {
        service: "ssh".parse().unwrap(),
    };
    let mut bytes = req.encode();
    bytes.extend_from_slice(b"payload");
    let mut r = &bytes[..];
    assert_eq!(ServiceRequest::read(&mut r).await.unwrap(), req);
    assert_eq!(r, b"payload", "no payload byte is consumed with the header");
    assert!(matches!(
        ServiceRequest::decode(&[1, 3, b'a', b' ', b'b']),
        Err(WireError::Name(_))
    ));
    assert!(matches!(
        ServiceRequest::decode(&[1, 0]),
        Err(WireError::Header(_))
    ));
    assert!(matches!(
        ServiceRequest::decode(&[9, 1, b'a']),
        Err(WireError::Version(9))
    ));
    assert!(matches!(
        ServiceRequest::read(&mut &[1u8, 5, b'a'][..]).await,
        Err(WireError::Truncated)
    ));
}

#[tokio::test]
async fn a_control_reader_cancelled_mid_frame_loses_nothing() {
    let frames = [
        ControlMessage::Lease { tunnels: vec![] },
        ControlMessage::Fleet { gateways: vec![] },
    ];
    let mut bytes = Vec::new();
    for f in &frames {
        write_control(&mut bytes, f).await.unwrap();
    }
    let (mut w, mut r) = tokio::io::duplex(64);
    tokio::spawn(async move {
        // A byte at a time, slower than the other branch below fires.
        for b in bytes {
            w.write_all(&[b]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    });
    let mut reader = ControlReader::default();
    let mut got = Vec::new();
    let mut cancelled = 0;
    while got.len() < frames.len() {
        tokio::select! {
            m = reader.next(&mut r) => got.push(m.unwrap()),
            () = tokio::time::sleep(std::time::Duration::from_millis(1)) => cancelled += 1,
        }
    }
    assert!(
        cancelled > 10,
        "the read was cancelled mid-frame ({cancelled} times)"
    );
    assert_eq!(got, frames);
}

#[test]
fn a_tcp_tunnel_request_says_nothing_of_proto_and_udp_ones_do() {
    let tcp = TunnelRequest {
        name: "node".parse().unwrap(),
        port: None,
        proto: Proto::Tcp,
    };
    let s = serde_json::to_string(&tcp).unwrap();
    assert!(!s.contains("proto"), "{s}");
    let udp = TunnelRequest {
        proto: Proto::Both,
        ..tcp
    };
    let s = serde_json::to_string(&udp).unwrap();
    assert!(s.contains(r#""proto":"both""#), "{s}");
    let back: TunnelRequest = serde_json::from_str(&s).unwrap();
    assert_eq!(back.proto, Proto::Both);
    assert!("quic".parse::<Proto>().is_err());
}
