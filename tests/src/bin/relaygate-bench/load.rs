//! The load generator: bulk streams into a sink, ping-pong against an echo,
//! connection churn, and the targets themselves (sink and echo).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Gbit/s pushed through `streams` connections for `d`, counted as bytes the sink acknowledged.
pub async fn throughput(sink: SocketAddr, streams: usize, d: Duration) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..streams {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(sink).await?;
            s.set_nodelay(true)?;
            let buf = vec![0x5au8; 128 * 1024];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                s.write_all(&buf).await?;
                sent += buf.len() as u64;
            }
            s.shutdown().await?;
            // the sink answers with the byte count it read, after our EOF
            let got = s.read_u64().await?;
            anyhow::ensure!(got == sent, "sink read {got} of {sent} bytes");
            Ok::<u64, anyhow::Error>(got)
        }));
    }
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

pub async fn rtt(echo: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = TcpStream::connect(echo).await?;
    s.set_nodelay(true)?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..100 {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((samples[n / 2], samples[(n * 99) / 100]))
}

pub async fn conn_rate(echo: SocketAddr, workers: usize, d: Duration) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + d;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut s = TcpStream::connect(echo).await?;
                s.set_nodelay(true)?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                drop(s);
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Gbit/s of one stream to each of `sinks` at once, all together.
pub async fn throughput_each(sinks: &[SocketAddr], d: Duration) -> anyhow::Result<f64> {
    // Each task reports its own stream's rate; they run over the same span.
    let tasks: Vec<_> = sinks
        .iter()
        .map(|&s| tokio::spawn(throughput(s, 1, d)))
        .collect();
    let mut total = 0.0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

pub async fn start_sink(at: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(at).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 128 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_u64(n).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

pub async fn start_echo(at: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(at).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}
