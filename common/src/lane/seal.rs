//! The lane's record protection. Once the TLS 1.3 handshake has proven both
//! peer ids, frames travel in records sealed with AES-128-GCM under keys
//! exported from that handshake (RFC 8446, section 7.5), one key per
//! direction.
//!
//! Why not TLS's own records: rustls copies every byte into its records and
//! out of them again (6-11% of each side's CPU, docs/performance.md), and a
//! TLS record holds at most 16 KiB. These records are sealed and opened in
//! place, in the buffers the data was read into: a large data frame is a
//! record of its own, small frames are gathered into one.
//!
//! A record is `u32 length` (big-endian, authenticated as associated data),
//! `length` bytes of sealed frames, then the 16-byte tag. The nonce is the
//! direction's IV xor the record's sequence number, so a dropped, repeated or
//! reordered record fails to open. AES-128-GCM is TLS 1.3's mandatory suite
//! and cheaper per byte than AES-256 (10 rounds, not 14). The key changes
//! every 2^16 records: about 4 GiB under one key at most, far inside
//! AES-GCM's limits.

use std::ops::Range;

use aws_lc_rs::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN},
    hkdf::{KeyType, Prk, HKDF_SHA256},
};
use bytes::{Bytes, BytesMut};

use super::{
    frame::{HEADER_LEN, MAX_PAYLOAD},
    LaneError, Role,
};

/// The record's length prefix.
pub const RECORD_HEADER: usize = 4;
/// The AEAD tag after each record's sealed bytes.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record: one full data frame.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_PAYLOAD;
/// Where a data frame's payload starts in its buffer: after the record's
/// length and the frame's header, written in place before sealing.
pub const PAYLOAD_OFFSET: usize = RECORD_HEADER + HEADER_LEN;

/// The TLS exporter label both ends derive the lane's secret with.
pub(super) const EXPORTER_LABEL: &[u8] = b"EXPORTER-relaygate-lane-v1";
const RECORDS_PER_KEY: u64 = 1 << 16;

/// Both directions' record keys of one end of a lane.
pub struct LaneKeys {
    role: Role,
    seal: Sealer,
    open: Opener,
}

