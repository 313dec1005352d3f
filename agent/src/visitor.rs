//! `connect`: a local port whose connections reach a service offered by
//! another agent. Each connection gets its own service stream, opened on the
//! best connection to that peer at that moment: the direct one once DCUtR has
//! punched it, the relay before. Streams already running on the relay stay
//! there until they end; the upgrade never breaks them.

use std::{sync::Arc, time::Duration};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use relaygate_common::{
    protocol::{ServiceRequest, StreamStatus, SERVICE_PROTOCOL},
    splice::splice_framed_idle,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{compat::FuturesAsyncReadCompatExt, task::TaskTracker};

use crate::{
    config::{ServicePeer, VisitorConfig},
    host::HostHandle,
    limits::Limits,
    metrics::{Metrics, Path, Role, ServiceBytesLabels, ServiceStreamLabels},
};

const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum VisitError {
    #[error("cannot reach peer {peer}: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    #[error("cannot open a service stream: {0}")]
    Stream(String),
    #[error("the peer refused: {0}")]
    Refused(&'static str),
}

pub struct Visitor {
    pub cfg: VisitorConfig,
    pub host: HostHandle,
    /// Circuit addresses of the peer through our gateway(s).
    pub addrs: Vec<Multiaddr>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
}

impl Visitor {
    pub fn new(
        cfg: VisitorConfig,
        host: HostHandle,
        gateways: &[Multiaddr],
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
    ) -> Self {
        let addrs = match &cfg.peer {
            ServicePeer::Address { addr, .. } => vec![addr.clone()],
            ServicePeer::Id(peer) => gateways
                .iter()
                .map(|g| {
                    g.clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(*peer))
                })
                .collect(),
        };
        Self {
            cfg,
            host,
            addrs,
            metrics,
            limits,
        }
    }

    /// Binds the local port; fails at once if it cannot.
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind(self.cfg.listen).await
    }

    /// Accepts local connections until the listener fails.
    pub async fn run(self: Arc<Self>, listener: TcpListener, tracker: TaskTracker) {
        tracing::info!(listen = %self.cfg.listen, peer = %self.cfg.peer, service = %self.cfg.service, "visitor port open");
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    tracing::debug!(%from, service = %self.cfg.service, "visitor connection");
                    tracker.spawn(self.clone().handle(tcp));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "visitor accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, mut tcp: TcpStream) {
        let Some(_slot) = self.limits.admit() else {
            self.count(Path::Relayed, StreamStatus::Busy.as_str());
            let _ = tcp.set_zero_linger();
            return;
        };
        let _ = tcp.set_nodelay(true);
        let (mut stream, path) = match tokio::time::timeout(OPEN_TIMEOUT, self.open()).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.cfg.peer, service = %self.cfg.service, error = %e, "visitor connection not served");
                let (path, result) = match &e {
                    VisitError::Refused(r) => (Path::Relayed, *r),
                    _ => (Path::Relayed, "unreachable"),
                };
                self.count(path, result);
                let _ = tcp.set_zero_linger();
                return;
            }
            Err(_) => {
                self.count(Path::Relayed, "timeout");
                let _ = tcp.set_zero_linger();
                return;
            }
        };
        self.count(path, StreamStatus::Connected.as_str());
        let bytes = self
            .metrics
            .peers
            .service_bytes
            .get_or_create(&ServiceBytesLabels {
                role: Role::Visit,
                path,
            })
            .clone();
        let idle = self.limits.idle_timeout;
        if splice_framed_idle(&mut stream, &mut tcp, &bytes, &bytes, idle)
            .await
            .is_err()
        {
            let _ = tcp.set_zero_linger();
        }
    }

    /// Connects to the peer if needed and opens a service stream on its best connection.
    async fn open(&self) -> Result<(tokio_util::compat::Compat<libp2p::Stream>, Path), VisitError> {
        let peer = self.cfg.peer.peer_id();
        self.host
            .connect(peer, self.addrs.clone())
            .await
            .map_err(|reason| VisitError::Unreachable { peer, reason })?;
        let opened = self
            .host
            .control
            .open(peer, SERVICE_PROTOCOL)
            .await
            .map_err(|e| VisitError::Stream(e.to_string()))?;
        let path = Path::of(opened.relayed);
        let mut stream = opened.stream.compat();
        let req = ServiceRequest {
            service: self.cfg.service.clone(),
        };
        stream
            .write_all(&req.encode())
            .await
            .map_err(|e| VisitError::Stream(e.to_string()))?;
        let status = stream
            .read_u8()
            .await
            .map_err(|e| VisitError::Stream(e.to_string()))?;
        match StreamStatus::from_byte(status) {
            Some(StreamStatus::Connected) => Ok((stream, path)),
            Some(s) => Err(VisitError::Refused(s.as_str())),
            None => {
                self.metrics.bad_input("service_status");
                Err(VisitError::Refused("bad_status"))
            }
        }
    }

    fn count(&self, path: Path, result: &str) {
        self.metrics
            .peers
            .service_streams
            .get_or_create(&ServiceStreamLabels {
                role: Role::Visit,
                path,
                result: result.into(),
            })
            .inc();
    }
}
