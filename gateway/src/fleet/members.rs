//! Who is in the fleet. Each gateway keeps a record under `members/<peer id>`
//! (its addresses, lane port, readiness and the agents it holds), attached
//! to an etcd lease of `store.etcd.member_ttl` that it keeps alive and
//! rewrites every third of it; a gateway that dies leaves the view when its
//! lease ends. Every gateway watches the records. With the embedded store
//! the fleet is this gateway alone. `/v1/fleet` shows the view.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use libp2p::{Multiaddr, PeerId};
use relaygate_common::protocol::FleetGateway;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::links::LaneAddr;

/// One gateway as the fleet sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub peer_id: String,
    /// Where agents dial it (`/p2p/` included).
    pub addresses: Vec<String>,
    pub lane_port: Option<u16>,
    /// It takes lanes from the other gateways for forwarded connections
    /// (absent in records of gateways from before: they get libp2p streams).
    #[serde(default)]
    pub takes_links: bool,
    pub ready: bool,
    /// Peer ids of the agents it holds a session with.
    pub agents: Vec<String>,
    /// The leased ports it serves for them: where another gateway forwards
    /// a public connection on one of these ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// When the record was written, Unix seconds.
    pub updated: u64,
}

/// A gateway serving a port: its libp2p addresses, and its lane's.
pub struct Holder {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub lane: Option<LaneAddr>,
}

/// What `/v1/fleet` answers.
#[derive(Serialize)]
pub struct FleetView {
    /// This gateway's peer id.
    pub this: String,
    /// `embedded` (a fleet of one) or `etcd`.
    pub store: &'static str,
    pub gateways: Vec<Member>,
}

type Describe = dyn Fn() -> Member + Send + Sync;

pub struct Fleet {
    describe: Arc<Describe>,
    /// This gateway's peer id, as its records carry it.
    me: String,
    shared: bool,
    /// The other gateways' records (this one's own, read back from etcd, is left out).
    others: RwLock<BTreeMap<String, Member>>,
    /// Bumped when another gateway joins, leaves, moves or becomes ready
    /// (what agents are told of), not on a mere refresh.
    members_changed: watch::Sender<u64>,
    /// Bumped when the ports the other gateways serve change (what the
    /// forwarder follows), or one joins or leaves.
    ports_changed: watch::Sender<u64>,
}

/// What of a record agents are told: where the gateway is, and whether it is up.
fn whereabouts(m: &Member) -> (&[String], bool) {
    (&m.addresses, m.ready)
}

/// Wait before registering again after etcd went away.
const RETRY: Duration = Duration::from_secs(1);

pub use relaygate_common::clock::unix_now;

impl Fleet {
    /// `describe` gives this gateway's (`me`) record as it is now.
    pub fn new(me: PeerId, describe: Arc<Describe>, shared: bool) -> Arc<Self> {
        Arc::new(Self {
            describe,
            me: me.to_string(),
            shared,
            others: RwLock::default(),
            members_changed: watch::channel(0).0,
            ports_changed: watch::channel(0).0,
        })
    }

    /// Follows the other gateways joining, leaving, moving or coming up.
    pub fn member_changes(&self) -> watch::Receiver<u64> {
        self.members_changed.subscribe()
    }

    /// Follows the ports the other gateways serve.
    pub fn port_changes(&self) -> watch::Receiver<u64> {
        self.ports_changed.subscribe()
    }

