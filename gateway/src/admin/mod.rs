//! The gateway's admin API routes.

pub mod console;
mod leases;

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use relaygate_common::admin::{health_response, render_metrics};
use serde::Deserialize;

use crate::{
    fleet::members::Fleet,
    guard::{BanRequest, BanSource, BanTarget, Guard},
    host::{HostHandle, HostState},
    lease::Leases,
    metrics::Metrics,
    nodes::NodeBook,
    registry::AgentRegistry,
};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<AgentRegistry>,
    pub host: Arc<HostState>,
    pub guard: Arc<Guard>,
    /// Closes the connections of a peer banned at runtime.
    pub disconnect: HostHandle,
    /// The gateways of the fleet (this one alone with the embedded store).
    pub fleet: Arc<Fleet>,
    /// Which agent fronts which node id.
    pub nodes: Arc<NodeBook>,
    /// Which tunnel holds which public port.
    pub leases: Arc<Leases>,
    /// What the console shows and does besides.
    pub console: Arc<console::Console>,
}

#[derive(Deserialize)]
struct NodeQuery {
    node: String,
}

/// Lets go of a node id (an agent that fronted it is gone for good, say):
/// the next claim on it, from any agent, is checked afresh.
async fn clear_node(State(s): State<AdminState>, Query(q): Query<NodeQuery>) -> impl IntoResponse {
    match q.node.parse::<libp2p::PeerId>() {
        Err(e) => (StatusCode::BAD_REQUEST, format!("not a peer id: {e}\n")).into_response(),
        Ok(n) if s.nodes.clear(&n) => StatusCode::NO_CONTENT.into_response(),
        Ok(n) => (StatusCode::NOT_FOUND, format!("no agent fronts {n}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct TargetQuery {
    target: String,
}

async fn ban(State(s): State<AdminState>, Json(req): Json<BanRequest>) -> impl IntoResponse {
    let target = req.target.clone();
    let view = s.guard.ban(req, BanSource::Admin);
    // Connections already open from the banned peer or network are closed too.
    s.disconnect.close_banned(&[target]).await;
    (StatusCode::CREATED, Json(view))
}

async fn unban(State(s): State<AdminState>, Query(q): Query<TargetQuery>) -> impl IntoResponse {
    match q.target.parse::<BanTarget>() {
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
        Ok(t) if s.guard.unban(&t) => StatusCode::NO_CONTENT.into_response(),
        Ok(t) => (StatusCode::NOT_FOUND, format!("no ban on {t}\n")).into_response(),
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move { render_metrics(&s.metrics.registry) }),
        )
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route(
            "/v1/blacklist",
            get(|State(s): State<AdminState>| async move { Json(s.guard.list()) })
                .post(ban)
                .delete(unban),
        )
        .route(
            "/v1/agents",
            get(|State(s): State<AdminState>| async move { Json(s.registry.snapshot()) }),
        )
        .route(
            "/v1/nodes",
            get(|State(s): State<AdminState>| async move { Json(s.nodes.list()) })
                .delete(clear_node),
        )
        .route(
            "/v1/fleet",
            get(|State(s): State<AdminState>| async move { Json(s.fleet.view()) }),
        )
        .merge(console::routes())
        .merge(leases::routes())
        .merge(relaygate_common::admin_ui::routes())
        .with_state(state)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if !s.host.listeners_up() {
        problems.push("libp2p listeners are not all up".to_string());
    }
    health_response(problems)
}
