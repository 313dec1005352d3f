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
    #[error("cannot bind the admin API on {addr}: {source} (pick another admin.listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Who may call the admin API.
#[derive(Clone, Debug)]
pub struct AdminAuth {
    token: Option<Secret>,
    open_paths: Arc<Vec<String>>,
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
        })
    }
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
    let app = router.layer(middleware::from_fn_with_state(auth, require_token));
    let handle = tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "admin API stopped");
        }
    });
    Ok((local, handle))
}

async fn require_token(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    let Some(token) = &auth.token else {
        return next.run(req).await;
    };
    if auth.open_paths.iter().any(|p| p == req.uri().path()) {
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
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
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
