//! The lane's handshake: TLS 1.3 with libp2p-tls certificates, so each side
//! proves the same peer id its libp2p session did.

use std::{sync::Arc, time::Duration};

use libp2p::{identity::Keypair, PeerId};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::LaneError;

/// The first byte of a TLS connection (a handshake record). A libp2p
/// connection starts with multistream-select's length byte instead.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One side's TLS identity.
pub struct LaneTls {
    key: Keypair,
    acceptor: TlsAcceptor,
}

impl LaneTls {
    pub fn new(key: &Keypair) -> Result<Self, LaneError> {
        let server = libp2p_tls::make_server_config(key)
            .map_err(|e| LaneError::Handshake(format!("cannot make the TLS certificate: {e}")))?;
        Ok(Self {
            key: key.clone(),
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Gateway side: completes the handshake and returns the client's peer id.
    pub async fn accept<S>(&self, io: S) -> Result<(server::TlsStream<S>, PeerId), LaneError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(io))
            .await
            .map_err(|_| LaneError::HandshakeTimeout)?
            .map_err(|e| LaneError::Handshake(e.to_string()))?;
        let (_, conn) = tls.get_ref();
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| LaneError::Handshake("client sent no certificate".into()))?;
        let peer = libp2p_tls::certificate::parse(cert)
            .map_err(|e| LaneError::Handshake(e.to_string()))?
            .peer_id();
        Ok((tls, peer))
    }

    /// Agent side: the handshake succeeds only if the server is `gateway`.
    pub async fn connect<S>(
        &self,
        io: S,
        gateway: PeerId,
    ) -> Result<client::TlsStream<S>, LaneError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = libp2p_tls::make_client_config(&self.key, Some(gateway))
            .map_err(|e| LaneError::Handshake(format!("cannot make the TLS certificate: {e}")))?;
        // libp2p-tls checks the peer id, not a name; any name does.
        let name = ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(cfg)).connect(name, io),
        )
        .await
        .map_err(|_| LaneError::HandshakeTimeout)?
        .map_err(|e| LaneError::Handshake(e.to_string()))
    }
}
