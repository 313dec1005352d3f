//! Circuit relay v2 wire format (libp2p spec `relay/circuit-v2.md`): the hop
//! and stop messages, the signed reservation voucher, and their
//! uvarint-length-prefixed framing. The gateway's relay hop speaks these; the
//! agents use rust-libp2p's own relay client.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{core::SignedEnvelope, identity::Keypair, Multiaddr, PeerId, StreamProtocol};

pub const HOP_PROTOCOL: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");
pub const STOP_PROTOCOL: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/stop");

/// Largest message accepted or sent (the spec's and every implementation's bound).
pub const MAX_MESSAGE: usize = 4096;

/// Signed envelope domain and payload type of a reservation voucher.
pub const VOUCHER_DOMAIN: &str = "libp2p-relay-rsvp";
pub const VOUCHER_PAYLOAD_TYPE: [u8; 2] = [0x03, 0x02];

#[derive(Clone, PartialEq, prost::Message)]
pub struct HopMessage {
    #[prost(enumeration = "HopType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub peer: Option<Peer>,
    #[prost(message, optional, tag = "3")]
    pub reservation: Option<Reservation>,
    #[prost(message, optional, tag = "4")]
    pub limit: Option<Limit>,
    #[prost(enumeration = "Status", optional, tag = "5")]
    pub status: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopMessage {
    #[prost(enumeration = "StopType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub peer: Option<Peer>,
    #[prost(message, optional, tag = "3")]
    pub limit: Option<Limit>,
    #[prost(enumeration = "Status", optional, tag = "4")]
    pub status: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(bytes = "vec", required, tag = "1")]
    pub id: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub addrs: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reservation {
    /// Unix time (seconds) the reservation expires.
    #[prost(uint64, required, tag = "1")]
    pub expire: u64,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub addrs: Vec<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub voucher: Option<Vec<u8>>,
}

/// A circuit's limit. Absent from a message means unlimited.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Limit {
    /// Seconds.
    #[prost(uint32, optional, tag = "1")]
    pub duration: Option<u32>,
    /// Bytes, per direction.
    #[prost(uint64, optional, tag = "2")]
    pub data: Option<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReservationVoucher {
    #[prost(bytes = "vec", required, tag = "1")]
    pub relay: Vec<u8>,
    #[prost(bytes = "vec", required, tag = "2")]
    pub peer: Vec<u8>,
    #[prost(uint64, required, tag = "3")]
    pub expiration: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HopType {
    Reserve = 0,
    Connect = 1,
    Status = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StopType {
    Connect = 0,
    Status = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    Ok = 100,
    ReservationRefused = 200,
    ResourceLimitExceeded = 201,
    PermissionDenied = 202,
    ConnectionFailed = 203,
    NoReservation = 204,
    MalformedMessage = 400,
    UnexpectedMessage = 401,
}

impl Status {
    /// The spec's name, as it appears in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::ReservationRefused => "RESERVATION_REFUSED",
            Status::ResourceLimitExceeded => "RESOURCE_LIMIT_EXCEEDED",
            Status::PermissionDenied => "PERMISSION_DENIED",
            Status::ConnectionFailed => "CONNECTION_FAILED",
            Status::NoReservation => "NO_RESERVATION",
            Status::MalformedMessage => "MALFORMED_MESSAGE",
            Status::UnexpectedMessage => "UNEXPECTED_MESSAGE",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CircuitError {
    #[error("relay message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLong(usize),
    #[error("malformed length prefix")]
    BadLength,
    #[error("malformed relay message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream ended before a complete relay message")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl CircuitError {
    pub fn kind(&self) -> &'static str {
        match self {
            CircuitError::TooLong(_) => "relay_message_too_long",
            CircuitError::BadLength => "relay_bad_length",
            CircuitError::Decode(_) => "relay_malformed",
            CircuitError::Truncated => "relay_truncated",
            CircuitError::Io(_) => "relay_io",
        }
    }
}

/// Reads one length-prefixed message. Reads byte-exact, so whatever follows
/// (circuit payload) stays in the stream.
pub async fn read_message<M: prost::Message + Default, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<M, CircuitError> {
    let len = read_length(r).await?;
    if len > MAX_MESSAGE {
        return Err(CircuitError::TooLong(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(eof)?;
    Ok(M::decode(buf.as_slice())?)
}

/// Decodes one complete frame held in memory (the fuzzers' entry point).
pub fn decode_frame<M: prost::Message + Default>(buf: &[u8]) -> Result<M, CircuitError> {
    let mut cur = buf;
    let len = prost::encoding::decode_varint(&mut cur).map_err(|_| CircuitError::BadLength)?;
    let len = usize::try_from(len).map_err(|_| CircuitError::BadLength)?;
    if len > MAX_MESSAGE {
        return Err(CircuitError::TooLong(len));
    }
    let body = cur.get(..len).ok_or(CircuitError::Truncated)?;
    Ok(M::decode(body)?)
}

pub async fn write_message<M: prost::Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), CircuitError> {
    let buf = msg.encode_length_delimited_to_vec();
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

async fn read_length<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize, CircuitError> {
    let mut value: u64 = 0;
    // 4096 fits in two varint bytes; a third is allowed only to reject it as too long.
    for i in 0..3 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.map_err(eof)?;
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| CircuitError::BadLength);
        }
    }
    Err(CircuitError::TooLong(usize::MAX))
}

fn eof(e: std::io::Error) -> CircuitError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        CircuitError::Truncated
    } else {
        CircuitError::Io(e)
    }
}

impl HopMessage {
    pub fn answer(status: Status) -> Self {
        Self {
            r#type: HopType::Status as i32,
            peer: None,
            reservation: None,
            limit: None,
            status: Some(status as i32),
        }
    }