impl LaneKeys {
    /// Derives the keys from a secret both ends share (the handshake's
    /// exporter output); `role` is this end's side.
    pub fn from_secret(secret: &[u8; 32], role: Role) -> Self {
        let root = Prk::new_less_safe(HKDF_SHA256, secret);
        let dialer = Direction::new(&root, b"dialer to listener");
        let listener = Direction::new(&root, b"listener to dialer");
        let (ours, theirs) = match role {
            Role::Dialer => (dialer, listener),
            Role::Listener => (listener, dialer),
        };
        Self {
            role,
            seal: Sealer(ours),
            open: Opener(theirs),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub(super) fn split(self) -> (Sealer, Opener) {
        (self.seal, self.open)
    }

    /// Seals `plaintext` (whole frames) as the next record, copied: for
    /// tests and tools that speak the lane without the multiplexer.
    pub fn seal_copy(&mut self, plaintext: &[u8]) -> Result<Bytes, LaneError> {
        let mut record = BytesMut::with_capacity(RECORD_HEADER + plaintext.len() + TAG_LEN);
        record.resize(RECORD_HEADER, 0);
        record.extend_from_slice(plaintext);
        self.seal.seal(&mut record)?;
        Ok(record.freeze())
    }
}

/// One direction: its key generation, IV and the next record's number.
struct Direction {
    secret: Prk,
    iv: [u8; NONCE_LEN],
    seq: u64,
    key: LessSafeKey,
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Direction {
    fn new(root: &Prk, label: &[u8]) -> Self {
        let mut secret = [0u8; 32];
        let mut iv = [0u8; NONCE_LEN];
        // Lengths within HKDF-SHA256's bound cannot fail.
        let _ = root
            .expand(&[label], Len(secret.len()))
            .and_then(|okm| okm.fill(&mut secret));
        let secret = Prk::new_less_safe(HKDF_SHA256, &secret);
        let _ = secret
            .expand(&[b"iv"], Len(iv.len()))
            .and_then(|okm| okm.fill(&mut iv));
        let key = generation_key(&secret, 0);
        Self {
            secret,
            iv,
            seq: 0,
            key,
        }
    }

    /// The next record's nonce, moving to the next key every
    /// `RECORDS_PER_KEY` records.
    fn next_nonce(&mut self) -> Result<Nonce, LaneError> {
        if self.seq > 0 && self.seq.is_multiple_of(RECORDS_PER_KEY) {
            self.key = generation_key(&self.secret, self.seq / RECORDS_PER_KEY);
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(LaneError::Protocol("record numbers exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn generation_key(secret: &Prk, generation: u64) -> LessSafeKey {
    let generation = generation.to_be_bytes();
    let info: [&[u8]; 2] = [b"key", &generation];
    // AES_128_GCM's key length is within HKDF-SHA256's bound: this cannot fail.
    let okm = secret.expand(&info, &AES_128_GCM);
    match okm {
        Ok(okm) => LessSafeKey::new(UnboundKey::from(okm)),
        Err(_) => unreachable!("a 32-byte key is within HKDF-SHA256's output bound"),
    }
}

/// A record's plaintext length, checked: both ends hold records to the same bounds.
fn bounded(len: usize) -> Result<usize, LaneError> {
    if len == 0 || len > MAX_RECORD {
        return Err(LaneError::Protocol("record size out of bounds"));
    }
    Ok(len)
}

/// Seals this end's records.
pub(super) struct Sealer(Direction);

impl Sealer {
    /// Seals `record[RECORD_HEADER..]` in place: writes the length in front
    /// and appends the tag (into spare capacity when the caller left some).
    pub(super) fn seal(&mut self, record: &mut BytesMut) -> Result<(), LaneError> {
        let len = bounded(record.len() - RECORD_HEADER)?;
        record[..RECORD_HEADER].copy_from_slice(&(len as u32).to_be_bytes());
        let nonce = self.0.next_nonce()?;
        let (head, body) = record.split_at_mut(RECORD_HEADER);
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*head), body)
            .map_err(|_| LaneError::Protocol("sealing a record failed"))?;
        record.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens the peer's records.
pub(super) struct Opener(Direction);

impl Opener {
    /// The whole size of the record at the start of `buf` (length, sealed
    /// bytes and tag), once its length has arrived.
    pub(super) fn record_len(buf: &[u8]) -> Result<Option<usize>, LaneError> {
        let Some(len) = buf.first_chunk::<RECORD_HEADER>() else {
            return Ok(None);
        };
        let len = bounded(u32::from_be_bytes(*len) as usize)?;
        Ok(Some(RECORD_HEADER + len + TAG_LEN))
    }

    /// Opens one whole record in place; returns where its plaintext lies.
    pub(super) fn open(&mut self, record: &mut [u8]) -> Result<Range<usize>, LaneError> {
        let nonce = self.0.next_nonce()?;
        let (head, body) = record.split_at_mut(RECORD_HEADER);
        let plain = self
            .0
            .key
            .open_in_place(nonce, Aad::from(&*head), body)
            .map_err(|_| LaneError::Protocol("a record failed authentication"))?;
        Ok(RECORD_HEADER..RECORD_HEADER + plain.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];

    fn open_copy(o: &mut Opener, record: &[u8]) -> Result<Vec<u8>, LaneError> {
        let mut r = record.to_vec();
        assert_eq!(Opener::record_len(&r).unwrap(), Some(r.len()));
        let plain = o.open(&mut r)?;
        Ok(r[plain].to_vec())
    }

    #[test]
    fn records_open_on_the_other_side_only_in_order_and_intact() {
        let mut dialer = LaneKeys::from_secret(&SECRET, Role::Dialer);
        let (_, mut listener) = LaneKeys::from_secret(&SECRET, Role::Listener).split();
        let a = dialer.seal_copy(b"first frames").unwrap();
        let b = dialer.seal_copy(b"second frames").unwrap();
        assert!(
            !a.windows(5).any(|w| w == b"first"),
            "sealed bytes hide the plaintext"
        );
        assert_eq!(open_copy(&mut listener, &a).unwrap(), b"first frames");
        // a repeated record carries the wrong number
        assert!(open_copy(&mut listener, &a).is_err());

        let (_, mut fresh) = LaneKeys::from_secret(&SECRET, Role::Listener).split();
        // out of order
        assert!(open_copy(&mut fresh, &b).is_err());

        let (_, mut fresh) = LaneKeys::from_secret(&SECRET, Role::Listener).split();
        let mut tampered = a.to_vec();
        tampered[6] ^= 1;
        assert!(open_copy(&mut fresh, &tampered).is_err());

        // the sender's own direction does not open its records
        let (_, mut same) = LaneKeys::from_secret(&SECRET, Role::Dialer).split();
        assert!(open_copy(&mut same, &a).is_err());

        // another secret does not either
        let (_, mut other) = LaneKeys::from_secret(&[8; 32], Role::Listener).split();
        assert!(open_copy(&mut other, &a).is_err());
    }

    #[test]
    fn records_keep_opening_across_key_changes() {
        let mut dialer = LaneKeys::from_secret(&SECRET, Role::Dialer);
        let (_, mut listener) = LaneKeys::from_secret(&SECRET, Role::Listener).split();
        for i in 0..RECORDS_PER_KEY + 3 {
            let msg = i.to_be_bytes();
            let r = dialer.seal_copy(&msg).unwrap();
            assert_eq!(open_copy(&mut listener, &r).unwrap(), msg);
        }
        // each generation has a key of its own, and the sender moved to the second
        let d = &dialer.seal.0;
        let seal_with = |key: &LessSafeKey| {
            let mut b = *b"same";
            let nonce = Nonce::assume_unique_for_key(d.iv);
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::empty(), &mut b)
                .unwrap();
            (b, tag.as_ref().to_vec())
        };
        let (first, second) = (generation_key(&d.secret, 0), generation_key(&d.secret, 1));
        assert_ne!(seal_with(&first), seal_with(&second));
        assert_eq!(seal_with(&d.key), seal_with(&second));
    }

    #[test]
    fn sizes_out_of_bounds_are_refused() {
        assert!(Opener::record_len(&[0, 0, 0, 0]).is_err());
        let too_big = ((MAX_RECORD + 1) as u32).to_be_bytes();
        assert!(Opener::record_len(&too_big).is_err());
        assert_eq!(Opener::record_len(&[0, 0]).unwrap(), None);
        let mut k = LaneKeys::from_secret(&SECRET, Role::Dialer);
        assert!(k.seal_copy(&[]).is_err());
        assert!(k.seal_copy(&vec![0; MAX_RECORD + 1]).is_err());
        assert!(k.seal_copy(&vec![0; MAX_RECORD]).is_ok());
    }
}
