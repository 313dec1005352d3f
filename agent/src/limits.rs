//! The agent's own caps on what it opens: connections to targets and
//! services, and visitor connections, at once; and how long any of them may
//! sit without moving a byte.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections this agent holds open at once: deliveries to tunnel
    /// targets, connections to offered services, and visitor connections.
    pub max_connections: usize,
    /// A spliced connection that moves no byte for this long is reset; `0s` never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The connection slots shared by tunnels, services and visitors.
pub struct Limits {
    slots: Arc<Semaphore>,
    pub idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
            idle_timeout: cfg.idle_timeout,
            metrics,
        })
    }

    /// A slot for one more connection, or `None` (counted as the refusal
    /// `agent_connection_limit`) when all are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics.refuse("agent_connection_limit");
            tracing::warn!("connection refused: limits.max_connections reached");
        }
        permit
    }
}

/// Raises the open-files limit for `max_connections` (one descriptor each,
/// plus the session, listeners and files).
pub fn check_open_files(cfg: &LimitsConfig) {
    let need = cfg.max_connections as u64 + 256;
    relaygate_common::nofile::raise_open_files(need, "limits.max_connections");
}
