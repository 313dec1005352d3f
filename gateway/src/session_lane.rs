//! A lane on one stream of an agent's session, for agents without a lane of
//! their own (the gateway's TCP port unreachable from them, or either side
//! set `session.data_path = "session"`). Their tunnelled connections then get
//! the lane's multiplexer and flow control as well: the one stream under it is
//! always read, so a public client that stops reading holds its own window,
//! never the session's (QUIC and yamux windows are per connection too, and a
//! stream left unread holds its share of them). Opened by the gateway when the
//! first connection needs it; an agent from before session lanes answers
//! "unsupported" and its connections travel as session streams.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::{
    lane::{Lane, LaneConfig, LaneFlow, LaneKeys, LaneLink, Role},
    protocol::{LANE_PROTOCOL, LANE_SECRET_LEN},
    streams::{Control, OpenError},
};
use tokio::io::AsyncWriteExt;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::{lanes::Lanes, metrics::Metrics, registry::AgentRegistry};

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One agent's session lane, or why it has none.
#[derive(Default)]
enum Cell {
    #[default]
    None,
    Up(Arc<Lane>),
    /// The agent does not speak it on this session's connection.
    Unsupported(ConnectionId),
}

type Shared = Arc<tokio::sync::Mutex<Cell>>;

pub struct SessionLanes {
    control: Control,
    lanes: Arc<Lanes>,
    registry: Arc<AgentRegistry>,
    metrics: Arc<Metrics>,
    cfg: LaneConfig,
    cells: Mutex<HashMap<PeerId, Shared>>,
}

impl SessionLanes {
    pub fn new(
        control: Control,
        lanes: Arc<Lanes>,
        registry: Arc<AgentRegistry>,
        metrics: Arc<Metrics>,
        cfg: LaneConfig,
    ) -> Self {
        Self {
            control,
            lanes,
            registry,
            metrics,
            cfg: LaneConfig {
                flow: LaneFlow::Tuned,
                ..cfg
            },
            cells: Mutex::default(),
        }
    }

    /// `agent`'s session lane on `connection`, opened now if there is none;
    /// `None` when the agent does not speak it (or it could not be opened).
    /// Connections of one agent wait for one open; other agents' do not.
    pub async fn get(
        self: &Arc<Self>,
        agent: PeerId,
        connection: ConnectionId,
    ) -> Option<Arc<Lane>> {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(agent)
            .or_default()
            .clone();
        let mut held = cell.lock().await;
        match &*held {
            Cell::Up(lane) if !lane.is_closed() => return Some(lane.clone()),
            Cell::Unsupported(c) if *c == connection => return None,
            _ => {}
        }
        match self.open(agent, connection).await {
            Ok(lane) => {
                *held = Cell::Up(lane.clone());
                tokio::spawn(self.clone().keep(agent, cell.clone(), Some(lane.clone())));
                Some(lane)
            }
            Err(OpenError::Unsupported(_)) => {
                *held = Cell::Unsupported(connection);
                tokio::spawn(self.clone().keep(agent, cell.clone(), None));
                None
            }
            Err(e) => {
                self.metrics.dial_failed("session_lane");
                tracing::debug!(%agent, error = %e, "cannot open a session lane");
                None
            }
        }
    }

    async fn open(&self, agent: PeerId, connection: ConnectionId) -> Result<Arc<Lane>, OpenError> {
        let open = self
            .control
            .open_stream_on(agent, connection, LANE_PROTOCOL);
        let mut stream = tokio::time::timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| OpenError::Timeout)??
            .compat();
        let secret: [u8; LANE_SECRET_LEN] = rand::random();
        stream.write_all(&secret).await?;
        let link = LaneLink {
            budget: self.lanes.budget(agent),
            // The session's round-trip time is not exposed; windows then grow
            // eagerly, within the agent's budget.
            rtt: None,
        };
        let keys = LaneKeys::from_secret(&secret, Role::Listener);
        tracing::debug!(%agent, "session lane up");
        Ok(Lane::start(stream, keys, self.cfg, link))
    }

    /// Closes the lane with the agent's session, and forgets the cell (the
    /// lane, or that the agent has none) once either ends.
    async fn keep(self: Arc<Self>, agent: PeerId, cell: Shared, lane: Option<Arc<Lane>>) {
        let lane_closed = async {
            match &lane {
                Some(l) => l.closed().await,
                None => std::future::pending().await,
            }
        };
        if let Some(session) = self.registry.cancel_token(&agent) {
            tokio::select! {
                () = lane_closed => {}
                () = session.cancelled() => {}
            }
        }
        if let Some(l) = &lane {
            l.close();
        }
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        if cells.get(&agent).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            cells.remove(&agent);
        }
    }
}
