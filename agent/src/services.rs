//! Services this agent offers to peers by peer id: an inbound service stream
//! names the service; the caller must be on its allow-list; the agent connects
//! to the local target (optionally announcing the caller's authenticated peer
//! id in a PROXY v2 header), answers one status byte and splices the bytes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use libp2p::{swarm::ConnectionId, Multiaddr, PeerId, Stream};
use relaygate_common::{
    names::ServiceName,
    protocol::{ServiceRequest, StreamStatus},
    proxy,
    splice::splice_framed_idle,
};
use tokio::io::AsyncWriteExt;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::{
    config::{ServiceConfig, ServiceProxy},
    deliver::connect_plain,
    limits::Limits,
    metrics::{Metrics, Path, Role, ServiceBytesLabels, ServiceStreamLabels},
    paths::Paths,
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Services {
    services: HashMap<ServiceName, ServiceConfig>,
    paths: Arc<Paths>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    limits: Arc<Limits>,
}

impl Services {
    pub fn new(
        services: &[ServiceConfig],
        paths: Arc<Paths>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        limits: Arc<Limits>,
    ) -> Self {
        Self {
            services: services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            paths,
            metrics,
            connect_timeout,
            limits,
        }
    }

    /// Serves one inbound service stream from `peer`.
    pub async fn serve(self: Arc<Self>, peer: PeerId, connection: ConnectionId, stream: Stream) {
        let (remote, relayed) = self
            .paths
            .remote(connection)
            .unwrap_or((Multiaddr::empty(), true));
        let path = Path::of(relayed);
        let mut stream = stream.compat();
        // A peer on no allow-list learns nothing, not even which names exist,
        // and costs no wait for its request.
        if !self.services.values().any(|s| s.allow.contains(&peer)) {
            self.metrics.refuse("service_not_allowed");
            tracing::debug!(%peer, "peer is on no service's allow-list; refused");
            let _ = stream.write_all(&[StreamStatus::NotAllowed as u8]).await;
            let _ = stream.shutdown().await;
            return self.count(path, StreamStatus::NotAllowed.as_str());
        }
        let req =
            match tokio::time::timeout(REQUEST_TIMEOUT, ServiceRequest::read(&mut stream)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    self.metrics.bad_input(e.kind());
                    let _ = stream.write_all(&[StreamStatus::BadHeader as u8]).await;
                    return self.count(path, "bad_header");
                }
                Err(_) => {
                    self.metrics.bad_input("service_request_timeout");
                    return self.count(path, "timeout");
                }
            };
        let Some(svc) = self.services.get(&req.service) else {
            tracing::info!(%peer, service = %req.service, "service stream for an unknown service");
            let _ = stream.write_all(&[StreamStatus::UnknownTunnel as u8]).await;
            return self.count(path, StreamStatus::UnknownTunnel.as_str());
        };
        if !svc.allow.contains(&peer) {
            self.metrics.refuse("service_not_allowed");
            tracing::warn!(%peer, service = %svc.name, "peer is not on the service's allow-list; refused");
            let _ = stream.write_all(&[StreamStatus::NotAllowed as u8]).await;
            let _ = stream.shutdown().await;
            return self.count(path, StreamStatus::NotAllowed.as_str());
        }
        let Some(_slot) = self.limits.admit() else {
            let _ = stream.write_all(&[StreamStatus::Busy as u8]).await;
            let _ = stream.shutdown().await;
            return self.count(path, StreamStatus::Busy.as_str());
        };
        let mut target = match connect_plain(&svc.target, self.connect_timeout).await {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(%peer, service = %svc.name, error = %e, "service target unavailable");
                let _ = stream.write_all(&[e.status() as u8]).await;
                let _ = stream.shutdown().await;
                return self.count(path, e.reason());
            }
        };
        if svc.proxy_protocol == ServiceProxy::V2 {
            let addrs = (!relayed)
                .then(|| relaygate_common::proxy_transport::socket_addr_of(&remote))
                .flatten()
                .zip(target.peer_addr().ok());
            let header = proxy::encode_v2_for_peer(addrs, &peer);
            if target.write_all(&header).await.is_err() {
                let _ = stream.write_all(&[StreamStatus::TargetRefused as u8]).await;
                return self.count(path, "target_refused");
            }
        }
        if stream
            .write_all(&[StreamStatus::Connected as u8])
            .await
            .is_err()
        {
            return self.count(path, "caller_gone");
        }
        self.count(path, StreamStatus::Connected.as_str());
        tracing::debug!(%peer, service = %svc.name, ?path, "service stream connected");
        let bytes = self
            .metrics
            .peers
            .service_bytes
            .get_or_create(&ServiceBytesLabels {
                role: Role::Offer,
                path,
            })
            .clone();
        let idle = self.limits.idle_timeout;
        if splice_framed_idle(&mut stream, &mut target, &bytes, &bytes, idle)
            .await
            .is_err()
        {
            // Reset: make the target see an abortive close, not a clean end.
            let _ = target.set_zero_linger();
        }
    }

    fn count(&self, path: Path, result: &str) {
        self.metrics
            .peers
            .service_streams
            .get_or_create(&ServiceStreamLabels {
                role: Role::Offer,
                path,
                result: result.into(),
            })
            .inc();
    }
}
