//! Inbound tunnel streams from the gateway: read the header, deliver the
//! connection to the tunnel's target, answer one status byte, then splice.

use std::{collections::HashMap, sync::Arc, time::Duration};

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use relaygate_common::{
    metrics::{Side, SideLabels},
    names::TunnelName,
    protocol::{StreamHeader, StreamStatus},
    splice::splice_framed_idle,
    streams::Incoming,
};
use tokio::io::AsyncWriteExt;
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
    gateway: PeerId,
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
        gateway: PeerId,
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
            gateway,
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
            if peer != self.gateway {
                self.metrics.refuse("stream_from_unknown_peer");
                tracing::warn!(%peer, "tunnel stream from a peer that is not our gateway; dropped");
                continue;
            }
            tracker.spawn(self.clone().handle(stream.compat()));
        }
    }

    async fn handle(self: Arc<Self>, mut stream: tokio_util::compat::Compat<libp2p::Stream>) {
        let header =
            match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read(&mut stream)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    self.metrics.bad_input(e.kind());
                    tracing::warn!(error = %e, "bad tunnel stream header");
                    let _ = stream.write_u8(StreamStatus::BadHeader as u8).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                Err(_) => {
                    self.metrics.bad_input("header_timeout");
                    return;
                }
            };
        let Some(route) = self.routes.get(&header.tunnel) else {
            self.metrics.refuse("unknown_tunnel");
            tracing::warn!(tunnel = %header.tunnel, "stream for a tunnel this agent does not have");
            let _ = stream.write_u8(StreamStatus::UnknownTunnel as u8).await;
            let _ = stream.shutdown().await;
            return;
        };
        route.opened.inc();
        let Some(_slot) = self.limits.admit() else {
            let _ = stream.write_u8(StreamStatus::Busy as u8).await;
            let _ = stream.shutdown().await;
            return;
        };
        let delivery = Delivery {
            mode: route.cfg.deliver,
            target: &route.cfg.target,
            header: &header,
            timeout: self.connect_timeout,
            mark: self.mark,
        };
        let mut target = match delivery.connect().await {
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
                return;
            }
        };
        if stream
            .write_u8(StreamStatus::Connected as u8)
            .await
            .is_err()
        {
            return;
        }
        let side = SideLabels { side: Side::Target };
        self.metrics.connections_opened.get_or_create(&side).inc();
        let active = self.metrics.connections_active.get_or_create(&side).clone();
        active.inc();
        tracing::debug!(tunnel = %header.tunnel, source = %header.source, deliver = route.cfg.deliver.as_str(), "delivering connection");
        let idle = self.limits.idle_timeout;
        let (bytes_in, bytes_out) = (&route.bytes_in, &route.bytes_out);
        if let Err(e) =
            splice_framed_idle(&mut stream, &mut target, bytes_in, bytes_out, idle).await
        {
            tracing::debug!(tunnel = %header.tunnel, source = %header.source, error = %e, "connection reset");
            let _ = target.set_zero_linger();
        }
        active.dec();
    }
}
