//! Revoking a lease and listing leases, across the table, the store and the
//! live sessions: a revoked lease's public port stops accepting (connections
//! already open finish), the lease is freed, and the agent is told on its
//! control stream, so it asks for a new one.

use std::time::Duration;

use relaygate_common::names::LeasePort;
use serde::Serialize;

use super::{now_ms, FreeReason, Leases};
use crate::{
    registry::{AgentRegistry, LeaseNotice, Notices},
    store::{LeaseKey, StoreError},
};

/// How long a closing public port may take to stop accepting.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One lease as `GET /v1/leases` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LeaseView {
    pub agent: String,
    pub tunnel: String,
    pub port: u16,
    /// The agent holds a session on this gateway now.
    pub in_session: bool,
    /// When a session last used the lease, in seconds since the UNIX epoch
    /// (now, while in session here).
    pub last_active: u64,
}

impl Leases {
    /// Every lease this gateway knows of (its own, and those the store held
    /// for other gateways at the last sweep), by port.
    pub fn list(&self, registry: &AgentRegistry) -> Vec<LeaseView> {
        let here = registry.agents();
        let now = now_ms();
        let t = self.lock();
        let view = |k: &LeaseKey, port: LeasePort, at: Option<u64>| {
            let in_session = here.contains(&k.agent);
            LeaseView {
                agent: k.agent.to_string(),
                tunnel: k.tunnel.to_string(),
                port: port.get(),
                in_session,
                last_active: if in_session { now } else { at.unwrap_or(now) } / 1000,
            }
        };
        let mut out: Vec<LeaseView> = t
            .by_key
            .iter()
            .map(|(k, p)| view(k, *p, t.active.get(k).copied()))
            .chain(t.others.iter().map(|(k, (p, at))| view(k, *p, *at)))
            .collect();
        out.sort_by_key(|l| l.port);
        out
    }
}

/// Stops serving `key`'s tunnel on this gateway, if a session here serves
/// it, and tells that session why; waits until the port is closed.
pub async fn close(registry: &AgentRegistry, key: &LeaseKey, why: &str) {
    if let Some(session) = stop_serving(registry, key).await {
        tell(&session, key, why);
    }
}

/// Revokes `key`'s lease: closes its port where served here, frees it from
/// the table and the store, and tells the agent `why`. The port it held
/// (None: no such lease).
pub async fn revoke(
    leases: &Leases,
    registry: &AgentRegistry,
    key: &LeaseKey,
    why: &str,
) -> Result<Option<LeasePort>, StoreError> {
    tracing::info!(lease = %key, reason = why, "revoking the lease");
    // The port closes before it is freed: another tunnel may be given it at once.
    let session = stop_serving(registry, key).await;
    let freed = leases.free(key, FreeReason::Revoked).await;
    // Told even when the store failed: its port is closed either way, and
    // asking again gives it its lease back.
    if let Some(session) = session {
        tell(&session, key, why);
    }
    freed
}

/// Closes `key`'s public port here, if served; where to tell its session.
async fn stop_serving(registry: &AgentRegistry, key: &LeaseKey) -> Option<Notices> {
    let (task, notices) = registry.close_tunnel(&key.agent, &key.tunnel)?;
    if tokio::time::timeout(CLOSE_TIMEOUT, task).await.is_err() {
        tracing::warn!(lease = %key, "public port slow to close");
    }
    Some(notices)
}

fn tell(session: &Notices, key: &LeaseKey, why: &str) {
    // The session may have ended meanwhile: then there is no one to tell.
    let _ = session.send(LeaseNotice {
        tunnel: key.tunnel.clone(),
        reason: why.to_string(),
    });
}
