//! Leased public ports: accept TCP connections and hand each one to the
//! agent as a new tunnel stream, headed by the source the gateway saw.
//!
//! Data path: public socket -> stream to agent -> the agent's delivery. The
//! gateway writes the header and starts forwarding at once; the agent's status
//! byte gates the reverse direction, so a refused target resets the public
//! connection without costing a round trip on the happy path.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use libp2p::PeerId;
use relaygate_common::{
    metrics::Side,
    protocol::{StreamHeader, StreamStatus, TUNNEL_PROTOCOL},
    splice::pump,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{compat::FuturesAsyncReadCompatExt, sync::CancellationToken, task::TaskTracker};

use crate::{metrics::Metrics, registry::TunnelStats};

/// How long the gateway waits for the agent to open a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent may take to connect to its target and answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);

/// Shared by every public port.
pub struct DataPlane {
    pub control: relaygate_common::streams::Control,
    pub metrics: Arc<Metrics>,
    /// Tracks every public connection, so shutdown can drain them.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: stop accepting on every port.
    pub stop_accepting: CancellationToken,
}

/// A bound public port of one tunnel.
pub struct PublicPort {
    pub agent: PeerId,
    pub stats: Arc<TunnelStats>,
    pub listener: TcpListener,
}

pub async fn bind(ip: std::net::IpAddr, port: u16) -> io::Result<TcpListener> {
    // tokio sets SO_REUSEADDR, so a restarted gateway rebinds despite TIME_WAIT.
    TcpListener::bind((ip, port)).await
}

impl PublicPort {
    /// Accepts until the session ends or the gateway stops accepting.
    pub async fn serve(self, dp: Arc<DataPlane>, session: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = session.cancelled() => break,
                _ = dp.stop_accepting.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let (tcp, source) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(port = %self.stats.port, error = %e, "accept failed");
                    dp.metrics.refuse("accept_failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let conn = Connection { tcp, source, agent: self.agent, stats: self.stats.clone(), dp: dp.clone() };
            dp.tracker.spawn(conn.run());
        }
        tracing::debug!(port = %self.stats.port, tunnel = %self.stats.name, "public port closed");
    }
}

struct Connection {
    tcp: TcpStream,
    source: SocketAddr,
    agent: PeerId,
    stats: Arc<TunnelStats>,
    dp: Arc<DataPlane>,
}

impl Connection {
    async fn run(mut self) {
        let m = &self.dp.metrics;
        let public = Metrics::side(Side::Public);
        m.connections_opened.get_or_create(&public).inc();
        let active = m.connections_active.get_or_create(&public).clone();
        active.inc();
        self.stats.opened.inc();
        self.stats.active.inc();
        let _ = self.tcp.set_nodelay(true);
        let result = self.forward().await;
        if let Err(e) = &result {
            tracing::debug!(source = %self.source, tunnel = %self.stats.name, error = %e, "public connection reset");
            // RST, so the remote learns at once that the connection is gone.
            let _ = self.tcp.set_zero_linger();
        }
        active.dec();
        self.stats.active.dec();
    }

    async fn forward(&mut self) -> io::Result<()> {
        let destination = self.tcp.local_addr()?;
        let open = self.dp.control.open_stream(self.agent, TUNNEL_PROTOCOL);
        let stream = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.dp.metrics.dial_failures.get_or_create(&reason("open_stream")).inc();
                return Err(io::Error::other(e.to_string()));
            }
            Err(_) => {
                self.dp.metrics.dial_failures.get_or_create(&reason("open_timeout")).inc();
                return Err(io::Error::new(io::ErrorKind::TimedOut, "agent did not accept a stream"));
            }
        };
        let mut stream = stream.compat();
        let header = StreamHeader { tunnel: self.stats.name.clone(), source: self.source, destination };
        stream.write_all(&header.encode()).await?;
        tracing::debug!(source = %self.source, tunnel = %self.stats.name, agent = %self.agent, "public connection");

        let (mut sr, sw) = tokio::io::split(stream);
        let (tr, mut tw) = self.tcp.split();
        let (bytes_in, bytes_out, metrics) = (&self.stats.bytes_in, &self.stats.bytes_out, &self.dp.metrics);
        let down = async move {
            let status = tokio::time::timeout(STATUS_TIMEOUT, sr.read_u8())
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "agent did not answer"))??;
            match StreamStatus::from_byte(status) {
                Some(StreamStatus::Connected) => pump(sr, &mut tw, bytes_out).await,
                Some(s) => {
                    metrics.refuse(s.as_str());
                    Err(io::Error::new(io::ErrorKind::ConnectionRefused, s.as_str()))
                }
                None => {
                    metrics.bad_input("stream_status");
                    Err(io::Error::new(io::ErrorKind::InvalidData, "unknown stream status"))
                }
            }
        };
        tokio::try_join!(pump(tr, sw, bytes_in), down)?;
        Ok(())
    }
}

fn reason(r: &str) -> relaygate_common::metrics::ReasonLabels {
    relaygate_common::metrics::ReasonLabels::new(r)
}
