//! The datagram channel's QUIC settings: libp2p-tls certificates (each side
//! proves the peer id its libp2p session did, as the lane's TLS does), the
//! `relaygate-udp/1` ALPN, RFC 9221 datagrams on and streams off.

use std::{sync::Arc, time::Duration};

use libp2p::{identity::Keypair, PeerId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use super::{DgramError, ALPN};

/// Both ends: the agent keeps the channel alive each second, and either end
/// gives up on it after five silent ones (as the session does).
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Unread datagrams one channel may queue at the receiver, and unsent ones
/// at the sender (about 20 ms at 100 Mbit/s): a slow flow's datagrams are
/// dropped, never queued behind.
const RECEIVE_BUFFER: usize = 1 << 20;
const SEND_BUFFER: usize = 256 << 10;
/// The channel starts at the common Ethernet-path size, so a QUIC Initial of
/// 1,200 bytes fits with room for the frame; discovery goes up to quinn's
/// 1,452 and black-hole detection falls back to 1,200 on smaller paths.
const INITIAL_MTU: u16 = 1452;
/// The least the channel ever assumes of its path: IPv6's minimum, which
/// IPv4 internet paths carry too. quinn's own floor (1,200) would leave no
/// room for a 1,200-byte QUIC Initial and its frame, and a burst of losses
/// (an overloaded host) made quinn fall back to it for a minute, failing
/// every new inner handshake meanwhile.
const MIN_MTU: u16 = 1280;
/// How long a suspected black hole keeps the size down before discovery
/// tries again (quinn: 60 s).
const BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(5);
/// Socket buffers of the channel's endpoint: a burst of datagrams must not
/// be lost in the kernel (the default, about 208 KB, dropped thousands in
/// an unpaced load). Capped by `net.core.{r,w}mem_max` unless the process
/// may force it.
const SOCKET_BUFFER: usize = 8 << 20;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(Some(RECEIVE_BUFFER));
    t.datagram_send_buffer_size(SEND_BUFFER);
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.initial_mtu(INITIAL_MTU);
    t.min_mtu(MIN_MTU);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.black_hole_cooldown(BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    t.allow_spin(false);
    Arc::new(t)
}

/// A UDP socket for a channel endpoint, with large buffers.
pub fn socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the address is `::`.
        let _ = s.set_only_v6(false);
    }
    for force in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // Root (CAP_NET_ADMIN) may go past the sysctl caps; others get them.
        let _ = set_int(&s, force, SOCKET_BUFFER);
    }
    if s.recv_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if s.send_buffer_size().unwrap_or(0) < SOCKET_BUFFER {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn set_int(s: &socket2::Socket, opt: libc::c_int, value: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket, an int option, its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An endpoint on [`socket`]: the gateway's (with `server`) or an agent's.
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the channel's endpoint"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket(addr)?,
        runtime,
    )
}

/// The gateway's side.
pub fn server_config(key: &Keypair) -> Result<quinn::ServerConfig, DgramError> {
    let mut tls = libp2p_tls::make_server_config(key)
        .map_err(|e| DgramError::Tls(format!("cannot make the TLS certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| DgramError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport = transport();
    // Handshakes waiting at once; more are refused before any crypto.
    cfg.max_incoming(256);
    Ok(cfg)
}

/// The agent's side, toward `gateway` only: the verifier checks its id.
pub fn client_config(key: &Keypair, gateway: PeerId) -> Result<quinn::ClientConfig, DgramError> {
    let mut tls = libp2p_tls::make_client_config(key, Some(gateway))
        .map_err(|e| DgramError::Tls(format!("cannot make the TLS certificate: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.key_log = Arc::new(rustls::NoKeyLog);
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| DgramError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The peer id the other end's certificate proves.
pub fn peer_id(conn: &quinn::Connection) -> Result<PeerId, DgramError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| DgramError::Tls("no certificate".into()))?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| DgramError::Tls("unexpected identity type".into()))?;
    let cert = certs
        .first()
        .ok_or_else(|| DgramError::Tls("no certificate".into()))?;
    libp2p_tls::certificate::parse(cert)
        .map(|c| c.peer_id())
        .map_err(|e| DgramError::Tls(e.to_string()))
}

/// The server name a client asks for: a label, since the verifier checks
/// the gateway's peer id instead.
pub const SERVER_NAME: &str = "dgram.relaygate";

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    async fn server(key: &Keypair) -> quinn::Endpoint {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        endpoint(addr, Some(server_config(key).unwrap())).unwrap()
    }

    #[tokio::test]
    async fn ids_are_proved_and_datagrams_flow() {
        let (gw, agent) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let ep = server(&gw).await;
        let addr = ep.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let who = peer_id(&conn).unwrap();
            let d = conn.read_datagram().await.unwrap();
            conn.send_datagram(d).unwrap();
            let _ = conn.closed().await;
            who
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(&agent, gw.public().to_peer_id()).unwrap());
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        assert_eq!(peer_id(&conn).unwrap(), gw.public().to_peer_id());
        // A QUIC Initial with a DATA frame's header fits from the start.
        assert!(conn.max_datagram_size().unwrap() >= 1200 + 64);
        conn.send_datagram(bytes::Bytes::from_static(b"ping"))
            .unwrap();
        assert_eq!(&conn.read_datagram().await.unwrap()[..], b"ping");
        conn.close(0u32.into(), b"done");
        assert_eq!(accept.await.unwrap(), agent.public().to_peer_id());
    }

    #[tokio::test]
    async fn a_client_expecting_another_gateway_is_refused() {
        let (gw, agent) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let ep = server(&gw).await;
        let addr = ep.local_addr().unwrap();
        tokio::spawn(async move {
            if let Some(i) = ep.accept().await {
                let _ = i.await;
            }
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let other = PeerId::random();
        client.set_default_client_config(client_config(&agent, other).unwrap());
        let r = client.connect(addr, SERVER_NAME).unwrap().await;
        assert!(r.is_err(), "a gateway with another id must not be accepted");
    }
}
