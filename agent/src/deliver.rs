//! Delivery: how a tunnelled connection reaches the local target.

use std::{io, time::Duration};

use relaygate_common::protocol::{StreamHeader, StreamStatus};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::config::TargetAddr;

/// How the agent's connection to the target is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// A plain TCP connection from the agent; the target sees the agent's address.
    #[default]
    Plain,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Plain => "plain",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("target {target} refused: {source}")]
    Refused { target: String, source: io::Error },
    #[error("target {target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

impl DeliverError {
    /// What the gateway is told.
    pub fn status(&self) -> StreamStatus {
        match self {
            DeliverError::Refused { .. } => StreamStatus::TargetRefused,
            DeliverError::Timeout { .. } => StreamStatus::TargetUnreachable,
        }
    }
    pub fn reason(&self) -> &'static str {
        self.status().as_str()
    }
}

/// Connects to `target` on behalf of the remote described by `header`.
pub async fn connect(
    mode: DeliveryMode,
    target: &TargetAddr,
    _header: &StreamHeader,
    timeout: Duration,
) -> Result<TcpStream, DeliverError> {
    let t = target.to_string();
    let fut = async {
        match mode {
            DeliveryMode::Plain => TcpStream::connect((target.host.as_str(), target.port)).await,
        }
    };
    let stream = match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(DeliverError::Refused { target: t, source }),
        Err(_) => return Err(DeliverError::Timeout { target: t, timeout }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