    fn others(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Member>> {
        self.others.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The fleet's gateways that are ready, this one included, as agents
    /// are told of them; empty for a gateway alone.
    pub fn for_agents(&self) -> Vec<FleetGateway> {
        if !self.shared {
            return Vec::new();
        }
        self.view()
            .gateways
            .into_iter()
            .filter(|m| m.ready && !m.addresses.is_empty())
            .map(|m| FleetGateway {
                peer_id: m.peer_id,
                addresses: m.addresses,
            })
            .collect()
    }

    /// Whether `peer` is another gateway of the fleet.
    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.others().contains_key(&peer.to_string())
    }

    /// The other gateways serving `port`, with where to dial them.
    pub fn holders(&self, port: u16) -> Vec<Holder> {
        self.others()
            .values()
            .filter(|m| m.ready && m.ports.contains(&port))
            .filter_map(|m| {
                let peer = m.peer_id.parse().ok()?;
                let addrs: Vec<Multiaddr> =
                    m.addresses.iter().filter_map(|a| a.parse().ok()).collect();
                let lane = m
                    .takes_links
                    .then(|| LaneAddr::of(&addrs, m.lane_port))
                    .flatten();
                Some(Holder { peer, addrs, lane })
            })
            .collect()
    }

    /// Every port the other gateways serve.
    pub fn served_elsewhere(&self) -> std::collections::BTreeSet<u16> {
        self.others()
            .values()
            .filter(|m| m.ready)
            .flat_map(|m| m.ports.iter().copied())
            .collect()
    }

    /// Tells the followers of what changed.
    fn bump(&self, members: bool, ports: bool) {
        if members {
            self.members_changed.send_modify(|n| *n += 1);
        }
        if ports {
            self.ports_changed.send_modify(|n| *n += 1);
        }
    }

    pub fn view(&self) -> FleetView {
        let mut gateways: Vec<Member> = self.others().values().cloned().collect();
        gateways.push((self.describe)());
        gateways.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        FleetView {
            this: self.me.clone(),
            store: if self.shared { "etcd" } else { "embedded" },
            gateways,
        }
    }

    fn set(&self, mut all: BTreeMap<String, Member>) {
        all.remove(&self.me);
        let mut others = self.others.write().unwrap_or_else(|e| e.into_inner());
        let same_keys = others.len() == all.len() && others.keys().eq(all.keys());
        let members = !same_keys
            || others
                .values()
                .zip(all.values())
                .any(|(a, b)| whereabouts(a) != whereabouts(b));
        let ports = !same_keys
            || others
                .values()
                .zip(all.values())
                .any(|(a, b)| a.ports != b.ports);
        *others = all;
        drop(others);
        self.bump(members, ports);
    }

    fn put(&self, m: Member) {
        if m.peer_id == self.me {
            return;
        }
        let mut others = self.others.write().unwrap_or_else(|e| e.into_inner());
        let old = others.get(&m.peer_id);
        let members = old.is_none_or(|o| whereabouts(o) != whereabouts(&m));
        let ports = old.is_none_or(|o| o.ports != m.ports);
        others.insert(m.peer_id.clone(), m);
        drop(others);
        self.bump(members, ports);
    }

    fn remove(&self, peer_id: &str) {
        let gone = self
            .others
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer_id)
            .is_some();
        self.bump(gone, gone);
    }

    /// Registers this gateway and follows the others, until the process
    /// ends. The record is rewritten at once when `local` (this gateway's
    /// sessions) changes, so the others forward to it without waiting.
    pub async fn run(
        self: Arc<Self>,
        mut client: Client,
        prefix: String,
        ttl: Duration,
        mut local: watch::Receiver<u64>,
    ) {
        let prefix = format!("{prefix}members/");
        loop {
            if let Err(e) = self.follow(&mut client, &prefix, ttl, &mut local).await {
                tracing::warn!(error = %e, "fleet membership: etcd unreachable; retrying");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn follow(
        &self,
        client: &mut Client,
        prefix: &str,
        ttl: Duration,
        local: &mut watch::Receiver<u64>,
    ) -> Result<(), etcd_client::Error> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(secs, None).await?.id();
        let key = format!("{prefix}{}", self.me);
        let record = || serde_json::to_vec(&(self.describe)()).unwrap_or_default();
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        client.put(key.clone(), record(), with_lease()).await?;
        let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
        let listed = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = listed.header().map_or(0, |h| h.revision());
        self.set(
            listed
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Member>(kv.value()).ok())
                .map(|m| (m.peer_id.clone(), m))
                .collect(),
        );
        let (_watcher, mut events) = client
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let mut tick = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    keeper.keep_alive().await?;
                    client.put(key.clone(), record(), with_lease()).await?;
                }
                Ok(()) = local.changed() => {
                    client.put(key.clone(), record(), with_lease()).await?;
                }
                ack = acks.message() => match ack? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Ok(()), // the lease is gone: register again
                },
                message = events.message() => {
                    let Some(resp) = message? else { return Ok(()) };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        match ev.event_type() {
                            EventType::Put => {
                                if let Ok(m) = serde_json::from_slice::<Member>(kv.value()) {
                                    self.put(m);
                                }
                            }
                            EventType::Delete => {
                                let k = String::from_utf8_lossy(kv.key());
                                let id = k.trim_start_matches(prefix);
                                tracing::info!(gateway = %id, "a gateway left the fleet");
                                self.remove(id);
                            }
                        }
                    }
                }
            }
        }
    }
}
