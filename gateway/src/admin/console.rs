//! The console's side of the gateway's admin API: one overview of the whole
//! gateway (what `/ui/` draws), its live event stream, per-agent bandwidth
//! caps, and the configuration reload.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post, put},
    Json, Router,
};
use libp2p::PeerId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AdminState;
use crate::{
    caps::Caps,
    config::bandwidth::Bandwidth,
    conns::LiveConns,
    lanes::Lanes,
    metrics::{Direction, DirectionLabels},
    reload::Reloader,
};

/// Connections listed per agent; the count says how many there are.
const CONNECTIONS_SHOWN: usize = 100;

/// What the console needs besides the admin API's own state.
pub struct Console {
    pub peer_id: PeerId,
    /// `advertise`: what the console shows as the gateway's addresses, else
    /// the ones it listens on.
    pub advertise: Vec<libp2p::Multiaddr>,
    pub started: Instant,
    pub caps: Arc<Caps>,
    pub live: Arc<LiveConns>,
    pub lanes: Arc<Lanes>,
    pub reloader: Arc<Reloader>,
}

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route(
            "/v1/overview",
            get(|State(s): State<AdminState>| async move { Json(overview(&s)) }),
        )
        .route(
            "/v1/events",
            get(|State(s): State<AdminState>| async move {
                relaygate_common::admin_ui::overview_events(move || overview(&s))
            }),
        )
        .route("/v1/agents/caps", put(set_caps).delete(clear_caps))
        .route("/v1/reload", post(reload))
}

/// The whole gateway at a glance.
pub fn overview(s: &AdminState) -> Value {
    let c = &s.console;
    let m = &s.metrics;
    let (bytes_in, bytes_out) = c.live.totals();
    let reasons = m.by_reason();
    let throttled = |d| {
        let l = DirectionLabels { direction: d };
        (
            m.bandwidth.throttled_bytes.get_or_create(&l).get(),
            m.bandwidth.held_seconds.get_or_create(&l).get(),
        )
    };
    let (ti, hi) = throttled(Direction::inbound);
    let (to, ho) = throttled(Direction::outbound);
    let mut conns = c.live.by_agent(CONNECTIONS_SHOWN);
    let agents: Vec<Value> = s
        .registry
        .snapshot()
        .into_iter()
        .map(|a| {
            let peer: Option<PeerId> = a.peer_id.parse().ok();
            let (list, open) = peer.and_then(|p| conns.remove(&p)).unwrap_or_default();
            let tunnels: Vec<Value> = a
                .tunnels
                .iter()
                .map(|t| {
                    let cap = t
                        .name
                        .parse()
                        .map(|n| c.caps.tunnel_cap(&n))
                        .unwrap_or_default();
                    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
                    if let Value::Object(o) = &mut v {
                        o.insert("caps".into(), json!(cap));
                    }
                    v
                })
                .collect();
            json!({
                "peer_id": a.peer_id,
                "remote_addr": a.remote_addr,
                "since": a.since,
                "lanes": peer.map_or(0, |p| c.lanes.count(&p)),
                "caps": peer.map(|p| c.caps.agent_cap(&p)),
                "tunnels": tunnels,
                "connections": list,
                "connections_open": open,
            })
        })
        .collect();
    let fleet = s.fleet.view();
    let fleet: Vec<Value> = if fleet.store == "etcd" {
        fleet
            .gateways
            .iter()
            .map(|g| {
                json!({
                    "peer_id": g.peer_id,
                    "addresses": g.addresses,
                    "ready": g.ready,
                    "agents": g.agents.len(),
                    "ports": g.ports.len(),
                    "self": g.peer_id == fleet.this,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "role": "gateway",
        "peer_id": c.peer_id.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": c.started.elapsed().as_secs(),
        "now": relaygate_common::clock::unix_now(),
        "addresses": crate::banner::dial_addrs(&c.advertise, &s.host.listen_addrs(), &c.peer_id)
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        "totals": {
            "sessions": m.sessions_active.get(),
            "agents": s.registry.len(),
            "leases": s.leases.count(),
            "connections": c.live.count(),
            "bytes_inbound": bytes_in,
            "bytes_outbound": bytes_out,
        },
        "refusals": reasons.refusals,
        "bad_input": reasons.bad_input,
        "throttled": {
            "inbound_bytes": ti,
            "outbound_bytes": to,
            "held_secs": hi + ho,
        },
        "bans": s.guard.list(),
        "relay": {
            "reservations": m.relay.reservations_active.get(),
            "circuits": m.relay.circuits_active.get(),
        },
        "udp": {
            "channels": m.udp.channels_active.get(),
            "flows_validated": m.udp.flows_validated.get(),
            "flows_unvalidated": m.udp.flows_unvalidated.get(),
        },
        "fleet": fleet,
        "agents": agents,
        "leases": super::leases::rows(s),
    })
}

#[derive(Deserialize)]
struct AgentQuery {
    agent: String,
}

fn agent_id(s: &AdminState, q: &AgentQuery) -> Result<PeerId, (StatusCode, String)> {
    q.agent.parse().map_err(|e| {
        s.metrics.bad_input("admin_peer_id");
        (
            StatusCode::BAD_REQUEST,
            format!("agent {:?} is not a peer id: {e}\n", q.agent),
        )
    })
}

/// Caps one agent (all its tunnels together), over `bandwidth.*`, until
/// cleared or the gateway restarts.
async fn set_caps(
    State(s): State<AdminState>,
    Query(q): Query<AgentQuery>,
    Json(cap): Json<Bandwidth>,
) -> impl IntoResponse {
    if let Err(e) = cap.check() {
        s.metrics.bad_input("admin_bandwidth");
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    match agent_id(&s, &q) {
        Err(e) => e.into_response(),
        Ok(peer) => {
            s.console.caps.set_agent(peer, Some(cap));
            tracing::info!(agent = %peer, inbound = cap.inbound, outbound = cap.outbound, burst = cap.burst, "bandwidth cap set");
            Json(s.console.caps.agent_cap(&peer)).into_response()
        }
    }
}

/// Back to the configuration's cap for the agent.
async fn clear_caps(State(s): State<AdminState>, Query(q): Query<AgentQuery>) -> impl IntoResponse {
    match agent_id(&s, &q) {
        Err(e) => e.into_response(),
        Ok(peer) => {
            s.console.caps.set_agent(peer, None);
            tracing::info!(agent = %peer, "bandwidth cap back to the configuration's");
            Json(s.console.caps.agent_cap(&peer)).into_response()
        }
    }
}

async fn reload(State(s): State<AdminState>) -> impl IntoResponse {
    match s.console.reloader.reload().await {
        Ok(r) => (StatusCode::OK, Json(json!(r))).into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}
