//! The fallback data path: a public connection carried on a libp2p stream
//! of the agent's session (`/relaygate/tunnel/1`, framed), for agents with no
//! lane, and for connections another gateway of the fleet forwarded here.

use std::{io, time::Duration};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::{
    idle::{Activity, Watched},
    protocol::{StreamHeader, TUNNEL_PROTOCOL},
    proxy::SpoofCheck,
    splice::{frames_to_raw, raw_to_frames, write_frames},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::{
    listener::{agent_status, check_spoof, DataPlane, Origin},
    registry::TunnelStats,
    stall::StallWriter,
};

/// How long the gateway waits for the agent to open a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whose session carries the connection, and what it counts towards.
pub struct Agent<'a> {
    pub peer: PeerId,
    pub connection: ConnectionId,
    pub stats: &'a TunnelStats,
}

/// Carries one public connection (`public_r`/`public_w`) on a new stream of
/// the agent's session until both directions end, the agent refuses it, or
/// it idles past `limits.idle_timeout`.
pub async fn carry<R, W>(
    dp: &DataPlane,
    to: Agent<'_>,
    origin: Origin,
    public_r: R,
    public_w: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let open = dp
        .control
        .open_stream_on(to.peer, to.connection, TUNNEL_PROTOCOL);
    let stream = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            dp.metrics.dial_failed("open_stream");
            return Err(io::Error::other(e.to_string()));
        }
        Err(_) => {
            dp.metrics.dial_failed("open_timeout");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "agent did not accept a stream",
            ));
        }
    };
    let mut stream = stream.compat();
    let header = StreamHeader {
        tunnel: to.stats.name.clone(),
        source: origin.source,
        destination: origin.destination,
    };
    stream.write_all(&header.encode()).await?;
    tracing::debug!(
        source = %origin.source, tunnel = %to.stats.name, agent = %to.peer,
        "public connection"
    );

    let (mut sr, mut sw) = tokio::io::split(stream);
    let activity = Activity::new();
    let mut tr = Watched::new(public_r, activity.clone());
    // A client that stops reading holds the agent's connection window: only
    // a share of such streams may at once.
    let tw = StallWriter::new(public_w, dp.stalls.clone(), to.peer, Duration::ZERO)
        .counting(dp.stalled_readers.clone());
    let mut tw = Watched::new(tw, activity.clone());
    let (bytes_in, bytes_out, metrics) = (&to.stats.bytes_in, &to.stats.bytes_out, &dp.metrics);
    let mut check = SpoofCheck::default();
    let mut done = check_spoof(&mut check, &origin.prefix, metrics)?;
    let up = async move {
        if !origin.prefix.is_empty() {
            write_frames(&mut sw, &origin.prefix).await?;
            bytes_in.inc_by(origin.prefix.len() as u64);
        }
        // Whoever the client is, its own bytes must not start a PROXY header.
        let mut first = [0u8; 16];
        while !done {
            let n = tr.read(&mut first).await?;
            if n == 0 {
                return raw_to_frames(&b""[..], sw, bytes_in).await;
            }
            done = check_spoof(&mut check, &first[..n], metrics)?;
            write_frames(&mut sw, &first[..n]).await?;
            bytes_in.inc_by(n as u64);
        }
        raw_to_frames(tr, sw, bytes_in).await
    };
    let down = async move {
        agent_status(&mut sr, metrics).await?;
        frames_to_raw(sr, &mut tw, bytes_out).await
    };
    let idle = dp.idle_timeout;
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        _ = activity.idle(idle) => {
            tracing::debug!(tunnel = %to.stats.name, ?idle, "public connection idle; closed");
            Err(io::Error::new(io::ErrorKind::TimedOut, "idle"))
        }
    }
}
