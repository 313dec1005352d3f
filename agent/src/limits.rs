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

/// Raises the open-files limit to its hard maximum and warns when even that
/// is below what `max_connections` can use (one descriptor each, plus the
/// session, listeners and files).
pub fn check_open_files(cfg: &LimitsConfig) {
    let need = cfg.max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(need) {
        Ok(got) if got < need => tracing::warn!(
            limit = got, need,
            "open-files limit is below what limits.max_connections can use; raise it to {need} (ulimit -n {need}, or LimitNOFILE={need} in the systemd unit) or lower limits.max_connections"
        ),
        Ok(got) => tracing::debug!(limit = got, need, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, need, "cannot read the open-files limit"),
    }
}
