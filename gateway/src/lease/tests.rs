//! Unit tests of the lease table behind a real store: allocation rules,
//! moves racing with the store, and the release of renamed tunnels.

use super::*;
use crate::store::{Claim, EmbeddedStore};
use relaygate_common::protocol::{LeaseGrant, LeaseOutcome, LeaseRefusal, TunnelRequest};

fn leases(dir: &std::path::Path) -> Leases {
    let store = Arc::new(EmbeddedStore::open(&dir.join("l.redb")).unwrap());
    let policy = PortPolicy {
        range: "41000-41002".parse().unwrap(),
        allowed: vec!["41500".parse().unwrap()],
        bind: [127, 0, 0, 1].into(),
        max_per_agent: 2,
        expire_after: std::time::Duration::ZERO,
    };
    Leases::load(store, policy).unwrap()
}

fn req(name: &str, port: Option<u16>) -> TunnelRequest {
    TunnelRequest {
        name: name.parse().unwrap(),
        port: port.and_then(LeasePort::new),
        proto: Default::default(),
    }
}

fn port(g: &LeaseGrant) -> Option<u16> {
    match g.outcome {
        LeaseOutcome::Granted { port } => Some(port.get()),
        _ => None,
    }
}

fn code(g: &LeaseGrant) -> Option<LeaseRefusal> {
    match g.outcome {
        LeaseOutcome::Refused { code, .. } => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn allocation_rules() {
    let dir = std::env::temp_dir().join(format!("rg-lease-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (PeerId::random(), PeerId::random());
    {
        let l = leases(&dir);
        let g = l
            .acquire(a, &[req("x", None), req("y", Some(41500)), req("x", None)])
            .await;
        assert!(port(&g[0]).is_some());
        assert_eq!(port(&g[1]), Some(41500));
        assert_eq!(code(&g[2]), Some(LeaseRefusal::DuplicateName));
        // another agent cannot take a held port, nor one outside the set
        let g = l
            .acquire(b, &[req("z", Some(41500)), req("w", Some(80))])
            .await;
        assert_eq!(code(&g[0]), Some(LeaseRefusal::PortHeld));
        assert_eq!(code(&g[1]), Some(LeaseRefusal::PortNotAllowed));
        // per-agent cap
        let g = l.acquire(a, &[req("third", None)]).await;
        assert_eq!(code(&g[0]), Some(LeaseRefusal::TooManyTunnels));
        l.touches_written().await; // then the store is closed
    }
    // reload: same ports for the same keys
    let l = leases(&dir);
    assert_eq!(l.count(), 2);
    let g = l.acquire(a, &[req("y", None)]).await;
    assert_eq!(port(&g[0]), Some(41500));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The real store, whose next put waits for a word from the test and
/// then fails or succeeds as told.
struct Gated {
    inner: EmbeddedStore,
    gate: Mutex<Option<std::sync::mpsc::Receiver<bool>>>,
}

impl LeaseStore for Gated {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        self.inner.load()
    }
    fn claim(&self, lease: &Lease, previous: Option<LeasePort>) -> Result<Claim, StoreError> {
        let gate = self.gate.lock().unwrap().take();
        match gate.map(|g| g.recv().unwrap_or(false)) {
            Some(false) => Err(StoreError::Io("disk full".into())),
            _ => self.inner.claim(lease, previous),
        }
    }
    fn remove(&self, key: &LeaseKey) -> Result<(), StoreError> {
        self.inner.remove(key)
    }
    fn touch(&self, keys: &[LeaseKey], at: u64) -> Result<(), StoreError> {
        self.inner.touch(keys, at)
    }
    fn snapshot(&self) -> Result<Vec<(Lease, Option<u64>)>, StoreError> {
        self.inner.snapshot()
    }
    fn expire(&self, key: &LeaseKey, seen: Option<u64>) -> Result<bool, StoreError> {
        self.inner.expire(key, seen)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_being_moved_away_from_is_held_until_the_store_answers() {
    // On ecf9cf7 the old port was free while the new lease was being
    // stored, and a failed store put it back under its old owner even
    // if another agent had been given it meanwhile: two leases, one port.
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let store = Arc::new(Gated {
        inner: EmbeddedStore::open(&dir.path().join("l.redb")).unwrap(),
        gate: Mutex::new(None),
    });
    let policy = PortPolicy {
        range: "41100-41102".parse().unwrap(),
        allowed: vec!["41600".parse().unwrap()],
        bind: [127, 0, 0, 1].into(),
        max_per_agent: 2,
        expire_after: std::time::Duration::ZERO,
    };
    let l = Arc::new(Leases::load(store.clone(), policy).unwrap());
    let (a, b) = (PeerId::random(), PeerId::random());
    let first = port(&l.acquire(a, &[req("x", None)]).await[0]).unwrap();
    // A moves x to 41600; its store write waits.
    *store.gate.lock().unwrap() = Some(rx);
    let moving = tokio::spawn({
        let l = l.clone();
        async move { l.acquire(a, &[req("x", Some(41600))]).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Meanwhile B asks for the port A is leaving.
    let g = l.acquire(b, &[req("y", Some(first))]).await;
    assert_eq!(
        code(&g[0]),
        Some(LeaseRefusal::PortHeld),
        "held during the move"
    );
    // The store refuses A's move: A keeps its old port, B never had it.
    tx.send(false).unwrap();
    let g = moving.await.unwrap();
    assert_eq!(code(&g[0]), Some(LeaseRefusal::StoreFailed));
    let mut ports: Vec<u16> = l.all().iter().map(|x| x.port.get()).collect();
    assert_eq!(ports, vec![first], "A holds its old port, alone");
    // A successful move frees the old port for others.
    let g = l.acquire(a, &[req("x", Some(41600))]).await;
    assert_eq!(port(&g[0]), Some(41600));
    let g = l.acquire(b, &[req("y", Some(first))]).await;
    assert_eq!(port(&g[0]), Some(first));
    ports = l.all().iter().map(|x| x.port.get()).collect();
    ports.sort();
    assert_eq!(ports, vec![first, 41600]);
}

fn key(agent: PeerId, name: &str) -> LeaseKey {
    LeaseKey {
        agent,
        tunnel: name.parse().unwrap(),
    }
}

#[tokio::test]
async fn a_hello_without_a_tunnel_releases_its_lease_after_granting_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let l = leases(dir.path());
    let a = PeerId::random();
    let g = l.acquire(a, &[req("a", None), req("b", None)]).await;
    let (pa, pb) = (port(&g[0]).unwrap(), port(&g[1]).unwrap());
    let lp = |p: u16| LeasePort::new(p);
    // A retry naming a subset releases nothing.
    let g = l.acquire(a, &[req("b", None)]).await;
    assert_eq!(port(&g[0]), Some(pb));
    assert_eq!(l.count(), 2);
    // The cap is 2: "c" fits only because "a" no longer counts.
    let g = l
        .acquire_all(a, &[req("b", None), req("c", None)], &[])
        .await;
    assert_eq!(port(&g[0]), Some(pb), "kept");
    let pc = port(&g[1]).expect("c leased despite the cap");
    assert_ne!(pc, pa, "a's port was still held while c was granted");
    assert_eq!(l.port_of(&key(a, "a")), None, "a released");
    assert_eq!(metric(&l, "renamed"), 1);
    // A paused tunnel keeps its lease.
    let g = l
        .acquire_all(a, &[req("c", None)], &["b".parse().unwrap()])
        .await;
    assert_eq!(port(&g[0]), Some(pc));
    assert_eq!(l.port_of(&key(a, "b")), lp(pb));
    // Released from the store too.
    l.touches_written().await;
    drop(l);
    let l = leases(dir.path());
    assert_eq!(l.port_of(&key(a, "a")), None);
    assert_eq!(l.count(), 2);
}

fn metric(l: &Leases, reason: &str) -> u64 {
    l.freed.get_or_create(&ReasonLabels::new(reason)).get()
}

#[tokio::test]
async fn a_revoked_agent_asking_again_gets_another_port_and_the_number_can_be_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let l = leases(dir.path());
    let (a, b) = (PeerId::random(), PeerId::random());
    let first = port(&l.acquire(a, &[req("x", None)]).await[0]).unwrap();
    assert_eq!(
        l.free(&key(a, "x"), FreeReason::Revoked)
            .await
            .unwrap()
            .map(|p| p.get()),
        Some(first)
    );
    assert_eq!(
        l.free(&key(a, "x"), FreeReason::Revoked).await.unwrap(),
        None
    );
    assert_eq!(metric(&l, "revoked"), 1, "counted when something was freed");
    let again = port(&l.acquire(a, &[req("x", None)]).await[0]).unwrap();
    assert_ne!(again, first, "the freed port goes to the back");
    let g = l.acquire(b, &[req("y", Some(first))]).await;
    assert_eq!(port(&g[0]), Some(first), "asked by number");
}