    /// The message type, if it is a known one.
    pub fn kind(&self) -> Option<HopType> {
        HopType::try_from(self.r#type).ok()
    }

    /// The peer named in the message, if present and well-formed.
    pub fn peer_id(&self) -> Option<PeerId> {
        PeerId::from_bytes(&self.peer.as_ref()?.id).ok()
    }
}

impl StopMessage {
    pub fn connect(source: PeerId, limit: Option<Limit>) -> Self {
        Self {
            r#type: StopType::Connect as i32,
            peer: Some(Peer {
                id: source.to_bytes(),
                addrs: Vec::new(),
            }),
            limit,
            status: None,
        }
    }

    /// The status of a STATUS answer; `None` for anything else.
    pub fn status_answer(&self) -> Option<Status> {
        match StopType::try_from(self.r#type).ok()? {
            StopType::Status => Status::try_from(self.status?).ok(),
            StopType::Connect => None,
        }
    }
}

/// Builds the signed voucher proving that `relay` holds a reservation for `peer`.
pub fn voucher(relay_key: &Keypair, peer: PeerId, expiration: u64) -> Option<Vec<u8>> {
    let payload = prost::Message::encode_to_vec(&ReservationVoucher {
        relay: relay_key.public().to_peer_id().to_bytes(),
        peer: peer.to_bytes(),
        expiration,
    });
    SignedEnvelope::new(
        relay_key,
        VOUCHER_DOMAIN.to_string(),
        VOUCHER_PAYLOAD_TYPE.to_vec(),
        payload,
    )
    .ok()
    .map(SignedEnvelope::into_protobuf_encoding)
}

/// Encodes relay addresses for a reservation.
pub fn encode_addrs(addrs: &[Multiaddr]) -> Vec<Vec<u8>> {
    addrs.iter().map(|a| a.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voucher_verifies_and_names_both_peers() {
        let key = Keypair::generate_ed25519();
        let peer = PeerId::random();
        let bytes = voucher(&key, peer, 1234).expect("signs");
        let env = SignedEnvelope::from_protobuf_encoding(&bytes).expect("decodes");
        let (payload, signer) = env
            .payload_and_signing_key(VOUCHER_DOMAIN.into(), &VOUCHER_PAYLOAD_TYPE)
            .expect("signature and payload type check");
        assert_eq!(signer.to_peer_id(), key.public().to_peer_id());
        let v = <ReservationVoucher as prost::Message>::decode(payload).expect("voucher");
        assert_eq!(v.expiration, 1234);
        assert_eq!(v.peer, peer.to_bytes());
        assert_eq!(v.relay, key.public().to_peer_id().to_bytes());
    }

    #[tokio::test]
    async fn framing_round_trips_and_bounds_length() {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let msg = HopMessage::answer(Status::NoReservation);
        let (a, b) = tokio::io::duplex(8192);
        let (mut a, mut b) = (a.compat(), b.compat());
        write_message(&mut a, &msg).await.expect("write");
        let got: HopMessage = read_message(&mut b).await.expect("read");
        assert_eq!(got, msg);
        assert_eq!(got.status, Some(Status::NoReservation as i32));

        // A 5000-byte length prefix is refused before any allocation.
        let mut prefix = Vec::new();
        prost::encoding::encode_varint(5000, &mut prefix);
        a.write_all(&prefix).await.expect("write");
        let r: Result<HopMessage, _> = read_message(&mut b).await;
        assert!(matches!(r, Err(CircuitError::TooLong(5000))), "{r:?}");
        assert!(matches!(
            decode_frame::<HopMessage>(&[0x80, 0x80, 0x80, 0x80]),
            Err(CircuitError::BadLength | CircuitError::TooLong(_))
        ));
    }
}
