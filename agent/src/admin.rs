//! The agent's admin API routes.

use std::sync::Arc;

use axum::{extract::State, routing::get, Json, Router};
use relaygate_common::admin::{health_response, render_metrics};
use serde_json::json;

use crate::{metrics::Metrics, paths::Paths, state::AgentState};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub state: Arc<AgentState>,
    pub paths: Arc<Paths>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move { render_metrics(&s.metrics.registry) }),
        )
        .route("/health/live", get(|| async { "ok\n" }))
        .route(
            "/health/ready",
            get(|State(s): State<AdminState>| async move { health_response(s.state.problems()) }),
        )
        .route(
            "/v1/advertise",
            get(|State(s): State<AdminState>| async move {
                Json(json!({
                    "session": s.state.session(),
                    "sessions": s.state.sessions(),
                    "fleet": s.state.fleet(),
                    "tunnels": s.state.tunnels(),
                    "circuit": s.state.circuit_addrs(),
                    "reachability": s.state.reachability(),
                }))
            }),
        )
        .route(
            "/v1/peers",
            get(|State(s): State<AdminState>| async move { Json(s.paths.snapshot()) }),
        )
        .merge(relaygate_common::admin_ui::routes())
        .with_state(state)
}
