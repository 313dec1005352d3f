//! What the agent's console shows: one overview (who it is, its sessions,
//! tunnels and advertised addresses, circuit addresses, peers with their
//! hole-punch records, the last doctor run), built in one place for
//! `GET /v1/overview` and the `/v1/events` stream; and the doctor runs
//! behind it (`POST /v1/doctor` runs one here, `PUT /v1/doctor` takes the
//! CLI's report), one at a time.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use libp2p::{identity::Keypair, PeerId};
use serde::Serialize;

use crate::{
    config::AgentConfig,
    doctor::{self, DoctorReport},
    paths::{Paths, PeerView},
    state::{AdvertiseView, AgentState},
};

/// `GET /v1/overview`.
#[derive(Serialize)]
pub struct Overview {
    /// Always `agent`: the page draws an agent or a gateway by it.
    pub role: &'static str,
    pub peer_id: String,
    pub version: &'static str,
    pub uptime_secs: u64,
    /// What `/v1/advertise` returns.
    pub advertise: AdvertiseView,
    /// What `/v1/peers` returns.
    pub peers: Vec<PeerView>,
    /// The last doctor run, in process or from the CLI (`null`: none yet).
    pub doctor: Option<DoctorReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("a doctor run is under way (started {0} s ago, it takes at most {limit} s): wait for it, its report is then in GET /v1/overview", limit = doctor::IN_PROCESS_LIMIT.as_secs())]
    Busy(u64),
    #[error("the doctor run failed: {0}")]
    Failed(String),
}

pub struct Console {
    peer_id: PeerId,
    started: Instant,
    state: Arc<AgentState>,
    paths: Arc<Paths>,
    /// What an in-process doctor run needs: the configuration the agent
    /// runs with and its identity.
    cfg: AgentConfig,
    key: Keypair,
    last: Mutex<Option<DoctorReport>>,
    /// When the in-process run under way started (`None`: none is).
    running: Mutex<Option<Instant>>,
}

/// Clears `running` when the run ends, however it ends.
struct RunGuard(Arc<Console>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        *lock(&self.0.running) = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Console {
    pub fn new(
        peer_id: PeerId,
        started: Instant,
        state: Arc<AgentState>,
        paths: Arc<Paths>,
        cfg: AgentConfig,
        key: Keypair,
    ) -> Self {
        Console {
            peer_id,
            started,
            state,
            paths,
            cfg,
            key,
            last: Mutex::new(None),
            running: Mutex::new(None),
        }
    }

    pub fn overview(&self) -> Overview {
        Overview {
            role: "agent",
            peer_id: self.peer_id.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.started.elapsed().as_secs(),
            advertise: self.state.advertise(),
            peers: self.paths.snapshot(),
            doctor: self.last_doctor(),
        }
    }

    /// The overview as JSON (for the event stream).
    pub fn overview_json(&self) -> serde_json::Value {
        serde_json::to_value(self.overview()).unwrap_or_else(
            |e| serde_json::json!({"role": "agent", "error": format!("overview: {e}")}),
        )
    }

    pub fn last_doctor(&self) -> Option<DoctorReport> {
        lock(&self.last).clone()
    }

    /// Keeps `report` as the last run (the CLI's, handed over).
    pub fn set_doctor(&self, report: DoctorReport) {
        *lock(&self.last) = Some(report);
    }

    /// Runs the doctor here, against this agent, and keeps its report. One
    /// run at a time: a second call while one is under way is refused
    /// (`Busy`). The run is a task of its own, so a client that goes away
    /// does not cut it short; it ends within [`doctor::IN_PROCESS_LIMIT`].
    pub async fn run_doctor(self: &Arc<Self>) -> Result<DoctorReport, DoctorError> {
        {
            let mut running = lock(&self.running);
            if let Some(since) = *running {
                return Err(DoctorError::Busy(since.elapsed().as_secs()));
            }
            *running = Some(Instant::now());
        }
        let guard = RunGuard(self.clone());
        let me = self.clone();
        let task = tokio::spawn(async move {
            let report = doctor::run_in_process(&me.cfg, me.key.clone(), &me.state).await;
            tracing::info!(
                healthy = report.healthy,
                checks = report.checks.len(),
                "doctor ran in process"
            );
            me.set_doctor(report.clone());
            drop(guard);
            report
        });
        task.await.map_err(|e| DoctorError::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_doctor_run_at_a_time_and_the_last_is_kept() {
        // A "gateway" that accepts TCP and never answers: each dial of the
        // run waits for its whole dial timeout.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let mut cfg = AgentConfig::default();
        cfg.gateway.addresses = vec![
            format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", PeerId::random())
                .parse()
                .expect("multiaddr"),
        ];
        cfg.gateway.dial_timeout = Duration::from_secs(2);
        let console = Arc::new(Console::new(
            PeerId::random(),
            Instant::now(),
            Arc::default(),
            Arc::default(),
            cfg,
            Keypair::generate_ed25519(),
        ));
        assert_eq!(console.overview().doctor, None);

        let first = tokio::spawn({
            let c = console.clone();
            async move { c.run_doctor().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = console.run_doctor().await;
        assert!(matches!(second, Err(DoctorError::Busy(_))), "{second:?}");

        let report = first.await.expect("join").expect("first run");
        assert!(!report.healthy, "{report:?}");
        assert!(
            report
                .checks
                .iter()
                .any(|c| c.name == "gateway" && !c.ok && c.detail.contains("; fix: ")),
            "{report:?}"
        );
        assert_eq!(console.overview().doctor.as_ref(), Some(&report));

        // Over: the next run may start, and a report handed over replaces it.
        let again = console.run_doctor().await.expect("second run");
        assert!(again.ran_at >= report.ran_at);
        let handed = DoctorReport {
            ran_at: again.ran_at + 1,
            healthy: true,
            checks: vec![],
        };
        console.set_doctor(handed.clone());
        assert_eq!(console.last_doctor(), Some(handed));
        let overview = console.overview_json();
        assert_eq!(overview["role"], "agent");
        assert_eq!(overview["doctor"]["healthy"], true);
    }
}
