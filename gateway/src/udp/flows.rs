//! One leased UDP port's flows: a flow per remote address and port, its id
//! on the datagram channel, whether its remote has proved its address, and
//! the amplification budget until it has. Pure state, owned by the port's
//! task, so the data path takes no lock.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use relaygate_common::dgram::quic_ids;

/// SCIDs the node sent one remote that are remembered (QUIC peers rarely
/// use more than a couple during a handshake).
const MAX_IDS: usize = 4;
/// Node datagrams held for one unvalidated remote, waiting for it to send
/// enough to cover them.
pub const HOLD_PER_FLOW: usize = 8 * 1024;

/// A flow's low 24 bits count per port; the high 8 name the port's slot in
/// the agent's session, so the channel routes without a shared map.
const ID_BITS: u32 = 24;

pub struct Flow<P> {
    pub id: u32,
    pub remote: SocketAddr,
    /// The agent answered OPENED; until then datagrams go as OPEN.
    pub opened: bool,
    pub validated: bool,
    /// Payload bytes from and to the remote while unvalidated.
    pub received: u64,
    pub sent: u64,
    held: VecDeque<Bytes>,
    held_bytes: usize,
    ids: Vec<Box<[u8]>>,
    pub last: Instant,
    pub since: SystemTime,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// What the flow holds of shared bounds (its source's share, its place
    /// in the gateway's total); released when it drops.
    _places: P,
}

impl<P> Flow<P> {
    /// Whether a node datagram of `n` bytes may go to the remote now: at
    /// most as many bytes as it sent, until it proves its address.
    pub fn may_send(&self, n: usize) -> bool {
        self.validated || self.sent + n as u64 <= self.received
    }

    /// Remembers the node's SCID in a long-header packet to this remote.
    pub fn note_node_packet(&mut self, pkt: &[u8]) {
        if self.validated || self.ids.len() >= MAX_IDS {
            return;
        }
        if let Some(id) = quic_ids::long_scid(pkt) {
            if !self.ids.iter().any(|i| &i[..] == id) {
                self.ids.push(id.into());
            }
        }
    }

    /// A datagram from the remote: counts it, and validates the flow when
    /// it is addressed to an id the node gave this remote. True when it
    /// validated the flow just now.
    pub fn note_remote_packet(&mut self, pkt: &[u8]) -> bool {
        self.last = Instant::now();
        self.bytes_in += pkt.len() as u64;
        if self.validated {
            return false;
        }
        self.received += pkt.len() as u64;
        if quic_ids::addressed_to(pkt, self.ids.iter().map(|i| &i[..])) {
            self.validated = true;
            self.ids = Vec::new();
            return true;
        }
        false
    }

    /// Holds a node datagram the budget does not cover yet; false when the
    /// flow's hold is full.
    pub fn hold(&mut self, d: Bytes) -> bool {
        if self.held_bytes + d.len() > HOLD_PER_FLOW {
            return false;
        }
        self.held_bytes += d.len();
        self.held.push_back(d);
        true
    }

    /// Held datagrams the budget now covers, in order.
    pub fn release(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(d) = self.held.front() {
            if !self.may_send(d.len()) {
                break;
            }
            let d = self.held.pop_front().unwrap_or_default();
            self.held_bytes -= d.len();
            self.sent += d.len() as u64;
            out.push(d);
        }
        out
    }

    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Counts a datagram sent to the remote.
    pub fn sent(&mut self, n: usize) {
        self.last = Instant::now();
        self.bytes_out += n as u64;
        if !self.validated {
            self.sent += n as u64;
        }
    }
}

/// A port's flows, by remote and by id.
pub struct Flows<P> {
    slot: u8,
    next: u32,
    by_remote: HashMap<SocketAddr, u32>,
    by_id: HashMap<u32, Flow<P>>,
    /// Unvalidated flows, oldest first (ids; stale ones skipped).
    unvalidated: VecDeque<u32>,
    n_unvalidated: usize,
}

