//! UDP tunnels: leased UDP ports whose datagrams reach the agent over its
//! datagram channel (QUIC datagrams, `relaygate_common::dgram`), a flow per
//! remote address and port.
//!
//! `channel.rs` takes agents' channels, `port.rs` serves one leased port
//! (its socket and flows), `flows.rs` is a port's flow table and budget.

pub mod channel;
pub mod flows;
pub mod metrics;
pub mod port;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use libp2p::PeerId;
use relaygate_common::{dgram::CloseReason, protocol::StreamStatus};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{config::udp::UdpConfig, guard::Guard, metrics::Metrics};

/// Frames from the agent waiting for one port's task; beyond, dropped.
const PORT_QUEUE: usize = 1024;
/// Of the channel's 256 KiB send buffer, what only flows that proved their
/// address may fill.
pub const RESERVED_FOR_VALIDATED: usize = 128 << 10;
/// Node datagrams held for all unvalidated remotes together.
const HOLD_TOTAL: usize = 8 << 20;

/// A frame from the agent, for a port's task.
#[derive(Debug)]
pub enum FromAgent {
    Data { flow: u32, payload: Bytes },
    Opened { flow: u32, status: StreamStatus },
    Close { flow: u32, reason: CloseReason },
}

/// What the gateway's UDP tunnels share: settings, the agents with UDP
/// ports, and gateway-wide bounds.
pub struct UdpPlane {
    pub cfg: UdpConfig,
    pub metrics: Arc<Metrics>,
    pub guard: Arc<Guard>,
    /// `bandwidth.*` and admin caps: datagrams over them are dropped.
    pub caps: Arc<crate::caps::Caps>,
    agents: Mutex<HashMap<PeerId, Arc<AgentUdp>>>,
    /// Flows on the gateway, against `udp.max_flows`.
    pub flows: Arc<AtomicUsize>,
    /// Bytes held for unvalidated remotes, against [`HOLD_TOTAL`].
    pub held: AtomicUsize,
    /// Cancelled at shutdown: no new flows.
    pub stop_accepting: CancellationToken,
}

/// One agent session's UDP side: its channel, when up, and its ports.
pub struct AgentUdp {
    pub peer: PeerId,
    channel: Mutex<Option<quinn::Connection>>,
    ports: Mutex<HashMap<u8, mpsc::Sender<FromAgent>>>,
    next_slot: Mutex<u16>,
    /// The session's token: the channel lives no longer.
    pub session: CancellationToken,
}

/// Why a datagram for the agent did not go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailed {
    NoChannel,
    TooLarge,
    ChannelFull,
    /// The share of the send buffer strangers may use is full.
    ChannelBusy,
}

impl SendFailed {
    pub fn as_str(self) -> &'static str {
        match self {
            SendFailed::NoChannel => "no_channel",
            SendFailed::TooLarge => "too_large",
            SendFailed::ChannelFull => "channel_full",
            SendFailed::ChannelBusy => "channel_busy_unvalidated",
        }
    }
}

impl UdpPlane {
    pub fn new(
        cfg: UdpConfig,
        metrics: Arc<Metrics>,
        guard: Arc<Guard>,
        caps: Arc<crate::caps::Caps>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            metrics,
            guard,
            caps,
            agents: Mutex::default(),
            flows: Arc::default(),
            held: AtomicUsize::new(0),
            stop_accepting: CancellationToken::new(),
        })
    }

    /// The UDP side of a new session of `peer` (replacing an older one).
    pub fn session(&self, peer: PeerId, session: &CancellationToken) -> Arc<AgentUdp> {
        let a = Arc::new(AgentUdp {
            peer,
            channel: Mutex::default(),
            ports: Mutex::default(),
            next_slot: Mutex::new(0),
            session: session.clone(),
        });
        if let Some(old) = lock(&self.agents).insert(peer, a.clone()) {
            old.close_channel("replaced by a new session");
        }
        a
    }

    /// The session ended: its channel closes (its ports' tasks end with the
    /// session's token).
    pub fn end(&self, a: &Arc<AgentUdp>) {
        let mut agents = lock(&self.agents);
        if agents.get(&a.peer).is_some_and(|x| Arc::ptr_eq(x, a)) {
            agents.remove(&a.peer);
        }
        drop(agents);
        a.close_channel("session over");
    }

    pub fn agent(&self, peer: &PeerId) -> Option<Arc<AgentUdp>> {
        lock(&self.agents).get(peer).cloned()
    }

    /// Takes `n` bytes of the shared hold, if there is room.
    pub fn try_hold(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                (h + n <= HOLD_TOTAL).then_some(h + n)
            })
            .is_ok()
    }

    pub fn unhold(&self, n: usize) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            });
    }
}

impl AgentUdp {
    /// A slot and queue for a new port of this session; None past 256 ports.
    pub fn add_port(&self) -> Option<(u8, mpsc::Receiver<FromAgent>)> {
        let mut next = lock(&self.next_slot);
        let slot = u8::try_from(*next).ok()?;
        *next += 1;
        let (tx, rx) = mpsc::channel(PORT_QUEUE);
        lock(&self.ports).insert(slot, tx);
        Some((slot, rx))
    }

    pub fn port(&self, slot: u8) -> Option<mpsc::Sender<FromAgent>> {
        lock(&self.ports).get(&slot).cloned()
    }

    pub fn remove_port(&self, slot: u8) {
        lock(&self.ports).remove(&slot);
    }

    /// Sets the channel, closing one it replaces.
    pub fn set_channel(&self, conn: quinn::Connection) {
        if let Some(old) = lock(&self.channel).replace(conn) {
            old.close(0u32.into(), b"replaced by a newer channel");
        }
    }

    /// Forgets `conn` if it is still the channel.
    pub fn channel_gone(&self, conn: &quinn::Connection) {
        let mut c = lock(&self.channel);
        if c.as_ref()
            .is_some_and(|x| x.stable_id() == conn.stable_id())
        {
            *c = None;
        }
    }

    pub fn has_channel(&self) -> bool {
        lock(&self.channel).is_some()
    }

    fn close_channel(&self, why: &'static str) {
        if let Some(c) = lock(&self.channel).take() {
            c.close(0u32.into(), why.as_bytes());
        }
    }

    /// Sends one frame, never waiting: a full send buffer drops it (a slow
    /// flow must not hold up others).
    pub fn send(&self, frame: Vec<u8>) -> Result<(), SendFailed> {
        self.send_as(frame, true)
    }

    /// Sends a frame for a flow; one whose remote has not proved its
    /// address may use only the buffer above [`RESERVED_FOR_VALIDATED`].
    pub fn send_as(&self, frame: Vec<u8>, validated: bool) -> Result<(), SendFailed> {
        let c = lock(&self.channel);
        let conn = c.as_ref().ok_or(SendFailed::NoChannel)?;
        match conn.max_datagram_size() {
            Some(max) if frame.len() <= max => {}
            Some(_) => return Err(SendFailed::TooLarge),
            None => return Err(SendFailed::NoChannel),
        }
        let reserve = if validated { 0 } else { RESERVED_FOR_VALIDATED };
        if conn.datagram_send_buffer_space() < frame.len() + reserve {
            return Err(if validated {
                SendFailed::ChannelFull
            } else {
                SendFailed::ChannelBusy
            });
        }
        conn.send_datagram(Bytes::from(frame)).map_err(|e| match e {
            quinn::SendDatagramError::TooLarge => SendFailed::TooLarge,
            _ => SendFailed::NoChannel,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
