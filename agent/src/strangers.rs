//! Who may connect to this agent: its gateways (AutoNAT dials back), and the
//! peers on a service's allow-list (visitors, through the relay and then
//! directly after DCUtR). Anyone else is refused as its connection is
//! established, before identify, DCUtR (which would make the agent dial
//! addresses a stranger names) or any stream runs. Counted as
//! `refusals_total{reason="stranger"}`.

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    swarm::{
        dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

use crate::metrics::Metrics;

pub struct Strangers {
    allowed: HashSet<PeerId>,
    /// The fleet's gateways this agent trusts, which change as it learns them.
    gateways: Arc<crate::gateways::Gateways>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0} is a stranger: not this agent's gateway, on no service's allow-list")]
struct Stranger(PeerId);

impl Strangers {
    pub fn new(
        allowed: impl IntoIterator<Item = PeerId>,
        gateways: Arc<crate::gateways::Gateways>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
            gateways,
            metrics,
        }
    }
}

impl NetworkBehaviour for Strangers {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if self.allowed.contains(&peer) || self.gateways.contains(&peer) {
            return Ok(dummy::ConnectionHandler);
        }
        self.metrics.refuse("stranger");
        tracing::debug!(%peer, "inbound connection from a stranger refused");
        Err(ConnectionDenied::new(Stranger(peer)))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
