//! PROXY protocol (HAProxy spec v1 and v2), through the `ppp` crate: written
//! by the agent toward targets that read it, read by the gateway from trusted
//! load balancers in front of it.
//!
//! relaygate reserves PROXY v2 TLV type [`PEER_ID_TLV`] (0xE1, in the spec's
//! custom range 0xE0-0xEF) for the remote's libp2p peer id, as the bytes of
//! the multihash (`PeerId::to_bytes`), when the remote is authenticated.

use std::net::{IpAddr, SocketAddr};

use libp2p::PeerId;
use ppp::{v1, v2, PartialResult};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// TLV type carrying the remote's libp2p peer id in a PROXY v2 header.
pub const PEER_ID_TLV: u8 = 0xE1;
/// Longest header accepted (v1 is at most 107 bytes; v2 with TLVs is bounded here).
pub const MAX_HEADER: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("malformed PROXY header: {0}")]
    Invalid(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("connection ended inside the PROXY header")]
    Truncated,
    #[error("no PROXY header where one is required")]
    Missing,
    #[error("i/o while reading the PROXY header: {0}")]
    Io(String),
}

/// What a PROXY header said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// `None` for `UNKNOWN` (v1) and `LOCAL` (v2) headers: use the socket's own address.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub peer_id: Option<PeerId>,
}

/// Encodes a header for a TCP connection from `source` to `destination`.
pub fn encode(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    peer: Option<&PeerId>,
) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        ProxyVersion::V1 => v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => {
            let mut b = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                v2::Addresses::from((source, destination)),
            );
            let peer_bytes = peer.map(|p| p.to_bytes());
            if let Some(bytes) = &peer_bytes {
                match b.write_tlv(PEER_ID_TLV, bytes.as_slice()) {
                    Ok(next) => b = next,
                    Err(_) => unreachable_builder(),
                }
            }
            b.build().unwrap_or_default()
        }
    }
}

/// A PROXY v2 header naming a libp2p caller: its peer id in TLV 0xE1, and its
/// address when it is known (a direct connection). A relayed caller has no
/// address the target could use: its source is `0.0.0.0:0`. (An UNSPEC family
/// would be more literal, but parsers disagree on where its TLVs start.)
pub fn encode_v2_for_peer(addrs: Option<(SocketAddr, SocketAddr)>, peer: &PeerId) -> Vec<u8> {
    let (s, d) = addrs.unwrap_or((
        SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::from(([0, 0, 0, 0], 0)),
    ));
    let (s, d) = same_family(s, d);
    let b = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        v2::Addresses::from((s, d)),
    );
    match b.write_tlv(PEER_ID_TLV, peer.to_bytes().as_slice()) {
        Ok(b) => b.build().unwrap_or_default(),
        Err(_) => unreachable_builder(),
    }
}

// The builder only fails on a write to its own Vec, which cannot fail.
fn unreachable_builder() -> ! {
    panic!("PROXY v2 builder failed writing to memory")
}

/// Both addresses in one family, as the headers require (v4 becomes v4-mapped v6 when mixed).
fn same_family(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(s), canonical(d));
    match (s.ip(), d.ip()) {
        (IpAddr::V4(a), IpAddr::V6(_)) => {
            (SocketAddr::new(IpAddr::V6(a.to_ipv6_mapped()), s.port()), d)
        }
        (IpAddr::V6(_), IpAddr::V4(b)) => {
            (s, SocketAddr::new(IpAddr::V6(b.to_ipv6_mapped()), d.port()))
        }
        _ => (s, d),
    }
}

/// `::ffff:a.b.c.d` -> `a.b.c.d`.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether `buf` starts like a PROXY header (or is a prefix of one).
pub fn looks_like_proxy(buf: &[u8]) -> bool {
    let n = buf.len();
    n > 0
        && (b"PROXY ".starts_with(&buf[..n.min(6)])
            || v2::PROTOCOL_PREFIX.starts_with(&buf[..n.min(v2::PROTOCOL_PREFIX.len())]))
}

/// Whether `buf` starts with a complete PROXY signature (v1 `PROXY ` or the v2 prefix).
pub fn has_signature(buf: &[u8]) -> bool {
    buf.starts_with(b"PROXY ") || buf.starts_with(v2::PROTOCOL_PREFIX)
}

