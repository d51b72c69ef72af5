//! Access-log entries for the front end (`SLUICE_ACCESS_LOG=1`): one per request this worker
//! answered (or refused), batched per thread and sent on the control channel, where the
//! front end writes them under this worker's pool and pid.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sluice_proto::access::{self, Arrival, BATCH_BYTES, HELD_BYTES, MAX_BATCH, Report};
use sluice_proto::control::{self, ToFrontend};

use crate::Request;

/// What the log says of a connection, learnt once when it arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) arrival: Arrival,
}

/// One thread's lines not sent yet.
#[derive(Debug)]
pub(crate) struct Batch {
    control: RawFd,
    lines: String,
    count: usize,
    /// Lines dropped because the front end did not take them in time.
    dropped: u64,
}

impl Batch {
    /// None when logging is off or there is no front end to send to.
    pub(crate) fn new(control: Option<RawFd>, on: bool) -> Option<Batch> {
        Some(Batch {
            control: control.filter(|_| on)?,
            lines: String::with_capacity(BATCH_BYTES + 16 * 1024),
            count: 0,
            dropped: 0,
        })
    }

    pub(crate) fn push(&mut self, report: &Report<'_>) {
        report.encode_into(&mut self.lines);
        self.count += 1;
        if self.count >= MAX_BATCH / 4 || self.lines.len() >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Sends what is batched (every tick, and when a batch is full).
    pub(crate) fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        let msg = ToFrontend::Access(std::mem::take(&mut self.lines)).encode();
        match control::send(self.control, &msg) {
            Ok(()) => {
                self.count = 0;
                self.lines.reserve(BATCH_BYTES + 16 * 1024);
            }
            // The front end is behind: keep the lines for the next try, within bounds.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && msg.len() < HELD_BYTES => {
                self.lines = String::from_utf8(msg)
                    .map(|m| m["access\n".len()..].to_owned())
                    .unwrap_or_default();
            }
            Err(e) => {
                if self.dropped == 0 {
                    log::warn!("access-log lines dropped ({e}); later drops are only counted");
                }
                self.dropped += self.count as u64;
                self.count = 0;
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Logs a request answered with `status` and `bytes` of body, begun at `started`.
pub(crate) fn answered(
    batch: &mut Batch,
    req: &Request<'_>,
    status: u16,
    bytes: u64,
    started: Instant,
    conn: ConnInfo,
) {
    let head = req.head();
    let host = sluice_proto::cache::key_host(head);
    let protocol: &[u8] = if req.minor_version() == 0 {
        b"HTTP/1.0"
    } else {
        b"HTTP/1.1"
    };
    batch.push(&Report {
        time_ms: now_ms(),
        client: conn.peer,
        method: req.method().as_bytes(),
        target: req.target().as_bytes(),
        protocol,
        host: host.as_bytes(),
        status,
        bytes,
        duration_us: started.elapsed().as_micros() as u64,
        arrival: conn.arrival,
        referer: req.header("referer").unwrap_or_default(),
        user_agent: req.header("user-agent").unwrap_or_default(),
    });
}

/// Logs a request refused with `status` before it reached the handler; `input` is what the
/// connection sent from that request's first byte.
pub(crate) fn refused(batch: &mut Batch, input: &[u8], status: u16, bytes: u64, conn: ConnInfo) {
    let d = access::describe(input);
    batch.push(&Report {
        time_ms: now_ms(),
        client: conn.peer,
        method: d.method,
        target: d.target,
        protocol: d.protocol,
        host: &d.host,
        status,
        bytes,
        duration_us: 0,
        arrival: conn.arrival,
        referer: d.referer,
        user_agent: d.user_agent,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn report() -> Report<'static> {
        Report {
            time_ms: 1,
            client: None,
            method: b"GET",
            target: b"/kept",
            protocol: b"HTTP/1.1",
            host: b"h",
            status: 200,
            bytes: 0,
            duration_us: 0,
            arrival: Arrival::Kernel,
            referer: b"",
            user_agent: b"",
        }
    }

    #[test]
    fn a_batch_the_front_end_cannot_take_yet_is_kept_for_the_next_try() {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned here.
        let (front, worker) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Fill the channel as a front end that does not read would.
        let filler = vec![b'x'; 4096];
        while control::send(worker.as_raw_fd(), &filler).is_ok() {}
        let mut batch = Batch::new(Some(worker.as_raw_fd()), true).unwrap();
        batch.push(&report());
        batch.flush();
        assert_eq!(batch.count, 1, "kept, not dropped");
        // The front end catches up; the next flush delivers the kept line.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            // SAFETY: reading into a live buffer of its length.
            let n = unsafe { libc::recv(front.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
        }
        batch.flush();
        assert_eq!((batch.count, batch.dropped), (0, 0));
        // SAFETY: as above.
        let n = unsafe { libc::recv(front.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let msg = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        assert!(msg.starts_with("access\n1\t-\tGET\t/kept\t"), "{msg}");
    }
}
