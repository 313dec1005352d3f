//! The lane's frame header: `u32 stream | u8 kind | u32 length`, big-endian.
//! `Data` is followed by `length` payload bytes; for `Credit` the length is the
//! credit returned; for `Open` the opener's receive window (see `flow`);
//! every other kind has length zero.

use super::LaneError;

pub const HEADER_LEN: usize = 9;
/// Largest `Data` payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A new stream, opened by the side whose parity the id has; the length
    /// is the window its opener gives the peer (0 from a peer that names none).
    Open,
    Data,
    /// The sender will send no more on this stream (half-close).
    Fin,
    /// The sender abandoned the stream: its connection was reset.
    Reset,
    /// The receiver consumed `length` more bytes; the sender may send them.
    Credit,
    /// Keep-alive, stream 0.
    Ping,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Kind::Open,
            1 => Kind::Data,
            2 => Kind::Fin,
            3 => Kind::Reset,
            4 => Kind::Credit,
            5 => Kind::Ping,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            Kind::Open => 0,
            Kind::Data => 1,
            Kind::Fin => 2,
            Kind::Reset => 3,
            Kind::Credit => 4,
            Kind::Ping => 5,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub stream: u32,
    pub kind: Kind,
    pub len: u32,
}

impl Header {
    pub fn new(stream: u32, kind: Kind, len: u32) -> Self {
        Self { stream, kind, len }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.stream.to_be_bytes());
        h[4] = self.kind.byte();
        h[5..9].copy_from_slice(&self.len.to_be_bytes());
        h
    }

    /// Decodes and checks one header; the payload (for `Data`) follows it.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, LaneError> {
        let stream = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let kind = Kind::from_byte(h[4]).ok_or(LaneError::Protocol("unknown frame kind"))?;
        let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        match kind {
            Kind::Data if len as usize > MAX_PAYLOAD => {
                return Err(LaneError::Protocol("data frame over 64 KiB"))
            }
            Kind::Data if len == 0 => return Err(LaneError::Protocol("empty data frame")),
            Kind::Credit if len == 0 => return Err(LaneError::Protocol("zero credit")),
            Kind::Fin | Kind::Reset | Kind::Ping if len != 0 => {
                return Err(LaneError::Protocol("length on a frame without payload"))
            }
            _ => {}
        }
        if (stream == 0) != (kind == Kind::Ping) {
            return Err(LaneError::Protocol("stream 0 is for keep-alives only"));
        }
        Ok(Self { stream, kind, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        for h in [
            Header::new(7, Kind::Open, 0),
            Header::new(7, Kind::Open, 256 * 1024),
            Header::new(7, Kind::Data, 65536),
            Header::new(8, Kind::Credit, 1 << 20),
            Header::new(0, Kind::Ping, 0),
        ] {
            assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }
        let bad = [
            Header::new(7, Kind::Data, 65537),
            Header::new(7, Kind::Data, 0),
            Header::new(7, Kind::Fin, 1),
            Header::new(7, Kind::Credit, 0),
            Header::new(0, Kind::Open, 0),
            Header::new(3, Kind::Ping, 0),
        ];
        for h in bad {
            assert!(Header::decode(&h.encode()).is_err(), "{h:?}");
        }
        let mut unknown = Header::new(1, Kind::Fin, 0).encode();
        unknown[4] = 9;
        assert!(Header::decode(&unknown).is_err());
    }
}
