//! The lane's handshake: TLS 1.3 with libp2p-tls certificates, so each side
//! proves the same peer id its libp2p session did. The handshake ends with
//! record keys exported from it ([`LaneKeys`]); the lane's frames then travel
//! in those records, not in TLS's.
//!
//! rustls is driven by hand, one whole TLS record at a time, so it never
//! reads past the handshake's last record: what follows on the connection
//! is the lane's, and nothing of it is left inside rustls.

use std::{sync::Arc, time::Duration};

use libp2p::{identity::Keypair, PeerId};
use rustls::{ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    seal::{LaneKeys, EXPORTER_LABEL},
    LaneError, LaneFlow, LaneSlot, Role,
};

/// The first byte of a TLS connection (a handshake record). A libp2p
/// connection starts with multistream-select's length byte instead.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS's largest record body (RFC 8446, 5.2: 2^14 + 256 for 1.3; 1.2 allows 2^14 + 2048).
const MAX_TLS_RECORD: usize = (1 << 14) + 2048;

/// A lane the gateway took: the agent's connection, left exactly after the
/// handshake, who the agent is, which of its lanes this is, and the keys.
pub struct Accepted<S> {
    pub io: S,
    pub peer: PeerId,
    pub slot: LaneSlot,
    /// The flow control the agent speaks.
    pub flow: LaneFlow,
    pub keys: LaneKeys,
}

/// One side's TLS identity.
#[derive(Clone)]
pub struct LaneTls {
    key: Keypair,
    server: Arc<ServerConfig>,
}

impl LaneTls {
    pub fn new(key: &Keypair) -> Result<Self, LaneError> {
        let mut server = libp2p_tls::make_server_config(key)
            .map_err(|e| LaneError::Handshake(format!("cannot make the TLS certificate: {e}")))?;
        // Nothing may follow the handshake inside TLS: the lane's records do.
        server.send_tls13_tickets = 0;
        // libp2p-tls logs secrets when SSLKEYLOGFILE is set; the lane's keys
        // derive from them, so none are logged.
        server.key_log = Arc::new(rustls::NoKeyLog);
        Ok(Self {
            key: key.clone(),
            server: Arc::new(server),
        })
    }

    /// Gateway side: completes the handshake and returns the lane.
    pub async fn accept<S>(&self, mut io: S) -> Result<Accepted<S>, LaneError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut conn = ServerConnection::new(self.server.clone())
            .map_err(|e| LaneError::Handshake(e.to_string()))?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut io, &mut conn))
            .await
            .map_err(|_| LaneError::HandshakeTimeout)??;
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| LaneError::Handshake("client sent no certificate".into()))?;
        let peer = libp2p_tls::certificate::parse(cert)
            .map_err(|e| LaneError::Handshake(e.to_string()))?
            .peer_id();
        let (slot, flow) = LaneSlot::from_server_name(conn.server_name())?;
        let keys = export(&conn, Role::Listener)?;
        Ok(Accepted {
            io,
            peer,
            slot,
            flow,
            keys,
        })
    }

    /// Agent side: the handshake for lane `slot`, speaking `flow`, succeeds
    /// only if the server is `gateway`.
    pub async fn connect<S>(
        &self,
        io: S,
        gateway: PeerId,
        slot: LaneSlot,
        flow: LaneFlow,
    ) -> Result<(S, LaneKeys), LaneError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // libp2p-tls checks the peer id, not the name; the name says which lane.
        let name = ServerName::try_from(slot.server_name(flow))
            .map_err(|e| LaneError::Handshake(format!("lane server name: {e}")))?;
        self.connect_named(io, gateway, name).await
    }

    async fn connect_named<S>(
        &self,
        mut io: S,
        gateway: PeerId,
        name: ServerName<'static>,
    ) -> Result<(S, LaneKeys), LaneError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut cfg = libp2p_tls::make_client_config(&self.key, Some(gateway))
            .map_err(|e| LaneError::Handshake(format!("cannot make the TLS certificate: {e}")))?;
        cfg.key_log = Arc::new(rustls::NoKeyLog);
        let mut conn = ClientConnection::new(Arc::new(cfg), name)
            .map_err(|e| LaneError::Handshake(e.to_string()))?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut io, &mut conn))
            .await
            .map_err(|_| LaneError::HandshakeTimeout)??;
        let keys = export(&conn, Role::Dialer)?;
        Ok((io, keys))
    }
}

