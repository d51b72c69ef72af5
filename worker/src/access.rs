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
