//! Tunnel targets that measure: a sink that reads and counts what arrives,
//! and a source that writes as fast as its reader takes. With them a test
//! measures the rate one direction of a tunnel moves at.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// Reads every connection to its end and counts the bytes.
pub struct Sink {
    pub addr: SocketAddr,
    pub bytes: Arc<AtomicU64>,
}

impl Sink {
    pub fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        let addr = l.local_addr().expect("sink addr");
        let bytes = Arc::new(AtomicU64::new(0));
        let b = bytes.clone();
        thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                let b = b.clone();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Sink { addr, bytes }
    }

    pub fn tunnel(&self, name: &str) -> String {
        format!("{name}={}", self.addr)
    }
}

/// Writes to every connection until it closes.
pub struct Source {
    pub addr: SocketAddr,
}

impl Source {
    pub fn start() -> Source {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind source");
        let addr = l.local_addr().expect("source addr");
        thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                thread::spawn(move || {
                    let buf = vec![0x5au8; 64 * 1024];
                    while c.write_all(&buf).is_ok() {}
                });
            }
        });
        Source { addr }
    }

    pub fn tunnel(&self, name: &str) -> String {
        format!("{name}={}", self.addr)
    }
}

/// Writes into `port` as fast as it takes for `run`; the bytes per second
/// the sink counted after `warmup` (the burst), until the end.
pub fn upload_rate(port: u16, sink: &Sink, warmup: Duration, run: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect for upload");
    let s2 = stop.clone();
    let writer = thread::spawn(move || {
        let buf = vec![0xa5u8; 64 * 1024];
        while !s2.load(Ordering::Relaxed) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    // Counting starts once bytes arrive: the tunnel's set-up is not the rate.
    let start = Instant::now();
    let first = sink.bytes.load(Ordering::Relaxed);
    while sink.bytes.load(Ordering::Relaxed) == first && start.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(warmup);
    let (t0, b0) = (Instant::now(), sink.bytes.load(Ordering::Relaxed));
    thread::sleep(run);
    let (t1, b1) = (Instant::now(), sink.bytes.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
}

/// Reads from `port` (a source behind it) for `run` after `warmup`; the
/// bytes per second read.
pub fn download_rate(port: u16, warmup: Duration, run: Duration) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect for download");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_for = |d: Duration| -> u64 {
        let end = Instant::now() + d;
        let mut n = 0u64;
        while Instant::now() < end {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        n
    };
    read_for(warmup);
    let t0 = Instant::now();
    let n = read_for(run);
    n as f64 / t0.elapsed().as_secs_f64()
}
