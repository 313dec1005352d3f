//! Shutdown: wait for SIGINT or SIGTERM, then give open connections a grace
//! period to drain before the process exits.

use std::{future::Future, time::Duration};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::TaskTracker;

/// Resolves on the first SIGINT or SIGTERM, naming it.
pub async fn signal_received() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers we can only wait forever; the process is killed instead.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Closes `tracker` and waits for its tasks up to `grace`. Returns how many were still running.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> usize {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracker.len()
    } else {
        0
    }
}

/// Runs `fut` until it completes or a signal arrives.
pub async fn until_signal<F: Future>(fut: F) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        _ = signal_received() => None,
    }
}