/// Runs the handshake to its end, reading whole TLS records only.
async fn handshake<S, Data>(io: &mut S, conn: &mut ConnectionCommon<Data>) -> Result<(), LaneError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
            io.flush().await?;
            out.clear();
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let record = read_record(io).await?;
        let mut rest = &record[..];
        while !rest.is_empty() {
            let taken = conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert) before giving up.
                while conn.wants_write() && conn.write_tls(&mut out).is_ok() {}
                let _ = io.write_all(&out).await;
                let _ = io.flush().await;
                return Err(LaneError::Handshake(e.to_string()));
            }
            if taken == 0 {
                return Err(LaneError::Handshake("TLS took no more of a record".into()));
            }
        }
    }
}

/// One whole TLS record: its 5-byte header, then the body it announces.
async fn read_record<S: AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, LaneError> {
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_TLS_RECORD {
        return Err(LaneError::Handshake(
            "TLS record over its size limit".into(),
        ));
    }
    let mut record = Vec::with_capacity(header.len() + len);
    record.extend_from_slice(&header);
    record.resize(header.len() + len, 0);
    io.read_exact(&mut record[header.len()..]).await?;
    Ok(record)
}

fn export<Data>(conn: &ConnectionCommon<Data>, role: Role) -> Result<LaneKeys, LaneError> {
    let secret = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| LaneError::Handshake(format!("cannot export the lane's keys: {e}")))?;
    Ok(LaneKeys::from_secret(&secret, role))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::lane::{Kind, RECORD_HEADER, TAG_LEN};

    #[tokio::test]
    async fn the_handshake_proves_peer_ids_and_leaves_the_lane_its_bytes() {
        let (gw_key, agent_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let gw = LaneTls::new(&gw_key).unwrap();
        let agent = LaneTls::new(&agent_key).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let open = super::super::Header::new(2, Kind::Open, 0).encode();
        let (slot, flow) = LaneSlot::from_server_name(Some("lane3.flow2.relaygate")).unwrap();
        let client = async {
            let (mut io, mut keys) = agent
                .connect(b, gw_key.public().to_peer_id(), slot, flow)
                .await?;
            // The lane's first record, right behind the handshake's last.
            io.write_all(&keys.seal_copy(&open)?).await?;
            Ok::<_, LaneError>(io)
        };
        let (server, client) = tokio::join!(gw.accept(a), client);
        let _client = client.unwrap();
        let Accepted {
            mut io,
            peer,
            slot: accepted_slot,
            flow: accepted_flow,
            keys,
        } = server.unwrap();
        assert_eq!(peer, agent_key.public().to_peer_id());
        assert_eq!(accepted_slot, slot, "the gateway learns which lane this is");
        assert_eq!(accepted_flow, LaneFlow::Tuned, "and what the agent speaks");
        assert_eq!(keys.role(), Role::Listener);
        let (_, mut opener) = keys.split();
        let mut record = vec![0u8; RECORD_HEADER + open.len() + TAG_LEN];
        io.read_exact(&mut record).await.unwrap();
        let plain = opener.open(&mut record).unwrap();
        assert_eq!(record[plain], open);
    }

    #[tokio::test]
    async fn an_agent_that_names_no_slot_takes_the_first() {
        // Agents from before slots named an IP address: rustls sends no
        // server name for one.
        let gw_key = Keypair::generate_ed25519();
        let gw = LaneTls::new(&gw_key).unwrap();
        let agent = LaneTls::new(&Keypair::generate_ed25519()).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ip = ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
        let (server, client) = tokio::join!(
            gw.accept(a),
            agent.connect_named(b, gw_key.public().to_peer_id(), ip)
        );
        assert!(client.is_ok());
        assert_eq!(
            server.map(|a| (a.slot, a.flow)).ok(),
            Some((LaneSlot::FIRST, LaneFlow::Fixed))
        );
    }

    #[tokio::test]
    async fn an_agent_refuses_a_gateway_with_another_peer_id() {
        let gw = LaneTls::new(&Keypair::generate_ed25519()).unwrap();
        let agent = LaneTls::new(&Keypair::generate_ed25519()).unwrap();
        let expected = Keypair::generate_ed25519().public().to_peer_id();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (server, client) = tokio::join!(
            gw.accept(a),
            agent.connect(b, expected, LaneSlot::FIRST, LaneFlow::Tuned)
        );
        assert!(
            matches!(client, Err(LaneError::Handshake(_))),
            "{:?}",
            client.err()
        );
        assert!(server.is_err());
    }
}
