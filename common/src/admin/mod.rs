//! The admin HTTP listener both binaries run: loopback by default, a bearer
//! token required before it may bind anywhere else, `/metrics` rendering.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    http::{header, StatusCode},
    middleware::{self},
    response::{IntoResponse, Response},
    Router,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::names::Secret;

mod client;
mod gate;

pub use client::{get, probe_ready, request, request_json};
use gate::require_token;

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
