//! Inbound tunnel streams from the gateway: read the header, deliver the
//! connection to the tunnel's target, answer one status byte, then splice.

use std::{collections::HashMap, sync::Arc, time::Duration};

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use relaygate_common::lane::{self, LaneStream};
use relaygate_common::meter::Tally;
use relaygate_common::transport::DataPath;
use relaygate_common::{
    metrics::{Side, SideLabels},
    names::TunnelName,
    protocol::{StreamHeader, StreamStatus},
    splice::splice_framed_idle,
    streams::Incoming,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::{compat::FuturesAsyncReadCompatExt, task::TaskTracker};

use crate::{config::TunnelConfig, deliver::Delivery, limits::Limits, metrics::Metrics};

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel as the data path needs it, with its counters resolved once.
struct Route {
    cfg: TunnelConfig,
    opened: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
}

pub struct Tunnels {
    routes: HashMap<TunnelName, Route>,
    gateways: Arc<crate::gateways::Gateways>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// SO_MARK of transparent delivery sockets.
    mark: u32,
    limits: Arc<Limits>,
}

impl Tunnels {
    pub fn new(
        tunnels: &[TunnelConfig],
        me: PeerId,
        gateways: Arc<crate::gateways::Gateways>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        mark: u32,
        limits: Arc<Limits>,
    ) -> Self {
        let agent = me.to_string();
        let routes = tunnels
            .iter()
            .map(|t| {
                let (opened, bytes_in, bytes_out) = metrics.tunnel(&agent, t.name.as_str());
                let route = Route {
                    opened,
                    bytes_in,
                    bytes_out,
                    cfg: t.clone(),
                };
                (t.name.clone(), route)
            })
            .collect();
        Self {
            routes,
            gateways,
            metrics,
            connect_timeout,
            mark,
            limits,
        }
    }

    /// Serves inbound tunnel streams until the host goes away.
    pub async fn run(
        self: Arc<Self>,
        mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
        tracker: TaskTracker,
    ) {
        while let Some(Incoming { peer, stream, .. }) = incoming.recv().await {
            if !self.gateways.contains(&peer) {
                self.metrics.refuse("stream_from_unknown_peer");
                tracing::warn!(%peer, "tunnel stream from a peer that is not our gateway; dropped");
                continue;
            }
            tracker.spawn(self.clone().handle(stream.compat()));
        }
    }

    /// A tunnel stream of the session: framed bytes (see `splice`).
    async fn handle(self: Arc<Self>, mut stream: tokio_util::compat::Compat<libp2p::Stream>) {
        self.metrics.tunnel_path(DataPath::Session);
        let Some(mut d) = self.deliver(&mut stream).await else {
            return;
        };
        let (bytes_in, bytes_out) = (&d.route.bytes_in, &d.route.bytes_out);
        let idle = self.limits.idle_timeout;
        if let Err(e) =
            splice_framed_idle(&mut stream, &mut d.target, bytes_in, bytes_out, idle).await
        {
            tracing::debug!(tunnel = %d.header.tunnel, source = %d.header.source, error = %e, "connection reset");
            let _ = d.target.set_zero_linger();
        }
    }

    /// A stream of a lane: raw bytes, ends and resets are the lane's own.
    /// `path` is `lane`, or `session_lane` for the lane on a session stream.
    pub async fn handle_lane(self: Arc<Self>, mut stream: LaneStream, path: &'static str) {
        self.metrics.tunnel_path_named(path);
        let Some(mut d) = self.deliver(&mut stream).await else {
            return;
        };
        let (bytes_in, bytes_out) = (&d.route.bytes_in, &d.route.bytes_out);
        let idle = self.limits.idle_timeout;
        if let Err(e) = lane::splice(
            stream,
            &mut d.target,
            Tally::new(bytes_in),
            Tally::new(bytes_out),
            idle,
            |_| Ok(true),
            async |_| Ok(()),
        )
        .await
        {
            tracing::debug!(tunnel = %d.header.tunnel, source = %d.header.source, error = %e, "connection reset");
            let _ = d.target.set_zero_linger();
        }
    }

    /// Reads the header, connects to the tunnel's target and answers the
    /// status byte. None when refused (the stream got its answer).
    async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
    ) -> Option<Delivered<'_>> {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read(stream)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                self.metrics.bad_input(e.kind());
                tracing::warn!(error = %e, "bad tunnel stream header");
                let _ = stream.write_u8(StreamStatus::BadHeader as u8).await;
                let _ = stream.shutdown().await;
                return None;
            }
            Err(_) => {
                self.metrics.bad_input("header_timeout");
                return None;
            }
        };
        let Some(route) = self.routes.get(&header.tunnel) else {
            self.metrics.refuse("unknown_tunnel");
            tracing::warn!(tunnel = %header.tunnel, "stream for a tunnel this agent does not have");
            let _ = stream.write_u8(StreamStatus::UnknownTunnel as u8).await;
            let _ = stream.shutdown().await;
            return None;
        };
        route.opened.inc();
        let Some(slot) = self.limits.admit() else {
            let _ = stream.write_u8(StreamStatus::Busy as u8).await;
            let _ = stream.shutdown().await;
            return None;
        };
        let delivery = Delivery {
            mode: route.cfg.deliver,
            target: &route.cfg.target,
            header: &header,
            timeout: self.connect_timeout,
            mark: self.mark,
        };
        let target = match delivery.connect().await {
            Ok(t) => {
                self.metrics
                    .delivered(route.cfg.deliver.as_str(), "connected");
                t
            }
            Err(e) => {
                self.metrics.dial_failed(e.reason());
                self.metrics
                    .delivered(route.cfg.deliver.as_str(), e.reason());
                tracing::warn!(tunnel = %header.tunnel, source = %header.source, error = %e, "cannot deliver connection");
                let _ = stream.write_u8(e.status() as u8).await;
                let _ = stream.shutdown().await;
                return None;
            }
        };
        if stream
            .write_u8(StreamStatus::Connected as u8)
            .await
            .is_err()
        {
            return None;
        }
        let side = SideLabels { side: Side::Target };
        self.metrics.connections_opened.get_or_create(&side).inc();
        let active = self.metrics.connections_active.get_or_create(&side).clone();
        active.inc();
        tracing::debug!(tunnel = %header.tunnel, source = %header.source, deliver = route.cfg.deliver.as_str(), "delivering connection");
        Some(Delivered {
            header,
            route,
            target,
            _slot: slot,
            active,
        })
    }
}

/// A connection delivered to its target, ready to splice.
struct Delivered<'a> {
    header: StreamHeader,
    route: &'a Route,
    target: TcpStream,
    /// This connection's place under `limits.max_connections`.
    _slot: tokio::sync::OwnedSemaphorePermit,
    active: Gauge,
}

impl Drop for Delivered<'_> {
    fn drop(&mut self) {
        self.active.dec();
    }
}
