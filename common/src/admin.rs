//! The admin HTTP listener both binaries run: loopback by default, a bearer
//! token required before it may bind anywhere else, `/metrics` rendering.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::names::Secret;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin API listens. Each binary has its own loopback default.
    pub listen: Option<SocketAddr>,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Secret,
    /// File holding the bearer token (takes precedence over `token`).
    pub token_file: Option<PathBuf>,
    /// Paths served without the token even when one is set.
    pub open_paths: Vec<String>,
    /// PEM certificate chain; with `tls_key` the admin API speaks only HTTPS
    /// (rustls). `health` and `doctor` trust the certificates in this file.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.listen {0} is not loopback: set admin.token or admin.token_file so the admin API is not open to the network")]
    Exposed(SocketAddr),
    #[error("cannot read admin.token_file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("admin TLS: {0}")]
    Tls(String),
    #[error("cannot bind the admin API on {addr}: {source} (pick another admin.listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Who may call the admin API.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Secret>,
    open_paths: Arc<Vec<String>>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(
    path: &std::path::Path,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, AdminError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            AdminError::Tls(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(AdminError::Tls(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

impl AdminConfig {
    /// Resolves the token and refuses a non-loopback bind without one.
    pub fn auth(&self, listen: SocketAddr) -> Result<AdminAuth, AdminError> {
        let token = match &self.token_file {
            Some(p) => Some(Secret::new(
                std::fs::read_to_string(p)
                    .map_err(|source| AdminError::TokenFile {
                        path: p.display().to_string(),
                        source,
                    })?
                    .trim(),
            )),
            None if !self.token.is_empty() => Some(self.token.clone()),
            None => None,
        };
        if token.is_none() && !listen.ip().is_loopback() {
            return Err(AdminError::Exposed(listen));
        }
        Ok(AdminAuth {
            token,
            open_paths: Arc::new(self.open_paths.clone()),
            tls: self.server_tls()?,
        })
    }

    /// The rustls server config, when `tls_cert` and `tls_key` are set.
    fn server_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, AdminError> {
        use rustls_pki_types::pem::PemObject;
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(AdminError::Tls(
                    "set both admin.tls_cert and admin.tls_key, or neither".into(),
                ))
            }
        };
        let certs = read_certs(cert)?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
            AdminError::Tls(format!(
                "cannot read the private key {}: {e}",
                key.display()
            ))
        })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| AdminError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| AdminError::Tls(format!("certificate and key do not fit: {e}")))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(cfg)))
    }

    /// A client config trusting the certificates of `tls_cert` (for `health`, `doctor`).
    fn client_tls(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
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

/// Accepted TLS connections, handed to axum once their handshake is done.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The acceptor stopped (shutdown): wait for axum's graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts TCP and runs handshakes off the accept loop (a slow client cannot
/// stall others), at most 64 at a time and 10 s each.
fn tls_listener(
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> TlsListener {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, peer)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                continue; // too many handshakes in flight: drop this one
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let hs =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
                if let Ok(Ok(s)) = hs.await {
                    drop(permit);
                    let _ = tx.send((s, peer)).await;
                }
            });
        }
    });
    TlsListener { rx, local }
}

/// Binds `listen` and serves `router` until `stop` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    auth: AdminAuth,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AdminError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: listen,
        source,
    })?;
    let tls = auth.tls.clone();
    let app = router.layer(middleware::from_fn_with_state(auth, require_token));
    let handle = tokio::spawn(async move {
        let stopped = stop.clone();
        let shutdown = async move { stopped.cancelled().await };
        let res = match tls {
            Some(tls) => {
                let l = tls_listener(listener, local, tls, stop);
                axum::serve(l, app).with_graceful_shutdown(shutdown).await
            }
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "admin API stopped");
        }
    });
    Ok((local, handle))
}

async fn require_token(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    let Some(token) = &auth.token else {
        // Open on loopback: only to clients that name it by address or as
        // localhost. A page in a local browser whose name was rebound to
        // 127.0.0.1 sends its own name, and must not ban 0.0.0.0/0.
        if !host_is_local(req.headers().get(header::HOST)) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "admin API: without admin.token it answers only requests for localhost or an IP address\n",
            )
                .into_response();
        }
        return next.run(req).await;
    };
    let path = req.uri().path();
    if auth.open_paths.iter().any(|p| p == path) || crate::admin_ui::is_asset(path) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if token.matches(t) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            "admin API: missing or wrong bearer token\n",
        )
            .into_response(),
    }
}

/// Whether a Host header names this machine the way only a local client
/// does: an IP address or `localhost`, with any port, or no Host at all
/// (HTTP/1.0).
fn host_is_local(host: Option<&axum::http::HeaderValue>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let local = |name: &str| {
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
    };
    if local(host) {
        return true;
    }
    // `[v6]:port` or `name:port`.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => return false,
    };
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => local(name),
    }
}

/// Renders a registry in the Prometheus/OpenMetrics text format.
pub fn render_metrics(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {e}\n"),
        )
            .into_response(),
    }
}

/// `200 ok` or `503` with the reasons, for readiness probes.
pub fn health_response(problems: Vec<String>) -> Response {
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_names_reach_an_open_admin_api() {
        let h = |v: &str| host_is_local(Some(&axum::http::HeaderValue::from_str(v).unwrap()));
        for ok in [
            "127.0.0.1:9600",
            "localhost:9600",
            "LOCALHOST",
            "[::1]:9600",
            "10.0.0.7:9600",
            "::1",
        ] {
            assert!(h(ok), "{ok}");
        }
        for bad in [
            "rebind.example:9600",
            "evil.example",
            "localhost.evil.example:9600",
            "[::1",
        ] {
            assert!(!h(bad), "{bad}");
        }
        assert!(host_is_local(None), "HTTP/1.0 without Host");
    }
}
