//! A public connection that is not a plain socket here carried to the agent
//! by generic reads and writes: on a libp2p stream of the agent's session
//! (`/relaygate/tunnel/1`, framed), for agents with no lane, or on a lane
//! stream (raw), for connections another gateway of the fleet forwarded
//! here. A plain socket on a lane takes `lane::splice` instead.

use std::{io, time::Duration};

use libp2p::{swarm::ConnectionId, PeerId};
use relaygate_common::{
    idle::{Activity, Watched},
    lane::LaneStream,
    meter::Tally,
    protocol::{StreamHeader, TUNNEL_PROTOCOL},
    proxy::SpoofCheck,
    splice::{frames_to_raw, raw_counted, raw_to_frames, write_frames},
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
    splice(
        dp,
        to,
        origin,
        stream.compat(),
        Framing::Frames,
        public_r,
        public_w,
    )
    .await
}

/// Carries one public connection on `lane`, a stream of one of the agent's
/// lanes, until both directions end, the agent refuses it, or it idles.
pub async fn carry_on_lane<R, W>(
    dp: &DataPlane,
    to: Agent<'_>,
    origin: Origin,
    lane: LaneStream,
    public_r: R,
    public_w: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    splice(dp, to, origin, lane, Framing::Raw, public_r, public_w).await
}

/// How the agent's stream carries the bytes: a session stream in frames
/// (its muxer reports a reset as a plain end), a lane stream as they are.
#[derive(Clone, Copy)]
enum Framing {
    Frames,
    Raw,
}

impl Framing {
    async fn put<W: AsyncWrite + Unpin>(self, w: &mut W, bytes: &[u8]) -> io::Result<()> {
        match self {
            Framing::Frames => write_frames(w, bytes).await,
            Framing::Raw => w.write_all(bytes).await,
        }
    }

    async fn up<R, W>(self, r: R, w: W, counter: Tally<'_>) -> io::Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self {
            Framing::Frames => raw_to_frames(r, w, counter).await,
            Framing::Raw => raw_counted(r, w, counter).await,
        }
    }

    async fn down<R, W>(self, r: R, w: W, counter: Tally<'_>) -> io::Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self {
            Framing::Frames => frames_to_raw(r, w, counter).await,
            Framing::Raw => raw_counted(r, w, counter).await,
        }
    }
}

async fn splice<S, R, W>(
    dp: &DataPlane,
    to: Agent<'_>,
    origin: Origin,
    mut stream: S,
    framing: Framing,
    public_r: R,
    public_w: W,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = StreamHeader {
        tunnel: to.stats.name.clone(),
        source: origin.source,
        destination: origin.destination,
        peer: origin.peer,
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
    let tracked = dp.track(to.peer, to.stats, &origin);
    let (bytes_in, bytes_out, metrics) = (
        tracked.inbound(&to.stats.bytes_in),
        tracked.outbound(&to.stats.bytes_out),
        &dp.metrics,
    );
    let mut check = SpoofCheck::default();
    let mut done = check_spoof(&mut check, &origin.prefix, metrics)?;
    let up = async move {
        if !origin.prefix.is_empty() {
            bytes_in.pass(origin.prefix.len()).await;
            framing.put(&mut sw, &origin.prefix).await?;
        }
        // Whoever the client is, its own bytes must not start a PROXY header.
        let mut first = [0u8; 16];
        while !done {
            let n = tr.read(&mut first).await?;
            if n == 0 {
                return framing.up(&b""[..], sw, bytes_in).await;
            }
            done = check_spoof(&mut check, &first[..n], metrics)?;
            bytes_in.pass(n).await;
            framing.put(&mut sw, &first[..n]).await?;
        }
        framing.up(tr, sw, bytes_in).await
    };
    let down = async move {
        agent_status(&mut sr, metrics).await?;
        framing.down(sr, &mut tw, bytes_out).await
    };
    let idle = dp.idle_timeout();
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        _ = activity.idle(idle) => {
            tracing::debug!(tunnel = %to.stats.name, ?idle, "public connection idle; closed");
            Err(io::Error::new(io::ErrorKind::TimedOut, "idle"))
        }
    }
}
