//! The agent's admin API routes.

use std::sync::Arc;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use relaygate_common::admin::{health_response, render_metrics};

use crate::{
    console::{Console, DoctorError},
    doctor::DoctorReport,
    metrics::Metrics,
    paths::Paths,
    state::AgentState,
};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub state: Arc<AgentState>,
    pub paths: Arc<Paths>,
    pub console: Arc<Console>,
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
            get(|State(s): State<AdminState>| async move { Json(s.state.advertise()) }),
        )
        .route(
            "/v1/peers",
            get(|State(s): State<AdminState>| async move { Json(s.paths.snapshot()) }),
        )
        .route(
            "/v1/overview",
            get(|State(s): State<AdminState>| async move { Json(s.console.overview()) }),
        )
        .route(
            "/v1/events",
            get(|State(s): State<AdminState>| async move {
                let console = s.console.clone();
                relaygate_common::admin_ui::overview_events(move || console.overview_json())
            }),
        )
        .route("/v1/doctor", post(run_doctor).put(put_doctor))
        .merge(relaygate_common::admin_ui::routes())
        .with_state(state)
}

/// `POST /v1/doctor`: runs the doctor here and answers its report (409 while
/// another run is under way).
async fn run_doctor(State(s): State<AdminState>) -> Response {
    match s.console.run_doctor().await {
        Ok(report) => Json(report).into_response(),
        Err(e @ DoctorError::Busy(_)) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(e @ DoctorError::Failed(_)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// `PUT /v1/doctor`: the CLI's report, kept as the last run.
async fn put_doctor(State(s): State<AdminState>, Json(report): Json<DoctorReport>) -> Response {
    if let Some(why) = report.refusal() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("doctor report refused: {why}\n"),
        )
            .into_response();
    }
    s.console.set_doctor(report);
    StatusCode::NO_CONTENT.into_response()
}