/// Watches a client's first bytes for a PROXY header of its own, also when
/// its signature arrives split over several reads: a client must never name
/// its own source to a target that reads PROXY.
#[derive(Debug, Default)]
pub struct SpoofCheck {
    /// The first bytes, as many as the longer signature (v2's 12).
    seen: [u8; 12],
    len: usize,
}

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Spoof {
    /// They start a PROXY signature: refuse the connection.
    Header,
    /// They cannot start one: stop watching.
    Clean,
    /// A signature's beginning, too short to tell: keep watching.
    Undecided,
}

impl SpoofCheck {
    pub fn feed(&mut self, bytes: &[u8]) -> Spoof {
        let take = bytes.len().min(self.seen.len() - self.len);
        self.seen[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        let seen = &self.seen[..self.len];
        if has_signature(seen) {
            Spoof::Header
        } else if seen.is_empty() || looks_like_proxy(seen) {
            Spoof::Undecided
        } else {
            Spoof::Clean
        }
    }
}

/// Decodes a header at the start of `buf`: `Ok(None)` wants more bytes,
/// `Ok(Some((header, len)))` used `len` bytes.
pub fn decode(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if !looks_like_proxy(buf) {
        return Err(ProxyError::Missing);
    }
    if buf[0] == b'P' {
        // v1 is one line; parse only once it is complete.
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() >= 107 {
                Err(ProxyError::TooLong)
            } else {
                Ok(None)
            };
        };
        let r = v1::Header::try_from(&buf[..end + 2]);
        let h = r.map_err(|e| ProxyError::Invalid(e.to_string()))?;
        let len = h.header.len();
        let (source, destination) = match h.addresses {
            v1::Addresses::Tcp4(a) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            v1::Addresses::Tcp6(a) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            v1::Addresses::Unknown => (None, None),
        };
        return Ok(Some((
            ProxyHeader {
                source,
                destination,
                peer_id: None,
            },
            len,
        )));
    }
    let r = v2::Header::try_from(buf);
    if r.is_incomplete() {
        return if buf.len() >= MAX_HEADER {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    }
    let h = r.map_err(|e| ProxyError::Invalid(e.to_string()))?;
    let len = h.len();
    if len > MAX_HEADER {
        return Err(ProxyError::TooLong);
    }
    let (mut source, mut destination) = (None, None);
    if h.command == v2::Command::Proxy {
        match h.addresses {
            v2::Addresses::IPv4(a) => {
                source = Some(SocketAddr::from((a.source_address, a.source_port)));
                destination = Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                )));
            }
            v2::Addresses::IPv6(a) => {
                source = Some(canonical(SocketAddr::from((
                    a.source_address,
                    a.source_port,
                ))));
                destination = Some(canonical(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))));
            }
            v2::Addresses::Unspecified | v2::Addresses::Unix(_) => {}
        }
    }
    let mut peer_id = None;
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| ProxyError::Invalid(e.to_string()))?;
        if tlv.kind == PEER_ID_TLV {
            peer_id = Some(
                PeerId::from_bytes(&tlv.value)
                    .map_err(|_| ProxyError::Invalid("peer id TLV".into()))?,
            );
        }
    }
    Ok(Some((
        ProxyHeader {
            source,
            destination,
            peer_id,
        },
        len,
    )))
}

/// Reads a header from the start of `r`. Returns it (None when the stream
/// does not start with one) and the bytes read past it, which belong to the stream.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Option<ProxyHeader>, Vec<u8>), ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let header = read_header_into(r, &mut buf).await?;
    Ok((header, buf))
}

