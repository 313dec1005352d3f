//! `/v1/leases`: every lease this gateway knows of (`GET`), and revoking
//! one (`DELETE ?agent=<peer id>&tunnel=<name>` or `?port=<n>`, with an
//! optional `reason` the agent logs).

use std::collections::HashMap;

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use libp2p::PeerId;
use relaygate_common::names::{LeasePort, TunnelName};

use super::AdminState;
use crate::{
    lease::lifecycle::{self, LeaseView},
    store::LeaseKey,
};

/// What the agent is told when no reason is given.
const DEFAULT_REASON: &str = "revoked by the gateway's operator";
/// Longest reason passed on (it travels in a control frame and a log line).
const MAX_REASON: usize = 256;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/v1/leases", get(list).delete(revoke))
}

/// The leases as `GET /v1/leases` shows them, by port (also for the console).
pub fn rows(s: &AdminState) -> Vec<LeaseView> {
    s.leases.list(&s.registry)
}

async fn list(State(s): State<AdminState>) -> Json<Vec<LeaseView>> {
    Json(rows(&s))
}

/// Which lease a `DELETE` names.
enum Target {
    Key(LeaseKey),
    Port(LeasePort),
}

/// Reads `agent` + `tunnel`, or `port`, and `reason`; a 400 message otherwise.
fn parse(q: &HashMap<String, String>) -> Result<(Target, String), String> {
    if let Some(k) = q
        .keys()
        .find(|k| !["agent", "tunnel", "port", "reason"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown parameter {k:?}: name the lease by agent and tunnel, or by port"
        ));
    }
    let reason = match q.get("reason").map(|r| r.trim()) {
        None | Some("") => DEFAULT_REASON.to_string(),
        Some(r) if r.chars().count() > MAX_REASON => {
            return Err(format!("reason is longer than {MAX_REASON} characters"))
        }
        Some(r) if r.chars().any(char::is_control) => {
            return Err("reason holds control characters".into())
        }
        Some(r) => r.to_string(),
    };
    let target = match (q.get("agent"), q.get("tunnel"), q.get("port")) {
        (None, None, Some(p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .and_then(LeasePort::new)
                .ok_or_else(|| format!("port {p:?} is not a port number (1-65535)"))?;
            Target::Port(port)
        }
        (Some(a), Some(t), None) => {
            let agent: PeerId = a
                .parse()
                .map_err(|e| format!("agent {a:?} is not a peer id: {e}"))?;
            let tunnel: TunnelName = t
                .parse()
                .map_err(|e| format!("tunnel {t:?} is not a tunnel name: {e}"))?;
            Target::Key(LeaseKey { agent, tunnel })
        }
        (_, _, Some(_)) => {
            return Err("give either port, or agent and tunnel, not both".into());
        }
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err("give agent and tunnel together (or port alone)".into());
        }
        (None, None, None) => {
            return Err("name the lease: ?agent=<peer id>&tunnel=<name>, or ?port=<number>".into());
        }
    };
    Ok((target, reason))
}

async fn revoke(State(s): State<AdminState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (target, reason) = match parse(&q) {
        Ok(t) => t,
        Err(msg) => {
            s.metrics.bad_input("admin_lease_query");
            return (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response();
        }
    };
    let unavailable = |e: crate::store::StoreError| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}; the lease is kept, try again\n"),
        )
            .into_response()
    };
    let key = match target {
        Target::Key(key) => match s.leases.find(&key).await {
            Ok(Some(_)) => key,
            Ok(None) => {
                return not_found(&format!(
                    "agent {} holds no lease for tunnel {}",
                    key.agent, key.tunnel
                ))
            }
            Err(e) => return unavailable(e),
        },
        Target::Port(port) => match s.leases.holder(port).await {
            Ok(Some(key)) => key,
            Ok(None) => return not_found(&format!("no lease holds port {port}")),
            Err(e) => return unavailable(e),
        },
    };
    match lifecycle::revoke(&s.leases, &s.registry, &key, &reason).await {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => not_found(&format!("the lease of {key} was freed meanwhile")),
        Err(e) => unavailable(e),
    }
}

fn not_found(msg: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("{msg}\n")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_lease_is_named_by_agent_and_tunnel_or_by_port() {
        let peer = PeerId::random().to_string();
        assert!(matches!(
            parse(&q(&[("agent", &peer), ("tunnel", "node")])),
            Ok((Target::Key(_), r)) if r == DEFAULT_REASON
        ));
        assert!(matches!(
            parse(&q(&[("port", "20000"), ("reason", "moving")])),
            Ok((Target::Port(p), r)) if p.get() == 20000 && r == "moving"
        ));
        for bad in [
            q(&[]),
            q(&[("port", "0")]),
            q(&[("port", "70000")]),
            q(&[("port", "x")]),
            q(&[("agent", &peer)]),
            q(&[("tunnel", "node")]),
            q(&[("agent", "nope"), ("tunnel", "node")]),
            q(&[("agent", &peer), ("tunnel", "a b")]),
            q(&[("agent", &peer), ("tunnel", "node"), ("port", "20000")]),
            q(&[("peer", &peer), ("tunnel", "node")]),
            q(&[("port", "20000"), ("reason", "a\nb")]),
            q(&[("port", "20000"), ("reason", &"x".repeat(300))]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }
}
