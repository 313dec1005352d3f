//! The binaries' own admin API client (blocking, HTTP/1.0, the configured
//! token, TLS when the API speaks it): `health`, `doctor` and `leases` use it.

use std::{net::SocketAddr, sync::Arc};

use super::{crypto, read_certs, AdminConfig};

impl AdminConfig {
    /// A client config trusting the certificates of `tls_cert` (for `health`, `doctor`).
    pub(super) fn client_tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        let Some(cert) = &self.tls_cert else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(cert).map_err(|e| e.to_string())? {
            roots
                .add(c)
                .map_err(|e| format!("admin TLS certificate: {e}"))?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(Arc::new(cfg)))
    }
}

/// `health` subcommands: GET `/health/ready` on the local admin API; Ok when it
/// answers 200 (container health checks: distroless images have no shell or curl).
pub fn probe_ready(listen: SocketAddr, cfg: &AdminConfig) -> Result<(), String> {
    match get(listen, cfg, "/health/ready")? {
        (200, _) => Ok(()),
        (status, body) => Err(format!("not ready (HTTP {status}): {}", body.trim())),
    }
}

/// GET `path` on a local admin API (blocking, HTTP/1.0), with the configured
/// token: `(status, body)`. For the binaries' own subcommands (`health`, `doctor`).
pub fn get(listen: SocketAddr, cfg: &AdminConfig, path: &str) -> Result<(u16, String), String> {
    request(listen, cfg, "GET", path)
}

/// As [`get`], with another method and no body (`DELETE`, for `leases revoke`).
pub fn request(
    listen: SocketAddr,
    cfg: &AdminConfig,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    request_json(listen, cfg, method, path, None)
}

/// As [`request`], with a JSON body when `body` is given (`PUT /v1/doctor`).
pub fn request_json(
    listen: SocketAddr,
    cfg: &AdminConfig,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let token = cfg
        .auth(listen)
        .ok()
        .and_then(|a| a.token)
        .map(|t| t.expose().to_owned());
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("admin API at {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = body
        .map(|b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        })
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}{content}\r\n{}",
        body.unwrap_or_default()
    );
    let mut resp = String::new();
    match cfg.client_tls()? {
        None => {
            s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
            s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        }
        Some(tls) => {
            // The certificate must name the address dialled (an IP SAN).
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(tls, name).map_err(|e| e.to_string())?;
            let mut t = rustls::StreamOwned::new(conn, s);
            t.write_all(request.as_bytes())
                .map_err(|e| format!("admin API TLS at {addr}: {e}"))?;
            // A peer closing without close_notify still ends the response.
            let mut buf = Vec::new();
            match t.read_to_end(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(format!("admin API TLS at {addr}: {e}")),
            }
            resp = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
