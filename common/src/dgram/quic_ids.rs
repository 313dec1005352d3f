//! QUIC connection ids, read through the version-independent invariants of
//! RFC 8999 only: how the gateway learns that a remote really receives at
//! the address it sends from, without decrypting anything.
//!
//! A long header is `byte0 & 0x80 | u32 version | u8 dcid_len | dcid |
//! u8 scid_len | scid`; a short header is `byte0 | dcid` (length not on the
//! wire). The node picks its Source Connection IDs at random and the remote
//! must echo one as the Destination Connection ID of its later packets: a
//! spoofer, which never sees the node's packets, cannot.

/// Most connection-id bytes a QUIC version may use (RFC 8999, 5.1).
pub const MAX_CID: usize = 255;

/// The Source Connection ID of a long-header packet (the node's choice),
/// except Version Negotiation (version 0), whose SCID only echoes the
/// remote's DCID.
pub fn long_scid(pkt: &[u8]) -> Option<&[u8]> {
    let first = *pkt.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    let version = pkt.get(1..5)?;
    if version == [0, 0, 0, 0] {
        return None;
    }
    let dlen = *pkt.get(5)? as usize;
    let slen_at = 6 + dlen;
    let slen = *pkt.get(slen_at)? as usize;
    let scid = pkt.get(slen_at + 1..slen_at + 1 + slen)?;
    (!scid.is_empty()).then_some(scid)
}

/// Whether a packet from the remote is addressed to one of `ids` (SCIDs the
/// node sent it): a long header's DCID equal to one, or a short header's
/// bytes after the first starting with one.
pub fn addressed_to<'a>(pkt: &[u8], mut ids: impl Iterator<Item = &'a [u8]>) -> bool {
    let Some(&first) = pkt.first() else {
        return false;
    };
    if first & 0x80 != 0 {
        let (Some(&dlen), true) = (pkt.get(5), pkt.len() > 5) else {
            return false;
        };
        let Some(dcid) = pkt.get(6..6 + dlen as usize) else {
            return false;
        };
        !dcid.is_empty() && ids.any(|id| id == dcid)
    } else {
        ids.any(|id| !id.is_empty() && pkt.get(1..1 + id.len()) == Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(version: [u8; 4], dcid: &[u8], scid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc3];
        p.extend_from_slice(&version);
        p.push(dcid.len() as u8);
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        p.extend_from_slice(&[0u8; 40]);
        p
    }

    #[test]
    fn reads_the_node_scid_and_matches_the_remote_dcid() {
        let node = long([0, 0, 0, 1], b"remote01", b"nodescid");
        let scid = long_scid(&node).unwrap();
        assert_eq!(scid, b"nodescid");
        // The remote's next Initial/Handshake, and its 1-RTT packets.
        let reply = long([0, 0, 0, 1], b"nodescid", b"remote01");
        assert!(addressed_to(&reply, [scid].into_iter()));
        let mut short = vec![0x41];
        short.extend_from_slice(b"nodescid");
        short.extend_from_slice(&[7; 30]);
        assert!(addressed_to(&short, [scid].into_iter()));
        // A spoofer's guesses do not match.
        let guess = long([0, 0, 0, 1], b"guess123", b"x");
        assert!(!addressed_to(&guess, [scid].into_iter()));
        assert!(!addressed_to(&[0x41, b'n'], [scid].into_iter()));
        assert!(!addressed_to(&[], [scid].into_iter()));
    }

    #[test]
    fn version_negotiation_and_garbage_give_no_ids() {
        assert_eq!(long_scid(&long([0, 0, 0, 0], b"a", b"b")), None);
        assert_eq!(long_scid(&[0x40, 1, 2, 3]), None); // short header
        assert_eq!(long_scid(&[0xc0, 0, 0, 0, 1, 200]), None); // dcid past the end
        assert_eq!(long_scid(&long([0, 0, 0, 1], b"a", b"")), None);
        for n in 0..20 {
            let p = long([0, 0, 0, 1], b"12345678", b"abcdefgh");
            let _ = long_scid(&p[..n]);
            let _ = addressed_to(&p[..n], [&b"abcdefgh"[..]].into_iter());
        }
    }
}
