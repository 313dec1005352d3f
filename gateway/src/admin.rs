//! The gateway's admin API routes.

use std::sync::Arc;

use axum::{extract::State, response::IntoResponse, routing::get, Json, Router};
use relaygate_common::admin::{health_response, render_metrics};

use crate::{host::HostState, metrics::Metrics, registry::AgentRegistry};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<AgentRegistry>,
    pub host: Arc<HostState>,
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
            "/v1/agents",
            get(|State(s): State<AdminState>| async move { Json(s.registry.snapshot()) }),
        )
        .with_state(state)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if !s.host.listeners_up() {
        problems.push("libp2p listeners are not all up".to_string());
    }
    health_response(problems)
}