impl<P> Flows<P> {
    pub fn new(slot: u8) -> Self {
        Self {
            slot,
            next: 1,
            by_remote: HashMap::new(),
            by_id: HashMap::new(),
            unvalidated: VecDeque::new(),
            n_unvalidated: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn unvalidated(&self) -> usize {
        self.n_unvalidated
    }

    pub fn id_of(&self, remote: &SocketAddr) -> Option<u32> {
        self.by_remote.get(remote).copied()
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Flow<P>> {
        self.by_id.get_mut(&id)
    }

    /// Enters a new flow and returns its id.
    pub fn insert(&mut self, remote: SocketAddr, places: P) -> u32 {
        let id = self.fresh_id();
        self.by_remote.insert(remote, id);
        self.by_id.insert(
            id,
            Flow {
                id,
                remote,
                opened: false,
                validated: false,
                received: 0,
                sent: 0,
                held: VecDeque::new(),
                held_bytes: 0,
                ids: Vec::new(),
                last: Instant::now(),
                since: SystemTime::now(),
                bytes_in: 0,
                bytes_out: 0,
                _places: places,
            },
        );
        self.unvalidated.push_back(id);
        self.n_unvalidated += 1;
        id
    }

    /// Counts a flow that just proved its address (the flow itself flipped
    /// `validated`).
    pub fn validated(&mut self) {
        self.n_unvalidated = self.n_unvalidated.saturating_sub(1);
    }

    pub fn remove(&mut self, id: u32) -> Option<Flow<P>> {
        let f = self.by_id.remove(&id)?;
        self.by_remote.remove(&f.remote);
        if !f.validated {
            self.n_unvalidated = self.n_unvalidated.saturating_sub(1);
        }
        if self.by_id.is_empty() {
            self.unvalidated.clear();
        }
        Some(f)
    }

    /// The oldest flow that has not proved its address, taken out to make
    /// room: validated flows are never evicted.
    pub fn evict_oldest_unvalidated(&mut self) -> Option<Flow<P>> {
        while let Some(id) = self.unvalidated.pop_front() {
            if self.by_id.get(&id).is_some_and(|f| !f.validated) {
                return self.remove(id);
            }
        }
        None
    }

    /// Flows idle past their timeout: validated ones after `idle`, others
    /// after `handshake`.
    pub fn expired(&self, now: Instant, idle: Duration, handshake: Duration) -> Vec<u32> {
        self.by_id
            .values()
            .filter(|f| {
                let limit = if f.validated { idle } else { handshake };
                now.duration_since(f.last) >= limit
            })
            .map(|f| f.id)
            .collect()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.by_id.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow<P>> {
        self.by_id.values()
    }

    /// Drops validated ids from the eviction queue now and then, so it
    /// stays as long as the unvalidated flows.
    pub fn compact(&mut self) {
        let by_id = &self.by_id;
        self.unvalidated
            .retain(|id| by_id.get(id).is_some_and(|f| !f.validated));
    }

    fn fresh_id(&mut self) -> u32 {
        let mask = (1u32 << ID_BITS) - 1;
        loop {
            let low = self.next & mask;
            self.next = self.next.wrapping_add(1);
            // 0 is never used; ids in use are skipped after a wrap.
            if low == 0 {
                continue;
            }
            let id = (u32::from(self.slot) << ID_BITS) | low;
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }
}

/// The port slot a flow id names.
pub fn slot_of(id: u32) -> u8 {
    (id >> ID_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 7], i))
    }

    fn long(dcid: &[u8], scid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        p.resize(1200, 0);
        p
    }

    #[test]
    fn ids_carry_the_slot_skip_zero_and_those_in_use() {
        let mut f: Flows<()> = Flows::new(3);
        let a = f.insert(addr(1), ());
        assert_eq!(slot_of(a), 3);
        assert_eq!(a & 0xff_ffff, 1);
        f.next = (1 << ID_BITS) - 1;
        let b = f.insert(addr(2), ());
        assert_eq!(b & 0xff_ffff, 0xff_ffff);
        // Wraps past 0, and past 1 (still in use).
        let c = f.insert(addr(3), ());
        assert_eq!(c & 0xff_ffff, 2);
        assert_eq!(f.id_of(&addr(3)), Some(c));
        assert!(f.remove(a).is_some());
        assert_eq!(f.id_of(&addr(1)), None);
    }

    #[test]
    fn an_unvalidated_remote_gets_no_more_than_it_sent_until_it_answers_the_node() {
        let mut f: Flows<()> = Flows::new(0);
        let id = f.insert(addr(1), ());
        let flow = f.get_mut(id).unwrap();
        let initial = long(b"randomid", b"client01");
        assert!(!flow.note_remote_packet(&initial));
        // The node's first flight: larger than the client's Initial.
        let server1 = Bytes::from(long(b"client01", b"nodescid"));
        flow.note_node_packet(&server1);
        assert!(flow.may_send(server1.len()));
        flow.sent(server1.len());
        let server2 = Bytes::from(vec![0xe0; 900]);
        assert!(!flow.may_send(server2.len()), "1x budget");
        assert!(flow.hold(server2.clone()));
        assert!(flow.release().is_empty());
        // A spoofer's guess validates nothing; the client's ACK does.
        assert!(!flow.note_remote_packet(&long(b"guessguess", b"x")));
        assert_eq!(flow.release().len(), 1, "the guess's bytes still count");
        assert!(!flow.hold(Bytes::from(vec![0; HOLD_PER_FLOW + 1])));
        assert!(flow.note_remote_packet(&long(b"nodescid", b"client01")));
        assert!(flow.validated);
        assert!(flow.may_send(1 << 20));
        f.validated();
        assert_eq!(f.unvalidated(), 0);
    }

    #[test]
    fn eviction_takes_the_oldest_unvalidated_never_a_validated_flow() {
        let mut f: Flows<()> = Flows::new(0);
        let a = f.insert(addr(1), ());
        let b = f.insert(addr(2), ());
        let c = f.insert(addr(3), ());
        let fa = f.get_mut(a).unwrap();
        fa.validated = true;
        f.validated();
        assert_eq!(f.unvalidated(), 2);
        assert_eq!(f.evict_oldest_unvalidated().map(|x| x.id), Some(b));
        assert_eq!(f.evict_oldest_unvalidated().map(|x| x.id), Some(c));
        assert!(f.evict_oldest_unvalidated().is_none());
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn expiry_is_shorter_before_validation() {
        let mut f: Flows<()> = Flows::new(0);
        let a = f.insert(addr(1), ());
        let b = f.insert(addr(2), ());
        f.get_mut(a).unwrap().validated = true;
        let later = Instant::now() + Duration::from_secs(5);
        let mut gone = f.expired(later, Duration::from_secs(60), Duration::from_secs(2));
        gone.sort();
        assert_eq!(gone, vec![b]);
        assert_eq!(
            f.expired(later, Duration::from_secs(1), Duration::from_secs(1))
                .len(),
            2
        );
    }
}
