//! UDP test kit: an echo server that records who it heard from, many
//! concurrent flows from distinct source addresses checked byte for byte,
//! ping-pong latency and echoed throughput for the benchmark, and (in
//! `flood`) a spoofed-source flood through a raw socket.

mod flood;
mod flows;
mod measure;

pub use flood::{fill_quic_initial, ipv4_checksum, spoofed_flood, write_headers, Ipv4Net};
pub use flows::{flows, FlowsReport};
pub use measure::{rtt, throughput, RttReport, ThroughputReport};

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::{net::UdpSocket, sync::watch};

/// A UDP socket with large buffers (best effort), for tokio.
pub(crate) fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// The wildcard address of `target`'s family, any port.
pub fn any_addr(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// `ip` with port 0, for [`flows`]' sources.
pub fn any_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted samples; 0 when empty.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Every IPv4 address from `a` to `b` in "a-b" (inclusive), or the one in "a".
pub fn ipv4_range(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let parse = |x: &str| {
        x.trim()
            .parse::<Ipv4Addr>()
            .map_err(|e| format!("{x:?}: {e}"))
    };
    let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
    if b < a || b - a >= 1 << 16 {
        return Err(format!(
            "{s:?}: want a range of 1 to 65536 ascending addresses"
        ));
    }
    Ok((a..=b).map(Ipv4Addr::from).collect())
}

#[derive(Default)]
struct Peers {
    order: Vec<SocketAddr>,
    seen: HashSet<SocketAddr>,
}

struct EchoState {
    peers: Mutex<Peers>,
    datagrams: AtomicU64,
}

impl EchoState {
    fn peers(&self) -> MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running [`echo_server`]; dropping it stops the server.
pub struct EchoHandle {
    state: Arc<EchoState>,
    count: watch::Receiver<usize>,
    reported: usize,
    task: tokio::task::JoinHandle<()>,
}

impl EchoHandle {
    /// Every distinct peer address heard from, in the order first heard.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers().order.clone()
    }

    /// Datagrams received (each was echoed, or at least tried).
    pub fn datagrams(&self) -> u64 {
        self.state.datagrams.load(Ordering::Relaxed)
    }

    /// Waits for peers not yet returned by this method and returns them.
    pub async fn new_peers(&mut self) -> Vec<SocketAddr> {
        loop {
            self.count.borrow_and_update();
            let fresh = self.state.peers().order[self.reported..].to_vec();
            if !fresh.is_empty() {
                self.reported += fresh.len();
                return fresh;
            }
            if self.count.changed().await.is_err() {
                // The server task ended (it only does when aborted).
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for EchoHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `listen` and echoes every datagram back to its sender, on a spawned
/// task, recording each distinct sender. Returns the bound address.
pub async fn echo_server(listen: SocketAddr) -> io::Result<(SocketAddr, EchoHandle)> {
    let sock = bind_udp(listen)?;
    let addr = sock.local_addr()?;
    let state = Arc::new(EchoState {
        peers: Mutex::new(Peers::default()),
        datagrams: AtomicU64::new(0),
    });
    let (tx, count) = watch::channel(0);
    let st = state.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue; // e.g. a stray ICMP error; the socket is still good
            };
            st.datagrams.fetch_add(1, Ordering::Relaxed);
            let _ = sock.send_to(&buf[..n], from).await;
            let mut p = st.peers();
            if p.seen.insert(from) {
                p.order.push(from);
                tx.send_replace(p.order.len());
            }
        }
    });
    let handle = EchoHandle {
        state,
        count,
        reported: 0,
        task,
    };
    Ok((addr, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_percentiles() {
        let r = ipv4_range("127.1.0.1-127.1.3.232").unwrap();
        assert_eq!(r.len(), 1000);
        assert_eq!(r[999], Ipv4Addr::new(127, 1, 3, 232));
        assert_eq!(
            ipv4_range("10.0.0.1").unwrap(),
            vec![Ipv4Addr::new(10, 0, 0, 1)]
        );
        assert!(ipv4_range("10.0.0.2-10.0.0.1").is_err());
        assert!(ipv4_range("10.0.0.0-10.2.0.0").is_err());
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!((percentile(&s, 50.0), percentile(&s, 99.0)), (50, 99));
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
