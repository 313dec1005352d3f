//! The lane's TCP connection, tuned for many streams: no Nagle delay, little
//! unsent data in the kernel, and its round-trip time for window tuning.

use std::{os::fd::AsRawFd, time::Duration};

use tokio::net::TcpStream;

/// Unsent bytes the kernel may hold for a lane (`TCP_NOTSENT_LOWAT`). What
/// is in flight is not limited by it, so a long fat path still fills; what
/// waits to be sent is, so a frame of a new stream does not queue behind
/// megabytes of a busy one in the kernel as well as in the lane.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Tunes a lane's connection before its handshake; returns the probe of its
/// round-trip time for [`crate::lane::LaneLink`].
pub fn prepare(tcp: &TcpStream) -> std::io::Result<RttProbe> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    // Best effort: without it the lane works, with deeper queues.
    let _ = sock.set_tcp_notsent_lowat(NOTSENT_LOWAT);
    Ok(tcp_rtt_probe(tcp.as_raw_fd()))
}

/// Reads a connection's round-trip time; called by the lane's reader while
/// it owns the connection.
pub type RttProbe = Box<dyn FnMut() -> Option<Duration> + Send>;

/// The kernel's smoothed round-trip time of a TCP socket (`TCP_INFO`).
/// `fd` must stay open while the probe is used: the lane's reader calls it
/// only while it holds its half of the connection.
#[cfg(target_os = "linux")]
pub fn tcp_rtt_probe(fd: std::os::fd::RawFd) -> RttProbe {
    Box::new(move || {
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len`
        // bytes into it and fails cleanly on a closed or non-TCP fd.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (r == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
    })
}

#[cfg(not(target_os = "linux"))]
pub fn tcp_rtt_probe(_fd: std::os::fd::RawFd) -> RttProbe {
    Box::new(|| None)
}