/// [`read_header`] into a buffer the caller keeps: if the read is abandoned
/// (a timeout), the bytes read so far are still there. On success `buf`
/// holds the bytes past the header.
pub async fn read_header_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<ProxyHeader>, ProxyError> {
    let mut chunk = [0u8; 256];
    loop {
        if !buf.is_empty() && !looks_like_proxy(buf) {
            return Ok(None);
        }
        if let Some((h, used)) = decode(buf)? {
            buf.drain(..used);
            return Ok(Some(h));
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| ProxyError::Io(e.to_string()))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ProxyError::Missing
            } else {
                ProxyError::Truncated
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_split_over_reads_is_still_seen() {
        let mut c = SpoofCheck::default();
        assert_eq!(c.feed(b"PR"), Spoof::Undecided);
        assert_eq!(c.feed(b"OX"), Spoof::Undecided);
        assert_eq!(c.feed(b"Y TCP4 1.2.3.4"), Spoof::Header);
        let mut binary = SpoofCheck::default();
        for b in v2::PROTOCOL_PREFIX.iter().take(11) {
            assert_eq!(binary.feed(&[*b]), Spoof::Undecided);
        }
        assert_eq!(binary.feed(&v2::PROTOCOL_PREFIX[11..]), Spoof::Header);
        let mut clean = SpoofCheck::default();
        assert_eq!(clean.feed(b"PRI * HTTP/2.0"), Spoof::Clean);
        assert_eq!(
            SpoofCheck::default().feed(b"\x13/multistream"),
            Spoof::Clean
        );
    }

    fn addrs(s: &str, d: &str) -> (SocketAddr, SocketAddr) {
        (s.parse().unwrap(), d.parse().unwrap())
    }

    #[test]
    fn v1_and_v2_round_trip_v4_and_v6() {
        let peer = PeerId::random();
        for (s, d) in [
            addrs("203.0.113.5:40000", "198.51.100.1:20001"),
            addrs("[2001:db8::5]:40000", "[2001:db8::1]:20001"),
            addrs("203.0.113.5:40000", "[2001:db8::1]:20001"),
        ] {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut bytes = encode(v, s, d, Some(&peer));
                let len = bytes.len();
                bytes.extend_from_slice(b"payload");
                let (h, used) = decode(&bytes).unwrap().unwrap();
                assert_eq!(used, len, "{v:?}");
                assert_eq!(h.source.map(canonical), Some(canonical(s)), "{v:?}");
                assert_eq!(h.peer_id, (v == ProxyVersion::V2).then_some(peer), "{v:?}");
                for cut in 0..len {
                    assert!(
                        decode(&bytes[..cut]).unwrap().is_none(),
                        "{v:?} prefix {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n").is_err());
        assert!(decode(b"PROXY TCP9 x\r\n").is_err());
        assert!(decode(&[b'P'; 200]).is_err());
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(decode(&long).err(), Some(ProxyError::TooLong));
        let mut v2 = v2::PROTOCOL_PREFIX.to_vec();
        v2.extend_from_slice(&[0x99, 0x11, 0, 0]); // bad version
        assert!(decode(&v2).is_err());
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        huge.resize(MAX_HEADER + 10, 0);
        assert!(decode(&huge).is_err());
        assert!(!looks_like_proxy(b"GET / HTTP/1.1"));
        assert!(looks_like_proxy(b"PRO"));
        assert!(looks_like_proxy(&v2::PROTOCOL_PREFIX[..5]));
    }

    #[tokio::test]
    async fn reader_keeps_bytes_after_the_header() {
        let (s, d) = addrs("203.0.113.5:40000", "198.51.100.1:20001");
        let mut bytes = encode(ProxyVersion::V2, s, d, None);
        bytes.extend_from_slice(b"hello");
        let (h, rest) = read_header(&mut &bytes[..]).await.unwrap();
        assert_eq!(h.and_then(|h| h.source), Some(s));
        assert_eq!(rest, b"hello");
        let (h, rest) = read_header(&mut &b"GET / HTTP/1.0\r\n"[..]).await.unwrap();
        assert!(h.is_none());
        assert_eq!(
            rest, b"GET / HTTP/1.0\r\n",
            "bytes of a stream without header are kept"
        );
        assert_eq!(
            read_header(&mut &b"PROXY TCP4 1.2"[..]).await.err(),
            Some(ProxyError::Truncated)
        );
    }

    #[test]
    fn v2_for_a_relayed_peer_carries_only_the_peer_id() {
        let peer = PeerId::random();
        let h = encode_v2_for_peer(None, &peer);
        let (got, used) = decode(&h).unwrap().unwrap();
        assert_eq!(used, h.len());
        assert_eq!(got.source, Some(SocketAddr::from(([0, 0, 0, 0], 0))));
        assert_eq!(got.peer_id, Some(peer));
        let s: SocketAddr = "203.0.113.20:4000".parse().unwrap();
        let d: SocketAddr = "198.18.1.2:5000".parse().unwrap();
        let (got, _) = decode(&encode_v2_for_peer(Some((s, d)), &peer))
            .unwrap()
            .unwrap();
        assert_eq!((got.source, got.peer_id), (Some(s), Some(peer)));
    }
}
